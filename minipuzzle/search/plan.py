"""From a chosen candidate to a cut `Plan` (which layers and units stay), and the readable layout file.

This is where units are chosen: the search fixes how many stay per axis, `choose_units` picks which (the
top-scored ones, the same count in every group of a grouped axis such as Mamba heads or the routed experts of a
router with `n_group` groups); `cut` then cuts them.

Routed experts' channels (`expert_ffn`) are chosen one of two ways (`EXPERT_CHANNEL_CHOICES`): `shared`, one
channel set for every expert of a layer from scores summed over the experts' tokens, or `per_expert`, each expert's
own top channels from its own scores, the same count in every expert so the merged tensors stay rectangular.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np
import yaml

from minipuzzle.anatomy import AXES, KIND_NAMES, PER_EXPERT_CHANNELS
from minipuzzle.arch import Layout
from minipuzzle.errors import UserError
from minipuzzle.search.damage import DamageModel, as_float_array, rank_desc
from minipuzzle.search.solver import Candidate
from minipuzzle.search.space import layout_axes, search_kinds

# Imports inside functions here keep torch and transformers unloaded until a function needs them, so `--help`
# and the offline commands (dry runs, info, search) start fast.

EXPERT_CHANNEL_CHOICES = ("shared", "per_expert")


def choose_units(
    cand: Candidate, model: DamageModel, scores, norm_compensation: bool = True, expert_channels: str = "per_expert"
):
    """The cut Plan for `cand`: the top-ranked layers of each kind, and on every width axis the top-scored
    units of each kept layer (of the whole model for an axis of every layer, such as hidden), the same count per
    group on grouped axes. Axes left at full width keep everything. Routed experts' channels are chosen as
    `expert_channels` says (`EXPERT_CHANNEL_CHOICES`)."""
    from minipuzzle.cut import Plan

    if expert_channels not in EXPERT_CHANNEL_CHOICES:
        raise UserError(f"unknown expert channel choice {expert_channels!r}: use {' or '.join(EXPERT_CHANNEL_CHOICES)}")

    src = model.space.source
    layers = model.kept_layers(cand.counts)
    units = {}
    for name, axis in AXES.items():
        width = cand.widths[name]
        if width == axis.width(src):
            continue
        if name == "expert_ffn" and expert_channels == "per_expert":
            units[PER_EXPERT_CHANNELS] = _per_expert_channels(scores, src, layers, width)
        elif axis.kind is None:
            units[name] = kept_units(scores[name], width, axis.unit(src))
        else:
            # mamba_head_dim is shared by every head: one score vector per layer, the same cut in every head.
            table = scores[name]
            units[name] = {i: kept_units(table[i], width, axis.unit(src)) for i in layers if src.pattern[i] == axis.kind}
    return Plan(layers=layers, units=units, norm_compensation=norm_compensation)


def layout_document(plan, source: Layout, budget=None, cand: Candidate | None = None, extra: dict | None = None):
    """A human-readable dict: the resulting widths and counts first, then the plan's index lists. The MoE layer
    count, widths and active parameters appear for mixture-of-experts sources only."""
    target = plan.target_layout(source)
    doc = {
        "source": {"pattern": source.pattern, "params": source.num_params()},
        "result": {
            "pattern": target.pattern,
            "params": target.num_params(),
            "layers": {KIND_NAMES[kind]: target.count(kind) for kind in search_kinds(source)},
            "widths": {name: AXES[name].width(target) for name in layout_axes(source)},
        },
    }
    if source.is_moe:
        doc["result"]["active_params"] = target.num_active_params()
    if budget is not None:
        doc["budget"] = budget.to_dict()
        if budget.memory is not None:
            doc["result"]["memory_bytes"] = budget.memory_of(target)
    if cand is not None:
        doc["result"]["predicted_damage"] = cand.damage
    doc.update(extra or {})
    doc["plan"] = plan.to_dict()
    return doc


def _per_expert_channels(scores, src: Layout, layers: list[int], width: int) -> dict[int, list[list[int]]]:
    """Each expert's own `width` top channels in every kept MoE layer, from scores.expert_channels [E, width]."""

    out = {}
    for i in (i for i in layers if src.pattern[i] == "E"):
        table = scores[PER_EXPERT_CHANNELS].get(i)
        if table is None:
            raise UserError(
                f"the scores have no per-expert channel scores for layer {i}: re-score expert_ffn with this version "
                f"(`minipuzzle score`), or choose the shared channels (--expert-channels shared)"
            )
        out[i] = [kept_units(row, width) for row in as_float_array(table).reshape(src.n_routed_experts, -1)]
    return out


def kept_units(scores: np.ndarray, keep: int, groups: int = 1) -> list[int]:
    """Indices (ascending) of the `keep` most important units, the same number in each of `groups` contiguous
    groups; zero scores are dropped before any positive one."""
    s = as_float_array(scores).reshape(-1)
    per = len(s) // groups
    k = keep // groups
    out = []
    for g in range(groups):
        part = s[g * per : (g + 1) * per]
        out.extend(int(g * per + j) for j in rank_desc(np.nan_to_num(part, nan=0.0))[:k])
    return sorted(out)


class _Flow(list):
    """A list dumped on one line: index lists stay readable."""


def _flow_representer(dumper, data):
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=True)


yaml.SafeDumper.add_representer(_Flow, _flow_representer)


def write_layout_yaml(doc: dict, path: str | Path) -> Path:
    """Write `doc` as YAML (index lists on one line each), atomically (temp file, then rename)."""

    def flow(x):
        if isinstance(x, dict):
            return {k: flow(v) for k, v in x.items()}
        if isinstance(x, list) and all(isinstance(v, (int, float)) for v in x):
            return _Flow(x)
        return x

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as fh:
        yaml.safe_dump(flow(doc), fh, sort_keys=False, width=120)
    os.replace(tmp, path)
    return path


def read_plan(path: str | Path):
    """The Plan in a JSON or YAML file: the plan itself, or a document with a `plan` key (a layout file written
    by `minipuzzle search`)."""

    from minipuzzle.cut import Plan

    path = Path(path)
    if not path.is_file():
        raise UserError(f"plan file not found: {path}")
    try:
        text = path.read_text()
        doc = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise UserError(f"cannot parse plan {path}: {str(e).splitlines()[0]}") from None
    if not isinstance(doc, dict):
        raise UserError(f"plan {path} must be a mapping with 'layers'")
    return Plan.from_dict(doc.get("plan", doc))
