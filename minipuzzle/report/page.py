"""`build_run_report`: one self-contained HTML page for a whole run folder.

A run folder holds one folder per stage, as `minipuzzle run` lays it out (see `runner.run`), each with its typed
artifact (`minipuzzle.artifacts`): score/scores.json, prune/prune_report.json, distill/metrics.jsonl (or
distill.partial/ while the run is under way), eval/report.json and, when the pruned model was evaluated too,
eval_pruned/report.json. Each section appears when its artifact is there and is skipped otherwise. Images are
embedded as base64 data URIs, so the page is one file that can be mailed or archived.
"""

from __future__ import annotations

import base64
import html
import os
import tempfile
from pathlib import Path
from typing import Any

from minipuzzle.artifacts import CandidateRow, EvalReport, PruneReport, ScoresMeta, read_metrics
from minipuzzle.errors import UserError
from minipuzzle.evaluate import plots
from minipuzzle.evaluate.tables import (
    Table,
    before_after_table,
    candidate_ranks_table,
    fmt,
    quality_table,
    speed_table,
    tasks_table,
)
from minipuzzle.quantize.report import quantized_table

KIND_NAMES = {"M": "Mamba", "*": "attention", "-": "MLP", "E": "MoE"}
MAX_CANDIDATE_ROWS = 50

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;max-width:1100px;color:#1a202c;
padding:0 1em}
h1{font-size:1.6em}h2{border-bottom:1px solid #cbd5e0;padding-bottom:.2em;margin-top:2em}
table{border-collapse:collapse;margin:.8em 0;font-size:.9em}
th,td{border:1px solid #e2e8f0;padding:.25em .6em;text-align:right}
th:first-child,td:first-child{text-align:left}th{background:#f7fafc}
img{max-width:100%;border:1px solid #e2e8f0;margin:.5em 0}
nav a{margin-right:1em}.muted{color:#718096}
.strip{display:flex;flex-wrap:wrap;gap:2px;margin:.3em 0}
.strip span{display:inline-block;width:14px;height:22px;font:10px monospace;text-align:center;line-height:22px;
color:#fff;border-radius:2px}
.k-M{background:#1f77b4}.k-A{background:#d62728}.k-F{background:#2ca02c}.k-E{background:#9467bd}.gone{background:#e2e8f0!important;
color:#a0aec0!important;text-decoration:line-through}
pre{background:#f7fafc;padding:.8em;overflow-x:auto;font-size:.85em}
"""


def _artifact(path: Path, kind):
    """The artifact at `path` read as `kind`, or None when the stage has not written it."""
    return kind.read(path) if path.is_file() else None


# ---- HTML pieces -----------------------------------------------------------------------------------------------


def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _table(table: Table | None) -> str:
    if not table:
        return ""
    header, rows = table
    out = ["<table><thead><tr>", *(f"<th>{_e(h)}</th>" for h in header), "</tr></thead><tbody>"]
    for r in rows:
        out.append("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in r) + "</tr>")
    out.append("</tbody></table>")
    return "".join(out)


def _img(png: Path, alt: str) -> str:
    data = base64.b64encode(png.read_bytes()).decode("ascii")
    return f'<figure><img alt="{_e(alt)}" src="data:image/png;base64,{data}"></figure>'


def _pngs(folder: Path) -> str:
    return "".join(_img(p, p.stem) for p in sorted(folder.glob("*.png")))


def _scalars(d: dict) -> Table | None:
    """The top-level plain values of an artifact (nested ones have their own tables)."""
    rows = [[k, fmt(v)] for k, v in d.items() if isinstance(v, (str, int, float, bool))]
    return (["field", "value"], rows) if rows else None


def _candidate_table(rows: list[CandidateRow]) -> Table:
    """One row per candidate, nested figures as `widths.ffn`-style columns."""
    flat = []
    for r in rows[:MAX_CANDIDATE_ROWS]:
        row = {}
        for k, v in r.model_dump(exclude_none=True).items():
            row.update({f"{k}.{kk}": vv for kk, vv in v.items()} if isinstance(v, dict) else {k: v})
        flat.append(row)
    cols = list(dict.fromkeys(k for r in flat for k in r))
    return cols, [[fmt(r.get(c)) for c in cols] for r in flat]


def _strip(pattern: str, kept: set[int] | None = None) -> str:
    cls = {"M": "k-M", "*": "k-A", "-": "k-F", "E": "k-E"}
    cells = []
    for i, ch in enumerate(pattern):
        gone = kept is not None and i not in kept
        title = f"layer {i}: {KIND_NAMES[ch]}" + (" (removed)" if gone else "")
        cells.append(f'<span class="{cls[ch]}{" gone" if gone else ""}" title="{_e(title)}">{_e(ch)}</span>')
    return f'<div class="strip">{"".join(cells)}</div>'


def _counts(pattern: str) -> str:
    return ", ".join(f"{pattern.count(ch)} {name}" for ch, name in KIND_NAMES.items() if ch != "E" or ch in pattern)


# ---- sections --------------------------------------------------------------------------------------------------


def _score_section(run_dir: Path, tmp: Path) -> str | None:
    folder = run_dir / "score"
    meta = _artifact(folder / "scores.json", ScoresMeta)
    if meta is None:
        return None
    parts = [f'<p class="muted">{_e(folder.relative_to(run_dir))}</p>']
    pattern, depth = meta.pattern, meta.depth
    if pattern:
        parts.append(f"<p>source layers: {_e(_counts(pattern))}</p>{_strip(pattern)}")
    if depth:
        # The score stage's own depth.png is embedded below with the folder's plots; draw one only without it.
        png = None if (folder / "depth.png").is_file() else plots.depth_plot(depth, pattern, tmp / "depth.png")
        if png:
            parts.append(_img(png, "layer importance"))
        order = sorted(range(len(depth)), key=lambda i: depth[i])
        rows = [[str(i), KIND_NAMES[pattern[i]], fmt(depth[i])] for i in order[:10]]
        parts.append("<p>least important layers</p>" + _table((["layer", "kind", "importance"], rows)))
    if meta.settings is not None:
        parts.append(_table(_scalars(meta.settings.model_dump())))
    parts.append(_pngs(folder))
    return "".join(parts)


def _prune_section(run_dir: Path) -> str | None:
    folder = run_dir / "prune"
    rep = _artifact(folder / "prune_report.json", PruneReport)
    if rep is None:
        return None
    src, res = rep.chosen.source.pattern, rep.chosen.result
    keep = set(rep.chosen.kept_layers)
    gone = [i for i in range(len(src)) if i not in keep]
    widths = [[axis, fmt(rep.source_widths.get(axis)), fmt(w)] for axis, w in res.widths.items()]
    n = len(rep.candidates)
    more = f" (first {MAX_CANDIDATE_ROWS} of {n})" if n > MAX_CANDIDATE_ROWS else ""
    return "".join([
        f'<p class="muted">{_e(folder.relative_to(run_dir))}</p>',
        f"<h3>Source</h3><p>{len(src)} layers: {_e(_counts(src))}</p>{_strip(src, keep)}",
        f"<p>removed layers ({len(gone)}): {_e(', '.join(f'{i}{src[i]}' for i in gone))}</p>",
        f"<h3>Chosen</h3><p>{len(res.pattern)} layers: {_e(_counts(res.pattern))}</p>{_strip(res.pattern)}",
        "<h3>Widths</h3>" + _table((["width", "source", "chosen"], widths)),
        _table(_scalars(rep.model_dump())),
        "<h3>measured vs predicted rank</h3>" + _table(candidate_ranks_table(rep.candidates[:MAX_CANDIDATE_ROWS], rep.source_widths)),
        f"<h3>candidates{_e(more)}</h3>" + _table(_candidate_table(rep.candidates)),
        _pngs(folder),
    ])  # fmt: skip


def _distill_section(run_dir: Path, tmp: Path) -> str | None:
    f = next((d / "metrics.jsonl" for d in (run_dir / "distill", run_dir / "distill.partial")
              if (d / "metrics.jsonl").is_file()), None)  # fmt: skip
    rows = read_metrics(f) if f else []
    if not rows:
        return None
    parts = [f'<p class="muted">{_e(f.relative_to(run_dir))}: {len(rows)} points</p>']
    png = plots.distill_plot(rows, tmp / "distill.png")
    if png:
        parts.append(_img(png, "distillation curve"))
    dumped = [r.model_dump() for r in (rows if len(rows) <= 6 else rows[:3] + rows[-3:])]
    cols = list(dict.fromkeys(k for r in dumped for k in r))
    parts.append(_table((cols, [[fmt(r.get(c)) for c in cols] for r in dumped])))
    return "".join(parts)


def _eval_section(run_dir: Path) -> str | None:
    f = run_dir / "eval" / "report.json"
    rep = _artifact(f, EvalReport)
    if rep is None:
        return None
    parts = [
        f'<p class="muted">{_e(f.relative_to(run_dir))}</p>',
        f"<p>model <code>{_e(rep.model)}</code>"
        + (f", teacher <code>{_e(rep.teacher)}</code>" if rep.teacher else "")
        + f"; {_e(rep.settings.device)} {_e(rep.settings.dtype)}</p>",
    ]
    before = _artifact(run_dir / "eval_pruned" / "report.json", EvalReport)
    for title, table in (
        ("Held-out text", quality_table(rep)),
        ("Distillation: before and after", before_after_table(before, rep) if before else None),
        ("Quantization: teacher, bf16 and quantized student", quantized_table(run_dir, rep)),
        ("lm-eval tasks", tasks_table(rep)),
        ("Speed and memory", speed_table(rep)),
    ):
        if table:
            parts.append(f"<h3>{_e(title)}</h3>{_table(table)}")
    parts.append(_pngs(f.parent))
    return "".join(parts)


def build_run_report(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write one self-contained HTML page for a run folder (default `RUN_DIR/report.html`); returns its path.

    Sections, each present only when its stage's artifact is there: evaluation, score, prune,
    distillation. Raises `UserError` when the folder is missing or holds no stage output at all.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"run folder not found: {run_dir}")
    out = Path(out) if out is not None else run_dir / "report.html"
    with tempfile.TemporaryDirectory() as td:
        tmp = Path(td)
        sections = [
            ("evaluation", "Evaluation", _eval_section(run_dir)),
            ("score", "Importance", _score_section(run_dir, tmp)),
            ("prune", "Search and chosen layout", _prune_section(run_dir)),
            ("distill", "Distillation", _distill_section(run_dir, tmp)),
        ]
    present = [(i, t, b) for i, t, b in sections if b]
    if not present:
        raise UserError(
            f"no stage outputs in {run_dir} (looked for score/scores.json, prune/prune_report.json, "
            "distill/metrics.jsonl, eval/report.json)"
        )
    nav = "".join(f'<a href="#{i}">{_e(t)}</a>' for i, t, _ in present)
    skipped = [t for _, t, b in sections if not b]
    body = "".join(f'<section id="{i}"><h2>{_e(t)}</h2>{b}</section>' for i, t, b in present)
    note = f'<p class="muted">not in this run: {_e(", ".join(skipped))}</p>' if skipped else ""
    page = (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f"<title>minipuzzle run: {_e(run_dir.name)}</title><style>{CSS}</style></head><body>"
        f"<h1>minipuzzle run: {_e(run_dir.resolve().name)}</h1><nav>{nav}</nav>{note}{body}</body></html>\n"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    part = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    part.write_text(page, encoding="utf-8")
    os.replace(part, out)
    return out
