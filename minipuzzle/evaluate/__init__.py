"""Evaluation: held-out perplexity / KL / agreement, lm-eval tasks, speed and memory, reports and plots.

`evaluate(...)` writes one model's report folder (report.json, report.md, PNGs); `build_run_report(run_dir)`
writes one self-contained HTML page for a whole run (importance, search, distillation, evaluation).
"""

from minipuzzle.evaluate.harness import DEFAULT_FEWSHOT, TaskSpec, parse_tasks, run_tasks
from minipuzzle.evaluate.run_report import build_run_report
from minipuzzle.evaluate.runner import evaluate, held_out_stats
from minipuzzle.evaluate.speed import measure_speed

__all__ = [
    "DEFAULT_FEWSHOT",
    "TaskSpec",
    "build_run_report",
    "evaluate",
    "held_out_stats",
    "measure_speed",
    "parse_tasks",
    "run_tasks",
]
