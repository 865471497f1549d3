"""Evaluation: held-out perplexity / KL / agreement (`runner`), lm-eval tasks (`harness`), speed and memory
(`speed`), placement on devices (`placement`), one model's report folder (`report`: report.json, report.md, PNGs;
`tables` and `plots` draw them). Import from the module that does the job; the run page is `minipuzzle.report`."""
