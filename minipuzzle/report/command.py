"""`minipuzzle report`: a thin wrapper over `page.build_run_report`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

# Imports inside functions here keep torch and transformers unloaded until a function needs them, so `--help`
# and the offline commands (dry runs, info, search) start fast.


def _report_command(
    run_dir: Annotated[Path, typer.Argument(help="Run folder with stage outputs (score/, prune/, distill/, eval/).")],
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="HTML file (default RUN_DIR/report.html).")
    ] = None,
) -> None:
    """One self-contained HTML page for a whole run: importance, chosen layout, distillation curve, evaluation.

    Example: minipuzzle report runs/56b-to-47b
    """
    # The page draws its plots with matplotlib: imported when the command runs, not when the CLI lists commands.
    from minipuzzle.report.page import build_run_report

    path = build_run_report(run_dir, output)
    print(f"wrote {path}")


def register(app: typer.Typer) -> None:
    app.command("report")(_report_command)
