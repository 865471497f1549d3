"""Write an evaluation report folder: report.json (machine-readable), report.md (tables) and PNG plots."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from minipuzzle.evaluate import plots
from minipuzzle.evaluate.tables import fmt, markdown, quality_table, speed_table, tasks_table


def render_markdown(rep: dict[str, Any]) -> str:
    """The human-readable report: what was compared, then quality, tasks, speed/memory tables and the plots."""
    s = rep.get("settings", {})
    lines = [f"# Evaluation: {rep.get('model')}", ""]
    if rep.get("teacher"):
        lines.append(f"Teacher: `{rep['teacher']}`  ")
    lines.append(
        f"Device {s.get('device')} ({s.get('dtype')}), seed {s.get('seed')}, "
        f"{fmt(rep.get('elapsed_s'), 1)} s; minipuzzle {s.get('versions', {}).get('minipuzzle')}, "
        f"lm-eval {s.get('versions', {}).get('lm_eval')}."
    )
    lines.append("")
    q = quality_table(rep)
    if q:
        lines += [
            "## Held-out text",
            "",
            f"{fmt(rep.get('tokens'))} scored tokens: {s.get('windows')} windows of {s.get('seq_len')} tokens "
            f"from `{s.get('data')}`. Perplexity = exp(mean token loss); KL is KL(teacher ‖ model) in nats per "
            "token; agreement is the share of positions where the model's greedy token is the teacher's.",
            "",
            markdown(q),
            "",
        ]
    t = tasks_table(rep)
    if t:
        limit = s.get("limit")
        lines += ["## lm-eval tasks", "", f"Examples per task: {'all' if limit is None else limit}.", ""]
        lines += [markdown(t), ""]
    sp = speed_table(rep)
    if sp:
        first = next(iter((rep.get("speed") or {}).values()), None)
        lines += ["## Speed and memory", ""]
        if first:
            lines += [
                f"Measured in this run: batch {first['batch']}, prompt {first['prompt_len']} tokens, "
                f"{first['decode_tokens']} decoded tokens, median of {first['repeats']}; peak memory is "
                f"{first['peak_memory_kind'].replace('_', ' ')}. Parameters, memory and FLOPs are the "
                "architecture model's figures.",
                "",
            ]
        lines += [markdown(sp), ""]
    d = rep.get("distill")
    if d:
        last = ", ".join(f"{k} {fmt(v)}" for k, v in d["last"].items())
        lines += ["## Distillation", "", f"{d['points']} logged points; last: {last}.", ""]
    if rep.get("plots"):
        lines += ["## Plots", ""] + [f"![{Path(p).stem}]({p})" for p in rep["plots"]] + [""]
    return "\n".join(lines)


def write_report(
    rep: dict[str, Any],
    out: str | Path,
    *,
    overwrite: bool = False,
    metrics_rows: list[dict] | None = None,
) -> Path:
    """Write `rep` into the folder `out` atomically; adds the plot file names to `rep["plots"]`."""
    from minipuzzle.checkpoint import atomic_dir

    with atomic_dir(out, overwrite) as tmp:
        made = [
            plots.quality_plot(rep, tmp / "quality.png"),
            plots.tasks_plot(rep.get("tasks") or {}, rep.get("teacher_tasks"), tmp / "tasks.png"),
            plots.speed_plot(rep.get("speed") or {}, tmp / "speed.png"),
            plots.distill_plot(metrics_rows, tmp / "distill.png") if metrics_rows else None,
        ]
        rep["plots"] = [p.name for p in made if p is not None]
        (tmp / "report.json").write_text(json.dumps(rep, indent=2, default=str) + "\n")
        (tmp / "report.md").write_text(render_markdown(rep))
    return Path(out)
