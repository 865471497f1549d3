"""The report's tables as plain rows, shared by the Markdown report and the HTML run page.

Each builder returns (header, rows) with every cell already a string, teacher beside model, so both renderers
show the same numbers.
"""

from __future__ import annotations

from typing import Any

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


def gib(n: Any) -> str:
    return "–" if n is None else f"{n / 2**30:.3f} GiB" if n >= 2**27 else f"{n / 2**20:.1f} MiB"


def _delta(a: Any, b: Any) -> str:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return f"{b - a:+.4f}"
    return "–"


def before_after_table(before: dict, after: dict) -> Table | None:
    """The pruned student before and after distillation, on the same held-out windows."""
    keys = [
        ("KL(teacher ‖ model) per token", "kl_to_teacher"),
        ("agreement with teacher's greedy token", "agreement"),
        ("perplexity", "perplexity"),
        ("next-token accuracy", "accuracy"),
    ]
    rows = [[label, fmt(before.get(k)), fmt(after.get(k)), _delta(before.get(k), after.get(k))] for label, k in keys
            if before.get(k) is not None and after.get(k) is not None]  # fmt: skip
    return (["metric", "pruned, before distillation", "after distillation", "Δ"], rows) if rows else None


def quality_table(rep: dict) -> Table | None:
    """Held-out text: perplexity, loss, accuracy, KL to teacher, agreement."""
    if rep.get("perplexity") is None:
        return None
    t = rep.get("teacher_quality") or {}
    rows = [
        [
            "perplexity",
            fmt(t.get("perplexity")),
            fmt(rep["perplexity"]),
            _delta(t.get("perplexity"), rep["perplexity"]),
        ],
        ["loss (nats/token)", fmt(t.get("loss")), fmt(rep.get("loss")), _delta(t.get("loss"), rep.get("loss"))],
        [
            "next-token accuracy",
            fmt(t.get("accuracy")),
            fmt(rep.get("accuracy")),
            _delta(t.get("accuracy"), rep.get("accuracy")),
        ],
    ]
    if rep.get("kl_to_teacher") is not None:
        rows.append(["KL(teacher ‖ model) per token", "0", fmt(rep["kl_to_teacher"]), ""])
        rows.append(["agreement with teacher's greedy token", "1", fmt(rep.get("agreement")), ""])
    return ["metric", "teacher", "model", "Δ"], rows


def tasks_table(rep: dict) -> Table | None:
    """One row per (task, metric): shots, teacher, model, difference."""
    tasks = rep.get("tasks") or {}
    if not tasks:
        return None
    teacher = rep.get("teacher_tasks") or {}
    shots = rep.get("n_shot") or {}
    rows = []
    for task in sorted(tasks):
        for metric, v in tasks[task].items():
            tv = teacher.get(task, {}).get(metric)
            rows.append([task, metric, fmt(shots.get(task)), fmt(tv), fmt(v), _delta(tv, v)])
    return ["task", "metric", "shots", "teacher", "model", "Δ"], rows


def speed_table(rep: dict) -> Table | None:
    """Measured speed and memory, then the architecture model's figures, teacher beside model."""
    speed = rep.get("speed") or {}
    arch = rep.get("architecture") or {}
    if not speed and not arch:
        return None
    cols = [n for n in ("teacher", "model") if speed.get(n) or arch.get(n)]

    def row(label, get):
        return [label] + [get(n) for n in cols]

    rows = []
    if speed:
        rows += [
            row("prefill tokens/s (measured)", lambda n: fmt((speed.get(n) or {}).get("prefill_tokens_per_s"), 1)),
            row("decode tokens/s (measured)", lambda n: fmt((speed.get(n) or {}).get("decode_tokens_per_s"), 1)),
            row("peak memory (measured)", lambda n: gib((speed.get(n) or {}).get("peak_memory_bytes"))),
            row("weights as loaded", lambda n: gib((speed.get(n) or {}).get("weights_bytes"))),
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
    c = a.get("layers", {})
    return f"{c.get('mamba', 0)} / {c.get('mlp', 0)} / {c.get('attention', 0)}"


def _mem(a: dict | None, key: str):
    return (a or {}).get("memory_bytes", {}).get(key)


def _flops(a: dict | None, key: str):
    return (a or {}).get("flops_per_token", {}).get(key)


def markdown(table: Table) -> str:
    header, rows = table
    esc = [[c.replace("|", "\\|") for c in r] for r in rows]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in esc]
    return "\n".join(lines)
