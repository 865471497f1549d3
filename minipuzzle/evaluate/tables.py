"""The report's tables as plain rows, shared by the Markdown report and the HTML run page.

Each builder returns (header, rows) with every cell already a string, teacher beside model, so both renderers
show the same numbers.
"""

from __future__ import annotations

from typing import Any

from minipuzzle.artifacts import CandidateRow, EvalReport
from minipuzzle.units import gib

Table = tuple[list[str], list[list[str]]]


def fmt(v: Any, digits: int = 4) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        if v != v:
            return "–"
        if abs(v) >= 1e5 or (v != 0 and abs(v) < 1e-3):
            return f"{v:.3e}"
        return f"{v:.{digits}f}"
    return str(v)


def _delta(a: Any, b: Any) -> str:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return f"{b - a:+.4f}"
    return "–"


def before_after_table(before: EvalReport, after: EvalReport) -> Table | None:
    """The pruned student before and after distillation, on the same held-out windows."""
    keys = [
        ("KL(teacher ‖ model) per token", "kl_to_teacher"),
        ("agreement with teacher's greedy token", "agreement"),
        ("perplexity", "perplexity"),
        ("next-token accuracy", "accuracy"),
    ]
    pairs = [(label, getattr(before, k), getattr(after, k)) for label, k in keys]
    rows = [[label, fmt(a), fmt(b), _delta(a, b)] for label, a, b in pairs if a is not None and b is not None]
    return (["metric", "pruned, before distillation", "after distillation", "Δ"], rows) if rows else None


def quality_table(rep: EvalReport) -> Table | None:
    """Held-out text: perplexity, loss, accuracy, KL to teacher, agreement."""
    if rep.perplexity is None:
        return None
    t = rep.teacher_quality
    rows = [
        [label, fmt(getattr(t, k, None)), fmt(getattr(rep, k)), _delta(getattr(t, k, None), getattr(rep, k))]
        for label, k in (("perplexity", "perplexity"), ("loss (nats/token)", "loss"), ("next-token accuracy", "accuracy"))
    ]  # fmt: skip
    if rep.kl_to_teacher is not None:
        rows.append(["KL(teacher ‖ model) per token", "0", fmt(rep.kl_to_teacher), ""])
        rows.append(["agreement with teacher's greedy token", "1", fmt(rep.agreement), ""])
    return ["metric", "teacher", "model", "Δ"], rows


def tasks_table(rep: EvalReport) -> Table | None:
    """One row per (task, metric): shots, teacher, model, difference."""
    if not rep.tasks:
        return None
    teacher = rep.teacher_tasks or {}
    rows = []
    for task in sorted(rep.tasks):
        for metric, v in rep.tasks[task].items():
            tv = teacher.get(task, {}).get(metric)
            rows.append([task, metric, fmt(rep.n_shot.get(task)), fmt(tv), fmt(v), _delta(tv, v)])
    return ["task", "metric", "shots", "teacher", "model", "Δ"], rows


def _rate(sp, part: str) -> str:
    """'24.2 (21.0–25.1)': the median tokens/s and the slowest and fastest repeat."""
    if sp is None:
        return "–"
    med, rng = getattr(sp, f"{part}_tokens_per_s"), getattr(sp, f"{part}_tokens_per_s_range")
    return fmt(med, 1) + (f" ({rng[0]:.1f}–{rng[1]:.1f})" if rng else "")


def speed_table(rep: EvalReport) -> Table | None:
    """Measured speed and memory, then the architecture model's figures, teacher beside model."""
    speed, arch = rep.speed, rep.architecture
    if not speed and not arch:
        return None
    cols = [n for n in ("teacher", "model") if n in speed or n in arch]

    def row(label, get):
        return [label] + [get(n) for n in cols]

    def measured(n: str, key: str):
        return getattr(speed[n], key) if n in speed else None

    rows = []
    if speed:
        rows += [
            row("prefill tokens/s (median, range of repeats)", lambda n: _rate(speed.get(n), "prefill")),
            row("decode tokens/s (median, range of repeats)", lambda n: _rate(speed.get(n), "decode")),
            row("peak memory (measured)", lambda n: gib(measured(n, "peak_memory_bytes"))),
            row("weights as loaded", lambda n: gib(measured(n, "weights_bytes"))),
        ]
    if arch:
        a = arch.get(cols[-1]) or {}
        prec, ctx = a.get("precision", "?"), a.get("context", "?")
        rows += [
            row("parameters", lambda n: fmt((arch.get(n) or {}).get("params"))),
            row("layers (M / - / *)", lambda n: _layers(arch.get(n))),
            row(f"memory at {prec}, context {fmt(ctx)}", lambda n: gib(_mem(arch.get(n), "total"))),
            row("  of which KV cache", lambda n: gib(_mem(arch.get(n), "kv_cache"))),
            row(f"prefill FLOPs/token at {fmt(ctx)}", lambda n: fmt(_flops(arch.get(n), "prefill"))),
            row(f"decode FLOPs/token at {fmt(ctx)}", lambda n: fmt(_flops(arch.get(n), "decode"))),
        ]
    return ["", *cols], rows


def _layers(a: dict | None) -> str:
    if not a:
        return "–"
    c = a["layers"]
    return f"{c.get('mamba', 0)} / {c.get('mlp', 0)} / {c.get('attention', 0)}"


def _mem(a: dict | None, key: str):
    return a["memory_bytes"][key] if a else None


def _flops(a: dict | None, key: str):
    return a["flops_per_token"][key] if a else None


def markdown(table: Table) -> str:
    header, rows = table
    esc = [[c.replace("|", "\\|") for c in r] for r in rows]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in esc]
    return "\n".join(lines)


def candidate_ranks_table(rows: list[CandidateRow], source_widths: dict[str, int] | None = None) -> Table:
    """Prune's measured candidates, best measured first: measured beside predicted rank, why each was measured
    (its family; best predicted, best of its family or next best predicted), its layout (the widths narrower than
    `source_widths`, all of them without it) and its figures."""
    kinds = list(rows[0].layers) if rows else []
    head = ["measured rank", "predicted rank", "why measured", "family", f"layers ({'/'.join(kinds)})",
            "widths cut", "params", "budget used", "KL to parent"]  # fmt: skip
    out = []
    for r in rows:
        layers = "/".join(str(r.layers.get(k, 0)) for k in kinds)
        cut = {a: w for a, w in r.widths.items() if source_widths is None or w < source_widths.get(a, w + 1)}
        widths = ", ".join(f"{a} {w}" for a, w in cut.items()) or "none"
        out.append([str(r.measured_rank), str(r.predicted_rank), fmt(r.why), fmt(r.family), layers, widths,
                    fmt(r.params), fmt(r.budget_used, 3), fmt(r.kl_to_teacher)])  # fmt: skip
    return head, out
