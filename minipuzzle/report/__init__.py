"""The run page: `page.build_run_report` writes one self-contained HTML page for a whole run folder from the
artifacts its stages wrote; `command` is `minipuzzle report`."""
