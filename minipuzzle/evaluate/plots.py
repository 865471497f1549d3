"""PNG plots for evaluation and run reports (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from minipuzzle.artifacts import EvalReport, EvalRow, SpeedResult, TrainRow  # noqa: E402

MODEL_COLOR, TEACHER_COLOR = "#2b6cb0", "#a0aec0"
# The score stage's colours, so every plot of a run reads the same way.
KIND_COLORS = {"M": "tab:blue", "*": "tab:red", "-": "tab:green"}


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def tasks_plot(tasks: dict, teacher_tasks: dict | None, path: str | Path) -> Path | None:
    """Grouped bars, one group per task (its first metric): teacher next to model."""
    names = sorted(tasks)
    if not names:
        return None
    metric = {t: next(iter(tasks[t])) for t in names}
    fig, ax = plt.subplots(figsize=(max(4.0, 1.2 * len(names) + 2), 3.6))
    x = range(len(names))
    width = 0.38 if teacher_tasks else 0.6
    if teacher_tasks:
        tv = [teacher_tasks.get(t, {}).get(metric[t], float("nan")) for t in names]
        ax.bar([i - width / 2 for i in x], tv, width, label="teacher", color=TEACHER_COLOR)
    mv = [tasks[t][metric[t]] for t in names]
    ax.bar([i + (width / 2 if teacher_tasks else 0) for i in x], mv, width, label="model", color=MODEL_COLOR)
    ax.set_xticks(list(x), [f"{t}\n({metric[t]})" for t in names], fontsize=8)
    ax.set_ylabel("score")
    ax.set_title("lm-eval tasks")
    ax.legend(fontsize=8)
    return _save(fig, Path(path))


def speed_plot(speed: dict[str, SpeedResult], path: str | Path) -> Path | None:
    """Prefill and decode tokens/s, one bar per measured model (model, teacher)."""
    names = [n for n in ("teacher", "model") if n in speed]
    if not names:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(7, 3.2))
    for ax, key, title in zip(axes, ("prefill_tokens_per_s", "decode_tokens_per_s"), ("prefill", "decode")):
        vals = [getattr(speed[n], key) for n in names]
        ax.bar(names, vals, color=[TEACHER_COLOR if n == "teacher" else MODEL_COLOR for n in names])
        ax.set_title(f"{title} tokens/s")
        for i, v in enumerate(vals):
            ax.annotate(f"{v:,.0f}", (i, v), ha="center", va="bottom", fontsize=8)
    s = speed[names[-1]]
    fig.suptitle(f"batch {s.batch}, prompt {s.prompt_len}, {s.device} {s.dtype}", fontsize=9)
    return _save(fig, Path(path))


def distill_plot(rows: list[TrainRow | EvalRow], path: str | Path) -> Path | None:
    """Training loss and KL, and held-out KL to the teacher, against step.

    metrics.jsonl mixes training rows and evaluation rows (whose `loss` is the LM loss, not the distillation
    loss), so the two are drawn as separate series.
    """
    train = [r for r in rows if isinstance(r, TrainRow)]
    evals = [r for r in rows if isinstance(r, EvalRow)]
    series = [("loss", train, "loss"), ("kl", train, "kl"), ("held-out KL", evals, "kl_to_teacher")]
    series = [(label, rs, key) for label, rs, key in series if rs]
    if not series:
        return None
    fig, ax = plt.subplots(figsize=(6, 3.4))
    values = []
    for label, rs, key in series:
        ys = [getattr(r, key) for r in rs]
        values += ys
        ax.plot([r.step for r in rs], ys, marker="o" if "held-out" in label else None, ms=3, label=label)
    if min(values) > 0:
        ax.set_yscale("log")  # KL falls by orders of magnitude while loss may not
    ax.set_xlabel("step")
    ax.set_ylabel("nats / token")
    ax.set_title("distillation")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, Path(path))


def depth_plot(depth: list[float], pattern: str, path: str | Path) -> Path | None:
    """Layer importance (drop-one damage) per layer, coloured by layer kind."""
    if not depth:
        return None
    fig, ax = plt.subplots(figsize=(max(5.0, 0.12 * len(depth) + 2), 3.2))
    colors = [KIND_COLORS.get(pattern[i] if i < len(pattern) else "", "#718096") for i in range(len(depth))]
    ax.bar(range(len(depth)), depth, color=colors)
    ax.set_xlabel("layer")
    ax.set_ylabel("importance")
    ax.set_title("layer importance (blue Mamba, red attention, green MLP)", fontsize=9)
    return _save(fig, Path(path))


def quality_plot(rep: EvalReport, path: str | Path) -> Path | None:
    """Held-out text: perplexity (left) and next-token accuracy / agreement with the teacher (right)."""
    if rep.perplexity is None:
        return None
    teacher = rep.teacher_quality
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(7, 3.2))
    names = (["teacher"] if teacher else []) + ["model"]
    ppl = ([teacher.perplexity] if teacher else []) + [rep.perplexity]
    a1.bar(names, ppl, color=[TEACHER_COLOR if n == "teacher" else MODEL_COLOR for n in names])
    a1.set_title("perplexity (lower is better)")
    bars = ([("teacher acc", teacher.accuracy, TEACHER_COLOR)] if teacher else []) + [
        ("model acc", rep.accuracy, MODEL_COLOR)
    ]
    if rep.agreement is not None:
        bars.append(("agreement", rep.agreement, "#805ad5"))
    labels, vals, colors = zip(*bars)
    a2.bar(labels, vals, color=colors)
    a2.set_ylim(0, 1)
    a2.set_title("next token")
    if rep.kl_to_teacher is not None:
        fig.suptitle(f"KL(teacher ‖ model) = {rep.kl_to_teacher:.4f} nats/token", fontsize=9)
    return _save(fig, Path(path))
