"""`build_run_report`: one self-contained HTML page for a whole run folder.

A run folder holds stage outputs written by other stages: importance scores (scores.json / scores.safetensors),
the search or prune report (prune_report.json: chosen layout, parameters, candidates), the distillation
checkpoint (metrics.jsonl) and the evaluation report (report.json). Each section appears when its files are
found and is skipped otherwise; the formats of other stages are read defensively (keys are looked for, not
assumed), so a newer stage output degrades to a key/value table rather than an error. Images are embedded as
base64 data URIs, so the page is one file that can be mailed or archived.
"""

from __future__ import annotations

import base64
import html
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from minipuzzle.anatomy import AXES
from minipuzzle.errors import UserError
from minipuzzle.evaluate import plots
from minipuzzle.evaluate.tables import Table, before_after_table, fmt, quality_table, speed_table, tasks_table

KIND_NAMES = {"M": "Mamba", "*": "attention", "-": "MLP"}
WIDTH_KEYS = (
    "hidden_size",
    "intermediate_size",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "mamba_num_heads",
    "mamba_head_dim",
    "ssm_state_size",
    "n_groups",
)
SOURCE_WORDS = ("source", "parent", "original", "teacher", "base", "score")
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
.k-M{background:#1f77b4}.k-A{background:#d62728}.k-F{background:#2ca02c}.gone{background:#e2e8f0!important;
color:#a0aec0!important;text-decoration:line-through}
pre{background:#f7fafc;padding:.8em;overflow-x:auto;font-size:.85em}
"""


# ---- finding stage outputs -------------------------------------------------------------------------------------


def _files(run_dir: Path, name: str, prefer: tuple[str, ...], depth: int = 3) -> list[Path]:
    """Files called `name` under run_dir (at most `depth` folders down, hidden/temporary folders skipped),
    those in the preferred stage folders first."""
    found = []
    for root, dirs, files in os.walk(run_dir):
        rel = Path(root).relative_to(run_dir)
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and len(rel.parts) < depth)
        if name in files:
            found.append(Path(root) / name)

    def rank(p: Path) -> tuple[int, int, str]:
        top = p.relative_to(run_dir).parts[0] if len(p.relative_to(run_dir).parts) > 1 else ""
        return (0 if top in prefer else 1, len(p.parts), str(p))

    return sorted(found, key=rank)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _eval_report(run_dir: Path) -> tuple[Path, dict] | None:
    for f in _files(run_dir, "report.json", ("eval", "evaluate", "evaluation")):
        rep = _read_json(f)
        if isinstance(rep, dict) and "settings" in rep and ("perplexity" in rep or "tasks" in rep):
            return f, rep
    return None


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


def _pngs(folder: Path, skip: tuple[str, ...] = ()) -> str:
    return "".join(_img(p, p.stem) for p in sorted(folder.glob("*.png")) if p.name not in skip)


def _scalars(d: dict, skip: tuple[str, ...] = ()) -> Table | None:
    rows = [[k, fmt(v)] for k, v in d.items() if k not in skip and isinstance(v, (str, int, float, bool))]
    return (["field", "value"], rows) if rows else None


def _walk(obj: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    """(key path, value) of every entry in nested dicts/lists (list indices become '[i]')."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield (*path, str(k)), v
            yield from _walk(v, (*path, str(k)))
    elif isinstance(obj, list):
        for i, v in enumerate(obj[:1000]):
            yield from _walk(v, (*path, f"[{i}]"))


def _is_source(path: tuple[str, ...]) -> bool:
    return any(w in p.lower() for p in path[:-1] for w in SOURCE_WORDS) or any(
        path[-1].lower().startswith(w + "_") for w in SOURCE_WORDS
    )


def _is_pattern(v: Any) -> bool:
    return isinstance(v, str) and bool(v) and set(v) <= set(KIND_NAMES)


def _layouts(rep: dict) -> dict[str, Any]:
    """Source and chosen patterns, kept source-layer indices and widths, looked for anywhere in a prune report.

    Understands the search stage's report (chosen.source / chosen.result with axis-named widths / chosen.plan
    with the kept `layers`) and flatter spellings (kept_layers, source_pattern, config-named widths).
    """
    out: dict[str, Any] = {"source": None, "chosen": None, "kept": None, "widths": {}}
    for path, v in _walk(rep):
        key = path[-1].lower()
        if "candidate" in " ".join(path).lower():
            continue  # the candidate table has patterns too; the chosen one is reported outside it
        side = "source" if _is_source(path) else "chosen"
        parent = path[-2].lower() if len(path) > 1 else ""
        if key.endswith("pattern") and _is_pattern(v):
            if out[side] is None:
                out[side] = v
        elif (("keep" in key or "kept" in key) and "layer" in key) or (key == "layers" and parent == "plan"):
            if out["kept"] is None and isinstance(v, list) and v and all(isinstance(i, int) for i in v):
                out["kept"] = sorted(v)
        elif isinstance(v, int) and not isinstance(v, bool):
            field = next((w for w in WIDTH_KEYS if key.endswith(w)), None)
            if parent == "widths":
                field = AXES[key].field if key in AXES else None
            if field:
                out["widths"].setdefault(field, {}).setdefault(side, v)
    src_ckpt = rep.get("checkpoint")
    if isinstance(src_ckpt, str) and (Path(src_ckpt) / "config.json").is_file():
        try:  # the source widths are in the source checkpoint's config when the report does not repeat them
            from minipuzzle.arch import Layout, load_config

            lay = Layout.from_config(load_config(src_ckpt))
            out["source"] = out["source"] or lay.pattern
            for field in WIDTH_KEYS:
                if field in out["widths"]:
                    out["widths"].setdefault(field, {}).setdefault("source", getattr(lay, field))
        except Exception:  # noqa: BLE001 - an unreadable source config only loses the source widths column
            pass
    return out


def _flat(row: dict) -> dict:
    """One level of nesting flattened for the candidate table: {"widths": {"ffn": 8}} -> {"widths.ffn": 8}."""
    out = {}
    for k, v in row.items():
        if isinstance(v, dict):
            out.update({f"{k}.{kk}": vv for kk, vv in v.items() if not isinstance(vv, (dict, list))})
        elif not isinstance(v, list):
            out[k] = v
    return out


def _strip(pattern: str, kept: set[int] | None = None) -> str:
    cls = {"M": "k-M", "*": "k-A", "-": "k-F"}
    cells = []
    for i, ch in enumerate(pattern):
        gone = kept is not None and i not in kept
        title = f"layer {i}: {KIND_NAMES[ch]}" + (" (removed)" if gone else "")
        cells.append(f'<span class="{cls[ch]}{" gone" if gone else ""}" title="{_e(title)}">{_e(ch)}</span>')
    return f'<div class="strip">{"".join(cells)}</div>'


def _counts(pattern: str) -> str:
    return ", ".join(f"{pattern.count(ch)} {name}" for ch, name in KIND_NAMES.items())


# ---- sections --------------------------------------------------------------------------------------------------


def _importance_section(run_dir: Path, tmp: Path) -> str | None:
    hits = _files(run_dir, "scores.json", ("score", "scores", "importance")) or _files(
        run_dir, "scores.safetensors", ("score", "scores", "importance")
    )
    if not hits:
        return None
    folder = hits[0].parent
    meta = _read_json(folder / "scores.json") if (folder / "scores.json").is_file() else {}
    meta = meta if isinstance(meta, dict) else {}
    parts = [f'<p class="muted">{_e(folder.relative_to(run_dir))}</p>']
    pattern = meta.get("pattern", "")
    depth = None
    st = folder / "scores.safetensors"
    if st.is_file():
        try:
            from safetensors import safe_open

            with safe_open(str(st), framework="pt") as h:
                pattern = pattern or (h.metadata() or {}).get("pattern", "")
                if "depth" in h.keys():
                    depth = h.get_tensor("depth").float().tolist()
        except Exception as e:  # a half-written or foreign file: say so, keep the rest of the page
            parts.append(f"<p>could not read {_e(st.name)}: {_e(e)}</p>")
    if depth is None and isinstance(meta.get("depth"), list):
        depth = [float(x) for x in meta["depth"] if isinstance(x, (int, float))]
    if pattern:
        parts.append(f"<p>source layers: {_e(_counts(pattern))}</p>{_strip(pattern)}")
    if depth:
        # The importance stage's own depth.png is embedded below with the folder's plots; draw one only without it.
        png = None if (folder / "depth.png").is_file() else plots.depth_plot(depth, pattern, tmp / "depth.png")
        if png:
            parts.append(_img(png, "layer importance"))
        order = sorted(range(len(depth)), key=lambda i: depth[i])
        rows = [
            [str(i), KIND_NAMES.get(pattern[i], "?") if i < len(pattern) else "?", fmt(depth[i])] for i in order[:10]
        ]
        parts.append("<p>least important layers</p>" + _table((["layer", "kind", "importance"], rows)))
    parts.append(_table(_scalars(meta, ("pattern",))))
    parts.append(_pngs(folder))
    return "".join(parts)


def _search_section(run_dir: Path) -> str | None:
    hits = _files(run_dir, "prune_report.json", ("search", "prune", "surgery"))
    rep = _read_json(hits[0]) if hits else None
    if not isinstance(rep, dict):
        return None
    folder = hits[0].parent
    lay = _layouts(rep)
    parts = [f'<p class="muted">{_e(folder.relative_to(run_dir))}</p>']
    src, chosen, kept = lay["source"], lay["chosen"], lay["kept"]
    if src:
        keep = set(kept) if kept is not None and len(kept) <= len(src) else None
        parts.append(f"<h3>Source</h3><p>{len(src)} layers: {_e(_counts(src))}</p>{_strip(src, keep)}")
        if keep is not None:
            gone = [i for i in range(len(src)) if i not in keep]
            parts.append(f"<p>removed layers ({len(gone)}): {_e(', '.join(f'{i}{src[i]}' for i in gone))}</p>")
    if chosen:
        parts.append(f"<h3>Chosen</h3><p>{len(chosen)} layers: {_e(_counts(chosen))}</p>{_strip(chosen)}")
    if lay["widths"]:
        rows = [[k, fmt(v.get("source")), fmt(v.get("chosen"))] for k, v in lay["widths"].items()]
        parts.append("<h3>Widths</h3>" + _table((["width", "source", "chosen"], rows)))
    parts.append(_table(_scalars(rep)))
    for key, v in rep.items():
        if "candidate" in key.lower() and isinstance(v, list) and v and all(isinstance(r, dict) for r in v):
            flat = [_flat(r) for r in v]
            cols = list(dict.fromkeys(k for r in flat for k in r))
            rows = [[fmt(r.get(c)) for c in cols] for r in flat[:MAX_CANDIDATE_ROWS]]
            more = f" (first {MAX_CANDIDATE_ROWS} of {len(v)})" if len(v) > MAX_CANDIDATE_ROWS else ""
            parts.append(f"<h3>{_e(key)}{_e(more)}</h3>" + _table((cols, rows)))
    parts.append(_pngs(folder))
    return "".join(parts)


def _distill_section(run_dir: Path, tmp: Path) -> str | None:
    hits = _files(run_dir, "metrics.jsonl", ("distill", "distillation", "train"), depth=4)
    rows = plots.read_metrics(hits[0]) if hits else []
    if not rows:
        return None
    parts = [f'<p class="muted">{_e(hits[0].relative_to(run_dir))}: {len(rows)} points</p>']
    png = plots.distill_plot(rows, tmp / "distill.png")
    if png:
        parts.append(_img(png, "distillation curve"))
    cols = [
        c
        for c in dict.fromkeys(k for r in rows for k in r)
        if all(not isinstance(r.get(c), (dict, list)) for r in rows)
    ]
    pick = rows if len(rows) <= 6 else rows[:3] + rows[-3:]
    parts.append(_table((cols, [[fmt(r.get(c)) for c in cols] for r in pick])))
    return "".join(parts)


def _eval_section(run_dir: Path) -> str | None:
    found = _eval_report(run_dir)
    if not found:
        return None
    f, rep = found
    s = rep.get("settings", {})
    parts = [
        f'<p class="muted">{_e(f.relative_to(run_dir))}</p>',
        f"<p>model <code>{_e(rep.get('model'))}</code>"
        + (f", teacher <code>{_e(rep['teacher'])}</code>" if rep.get("teacher") else "")
        + f"; {_e(s.get('device'))} {_e(s.get('dtype'))}</p>",
    ]
    before = _read_json(run_dir / "eval_pruned" / "report.json")
    for title, table in (
        ("Held-out text", quality_table(rep)),
        ("Distillation: before and after", before_after_table(before, rep) if isinstance(before, dict) else None),
        ("lm-eval tasks", tasks_table(rep)),
        ("Speed and memory", speed_table(rep)),
    ):
        if table:
            parts.append(f"<h3>{_e(title)}</h3>{_table(table)}")
    parts.append(_pngs(f.parent))
    return "".join(parts)


def build_run_report(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write one self-contained HTML page for a run folder (default `RUN_DIR/report.html`); returns its path.

    Sections, each present only when its stage's files are found: importance, search, distillation,
    evaluation. Raises `UserError` when the folder is missing or holds no stage output at all.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"run folder not found: {run_dir}")
    out = Path(out) if out is not None else run_dir / "report.html"
    with tempfile.TemporaryDirectory() as td:
        tmp = Path(td)
        sections = [
            ("evaluation", "Evaluation", _eval_section(run_dir)),
            ("importance", "Importance", _importance_section(run_dir, tmp)),
            ("search", "Search and chosen layout", _search_section(run_dir)),
            ("distill", "Distillation", _distill_section(run_dir, tmp)),
        ]
    present = [(i, t, b) for i, t, b in sections if b]
    if not present:
        raise UserError(
            f"no stage outputs in {run_dir} (looked for report.json, scores.json, prune_report.json, metrics.jsonl)"
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
