"""Write an evaluation report folder: report.json (`artifacts.EvalReport`), report.md (tables) and PNG plots."""

from __future__ import annotations

from pathlib import Path

from minipuzzle.artifacts import EvalReport, read_metrics
from minipuzzle.checkpoint.write import atomic_dir
from minipuzzle.evaluate import plots
from minipuzzle.evaluate.tables import fmt, markdown, quality_table, speed_table, tasks_table


def render_markdown(rep: EvalReport | dict) -> str:
    """The human-readable report: what was compared, then quality, tasks, speed/memory tables and the plots.
    `rep` may be the dict `evaluate` returns."""
    rep = EvalReport.model_validate(rep)
    s = rep.settings
    lines = [f"# Evaluation: {rep.model}", ""]
    if rep.teacher:
        lines.append(f"Teacher: `{rep.teacher}`  ")
    lines += [
        f"Device {s.device} ({s.dtype}), seed {s.seed}, {fmt(rep.elapsed_s, 1)} s; minipuzzle "
        f"{s.versions.get('minipuzzle')}, lm-eval {s.versions.get('lm_eval')}.",
        "",
    ]
    q = quality_table(rep)
    if q:
        lines += [
            "## Held-out text",
            "",
            f"{fmt(rep.tokens)} scored tokens: {s.windows} windows of {s.seq_len} tokens from `{s.data}`. "
            "Perplexity = exp(mean token loss); KL is KL(teacher ‖ model) in nats per token; agreement is the share "
            "of positions where the model's greedy token is the teacher's.",
            "",
            markdown(q),
            "",
        ]
    t = tasks_table(rep)
    if t:
        limit = "all" if s.limit is None else s.limit
        lines += ["## lm-eval tasks", "", f"Examples per task: {limit}.", "", markdown(t), ""]
    sp = speed_table(rep)
    if sp:
        lines += ["## Speed and memory", ""]
        first = next(iter(rep.speed.values()), None)
        if first:
            lines += [
                f"Measured in this run: batch {first.batch}, prompt {first.prompt_len} tokens, "
                f"{first.decode_tokens} decoded tokens, median of {first.repeats}; peak memory is "
                f"{first.peak_memory_kind.replace('_', ' ')}. Parameters, memory and FLOPs are the "
                "architecture model's figures.",
                "",
            ]
        lines += [markdown(sp), ""]
    if rep.distill:
        last = ", ".join(f"{k} {fmt(v)}" for k, v in rep.distill.last.items())
        lines += ["## Distillation", "", f"{rep.distill.points} logged points; last: {last}.", ""]
    if rep.plots:
        lines += ["## Plots", ""] + [f"![{Path(p).stem}]({p})" for p in rep.plots] + [""]
    return "\n".join(lines)


def write_report(rep: EvalReport, out: str | Path, *, overwrite: bool = False) -> Path:
    """Write `rep` into the folder `out` atomically; sets `rep.plots` to the plot file names."""

    rows = read_metrics(rep.distill.metrics_file) if rep.distill else []
    with atomic_dir(out, overwrite) as tmp:
        made = [
            plots.quality_plot(rep, tmp / "quality.png"),
            plots.tasks_plot(rep.tasks, rep.teacher_tasks, tmp / "tasks.png"),
            plots.speed_plot(rep.speed, tmp / "speed.png"),
            plots.distill_plot(rows, tmp / "distill.png") if rows else None,
        ]
        rep.plots = [p.name for p in made if p is not None]
        rep.write(tmp / "report.json")
        (tmp / "report.md").write_text(render_markdown(rep))
    return Path(out)
