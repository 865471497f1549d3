"""Cut a Nemotron-H checkpoint down to a plan: which layers stay and, per axis, which units stay.

Where each unit of an axis lives in the weights is written once, in `minipuzzle.anatomy`; each axis's cutting
function here (`CUTS`) turns a plan's kept units into row and column indices of the tensors they live in, and the
`Cutter` merges them per layer.

Removing channels from an RMSNorm's input changes its mean square even when they held zeros, so by default
(`Plan.norm_compensation`) the norms over the hidden size and the Mamba gated group norm scale their kept weights by
sqrt(old_width / new_width): removing units that contribute nothing then leaves the logits unchanged up to the
norm's epsilon. Switched off, the kept weights are copied as they are.

Mixture-of-experts layers: removing routed experts cuts their router rows, their `e_score_correction_bias`
entries and their weights (merged [E, ...] tensors on dim 0; per-expert tensors as stored on disk are dropped and the
kept ones renumbered 0..n-1). The router's `n_group` groups are contiguous blocks of experts, and a plan keeps the
same number in each (like query heads in their KV groups), so the kept experts of old group g form new group g:
`n_group`, `topk_group` and `num_experts_per_tok` stay, the group view of the router still works and, when the
removed experts were never among a group's two best nor chosen, routing is unchanged. A plan that leaves a group
fewer than two experts (the router ranks groups by their best two) or too few for the top-k is refused.

Two modes that call the same per-tensor function, so they agree bit for bit: in memory (`prune_state_dict`,
`cut_model`) and streamed from the source shards to the output shards (`cut_checkpoint`), holding about one
tensor at a time.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from minipuzzle.anatomy import (
    ATTENTION,
    AXES,
    GROUPED_MM_BYTES,
    LAYER_AXES,
    MAMBA,
    MLP,
    MOE,
    PER_EXPERT_CHANNELS,
    WIDTH_AXES,
    attention_rows,
    leading_layer_problem,
    mamba_channels,
    mamba_conv_slices,
    mamba_in_proj_slices,
)
from minipuzzle.arch import Layout
from minipuzzle.checkpoint.build import build_model, model_state_dict
from minipuzzle.checkpoint.dtypes import keeps_float32
from minipuzzle.checkpoint.read import Checkpoint, expert_part, is_merged_experts, native_name
from minipuzzle.checkpoint.write import SHARD_BYTES, ShardWriter, atomic_dir, copy_tokenizer, write_config
from minipuzzle.errors import UserError
from minipuzzle.progress import track

_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
# FP8 / FP4 expert kernels (vLLM, TensorRT-LLM) work on blocks of 16 channels; the search's default steps keep it.
SERVING_EXPERT_MULTIPLE = 16
# How one tensor is cut: kept rows, kept columns (None keeps all) and a factor for the kept values.
Cut = tuple[torch.Tensor | None, torch.Tensor | None, float]


# What a plan may keep, by name: the width axes of `anatomy.AXES`, then the routed experts' own channels.
PLAN_UNITS = (*WIDTH_AXES, PER_EXPERT_CHANNELS)


@dataclass(init=False)
class Plan:
    """Which units of a source model stay, keyed by axis of `minipuzzle.anatomy` (`plan[axis]`, None keeps all).

    layers: kept source layer indices, ascending. units[layer axis]: for each kept source layer of that axis's
    kind, the kept unit indices (ascending), e.g. units["ffn"] = {1: [0, 3, ...]}. mamba_heads are global head
    indices, mamba_head_dim entries are channel indices within a head (the same in every head), attn_heads are
    query-head indices. units["hidden"]: kept hidden (residual-stream) channels, one list for the model.
    experts / expert_ffn / shared_ffn (MoE layers): kept routed experts (the same count in each of the router's
    `n_group` contiguous groups, at least two per group and enough for `num_experts_per_tok`), channels of every
    routed expert (the same in each), channels of the shared expert.
    units["expert_channels"] (MoE layers, instead of expert_ffn for a layer): each routed expert's own kept
    channels, one ascending list per source expert (all of the layer's experts, kept or not), every list the same
    length, so the merged [E, width, in] tensors stay rectangular. Channel c of one expert and of another are
    unrelated neurons.
    norm_compensation: scale the kept weights of RMSNorms that lose input channels by sqrt(old_width / new_width).
    """

    layers: list[int]
    units: dict[str, Any]
    norm_compensation: bool = True

    def __init__(
        self, layers: list[int], units: dict[str, Any] | None = None, norm_compensation: bool = True, **named: Any
    ):
        """`units` (or keyword arguments named like its keys, `PLAN_UNITS`) maps axes to kept units."""
        self.layers, self.norm_compensation, self.units = layers, norm_compensation, {}
        for name, kept in {**(units or {}), **named}.items():
            if name not in PLAN_UNITS:
                raise TypeError(f"a plan keeps no {name!r}: it keeps {', '.join(PLAN_UNITS)}")
            if kept is not None:
                self.units[name] = kept

    def __getitem__(self, name: str):
        """Kept units on `name` (a `PLAN_UNITS` entry), None when the plan keeps them all."""
        if name not in PLAN_UNITS:
            raise KeyError(f"a plan keeps no {name!r}: it keeps {', '.join(PLAN_UNITS)}")
        return self.units.get(name)

    @classmethod
    def keep_all(cls, layout: Layout) -> Plan:
        return cls(layers=list(range(layout.num_layers)))

    def to_dict(self) -> dict[str, Any]:
        """The plan file's form: layer axes {"layer": [units]}, axes of every layer [units], per-expert channels
        {"layer": [[units] per expert]}, in `PLAN_UNITS` order by form."""
        d: dict[str, Any] = {"layers": list(self.layers)}
        for name in _LAYER_UNITS:
            if self[name] is not None:
                d[name] = {str(i): list(map(int, v)) for i, v in sorted(self[name].items())}
        for name in _MODEL_UNITS:
            if self[name] is not None:
                d[name] = list(map(int, self[name]))
        if self[PER_EXPERT_CHANNELS] is not None:
            d[PER_EXPERT_CHANNELS] = {
                str(i): [list(map(int, c)) for c in v] for i, v in sorted(self[PER_EXPERT_CHANNELS].items())
            }
        d["norm_compensation"] = self.norm_compensation
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Plan:
        unknown = set(d) - {"layers", "norm_compensation", *PLAN_UNITS}
        if unknown:
            raise UserError(f"unknown key(s) in plan: {', '.join(sorted(unknown))}")
        if "layers" not in d:
            raise UserError("plan lacks 'layers'")
        units: dict[str, Any] = {}
        for name in _LAYER_UNITS:
            if d.get(name) is not None:
                units[name] = {int(i): [int(u) for u in v] for i, v in d[name].items()}
        for name in _MODEL_UNITS:
            if d.get(name) is not None:
                units[name] = [int(u) for u in d[name]]
        if d.get(PER_EXPERT_CHANNELS) is not None:
            try:
                units[PER_EXPERT_CHANNELS] = {
                    int(i): [[int(u) for u in c] for c in v] for i, v in d[PER_EXPERT_CHANNELS].items()
                }
            except (TypeError, ValueError, AttributeError):
                raise UserError(
                    "plan's expert_channels must map each MoE layer to one channel list per expert"
                ) from None
        comp = d.get("norm_compensation", True)
        if not isinstance(comp, bool):
            raise UserError(f"plan's norm_compensation must be true or false, got {comp!r}")
        return cls([int(i) for i in d["layers"]], units, comp)

    def kept(self, axis: str, layer: int, full: int) -> list[int]:
        """Kept unit indices of layer axis `axis` in source layer `layer` (all `full` when the plan cuts none)."""
        sel = self[axis]
        if sel is None or layer not in sel:
            return list(range(full))
        return sel[layer]

    def validate(self, layout: Layout) -> None:
        """Check the plan against the source layout; raise UserError naming the first problem."""
        last = layout.num_layers - 1
        if not self.layers:
            raise UserError("plan keeps no layers")
        if sorted(set(self.layers)) != list(self.layers) or self.layers[0] < 0 or self.layers[-1] > last:
            raise UserError(f"plan layers must be ascending, unique and within 0..{last}")
        problem = leading_layer_problem(layout.pattern, self.layers)
        if problem:
            raise UserError(problem)
        for axis in _LAYER_UNITS:
            self._check_layer_axis(layout, axis)
        if layout.is_moe:
            self._check_router(layout)
        if layout.is_moe or self[PER_EXPERT_CHANNELS]:
            self._check_expert_channels(layout)
        for name in (name for name in _MODEL_UNITS if self[name] is not None):
            _check_indices(self[name], AXES[name].width(layout), name)

    def check_expert_strides(self, layout: Layout, dtype: torch.dtype) -> None:
        """Refuse a width that transformers' grouped expert matmul cannot run in `dtype` (the output's), when the
        plan changes it: a source that already has one is the user's to keep."""
        dst, m = self.target_layout(layout), max(1, GROUPED_MM_BYTES // dtype.itemsize)
        if not dst.is_moe:
            return
        widths = (("routed experts' width", layout.moe_intermediate_size, dst.moe_intermediate_size),
                  ("width the experts read (hidden)", layout.moe_expert_input, dst.moe_expert_input))  # fmt: skip
        for what, old, new in widths:
            if new != old and new % m:
                raise UserError(
                    f"plan cuts the {what} to {new}: transformers' grouped expert matmul needs a multiple of {m} "
                    f"in {str(dtype).removeprefix('torch.')} (16-byte strides); keep {new // m * m or m} or "
                    f"{-(-new // m) * m}"
                )

    def _check_layer_axis(self, layout: Layout, name: str) -> None:
        """Indices valid, uniform width over the kept layers of the axis's kind, equal counts in every group."""
        axis = AXES[name]
        full, groups = axis.width(layout), axis.unit(layout)
        for i in self[name] or {}:
            if i not in self.layers or layout.pattern[i] != axis.kind:
                raise UserError(f"plan gives {name} for layer {i}, which is not a kept {axis.kind!r} layer")
        counts = set()
        for i in (i for i in self.layers if layout.pattern[i] == axis.kind):
            if name == "expert_ffn" and i in (self[PER_EXPERT_CHANNELS] or {}):
                continue  # per-expert channels: `_check_expert_channels`, which also compares the widths
            keep = self.kept(name, i, full)
            _check_indices(keep, full, f"{name} of layer {i}")
            counts.add(len(keep))
            per_group = [sum(1 for u in keep if u // (full // groups) == g) for g in range(groups)]
            if len(set(per_group)) != 1:
                raise UserError(
                    f"layer {i} keeps {name} unevenly across its {groups} groups {per_group}: keep the same count "
                    f"in each group ({axis.doc})"
                )
        if len(counts) > 1:
            raise UserError(
                f"plan keeps different numbers of {name} per layer ({sorted(counts)}): widths must be uniform"
            )

    def _check_router(self, layout: Layout) -> None:
        """Kept experts still make a router: two per group at least, enough in `topk_group` groups for the top-k."""
        groups, top_k, top_groups = layout.n_group, layout.num_experts_per_tok, layout.topk_group
        for i, keep in sorted((self["experts"] or {}).items()):
            per_group = len(keep) // groups
            if per_group < 2:
                raise UserError(
                    f"layer {i} keeps {per_group} expert(s) in each of its {groups} router groups: the router ranks "
                    f"groups by their two best experts, so keep at least {2 * groups}"
                )
            if top_k > top_groups * per_group:
                raise UserError(
                    f"layer {i} keeps {len(keep)} experts, too few for num_experts_per_tok {top_k} from "
                    f"{top_groups} of {groups} groups: keep at least {-(-top_k // top_groups) * groups}"
                )

    def expert_width(self, layer: int, full: int) -> int:
        """Channels every routed expert of source layer `layer` keeps, whichever form the plan gives them in."""
        per_expert = (self[PER_EXPERT_CHANNELS] or {}).get(layer)
        return len(per_expert[0]) if per_expert else len(self.kept("expert_ffn", layer, full))

    def _check_expert_channels(self, layout: Layout) -> None:
        """Per-expert channels: one valid list per source expert, all the same length, in kept MoE layers that
        give no shared expert_ffn; the width uniform over every kept MoE layer, whichever form each uses."""
        full, num = layout.moe_intermediate_size, layout.n_routed_experts
        for i, lists in sorted((self[PER_EXPERT_CHANNELS] or {}).items()):
            if i not in self.layers or layout.pattern[i] != MOE:
                raise UserError(f"plan gives expert_channels for layer {i}, which is not a kept 'E' layer")
            if i in (self["expert_ffn"] or {}):
                raise UserError(f"plan gives layer {i} both expert_ffn and expert_channels: give one")
            if len(lists) != num:
                raise UserError(f"plan's expert_channels of layer {i} has {len(lists)} lists, one per expert: {num}")
            for e, keep in enumerate(lists):
                _check_indices(keep, full, f"expert_channels of layer {i}, expert {e}")
            if len({len(keep) for keep in lists}) > 1:
                raise UserError(
                    f"layer {i} keeps different numbers of channels per expert: the merged expert tensors must "
                    f"stay rectangular, keep the same count in every expert"
                )
        widths = {self.expert_width(i, full) for i in self.layers if layout.pattern[i] == MOE}
        if len(widths) > 1:
            raise UserError(
                f"plan keeps different numbers of expert_ffn per layer ({sorted(widths)}): widths must be uniform"
            )

    def target_layout(self, layout: Layout) -> Layout:
        """The layout of the pruned model."""
        self.validate(layout)
        return self._target(layout)

    def _target(self, layout: Layout) -> Layout:
        def width(name: str) -> int:
            axis = AXES[name]
            for i in self.layers:
                if layout.pattern[i] == axis.kind and name == "expert_ffn":
                    return self.expert_width(i, axis.width(layout))
                if layout.pattern[i] == axis.kind:
                    return len(self.kept(name, i, axis.width(layout)))
            return axis.width(layout)  # no layer of that kind left: the width is irrelevant, keep the source's

        def model_width(name: str) -> int:
            return AXES[name].width(layout) if self[name] is None else len(self[name])

        return layout.replace(
            pattern="".join(layout.pattern[i] for i in self.layers),
            **{AXES[name].field: width(name) for name in _LAYER_UNITS},
            **{AXES[name].field: model_width(name) for name in _MODEL_UNITS},
        )

    def copies_tensors(self, layout: Layout) -> bool:
        """Whether cutting `layout` makes new tensors: the plan narrows a width somewhere (or picks channels per
        expert). A plan that only drops layers writes the source's own tensors as they are stored."""
        dst = self.target_layout(layout)
        return self[PER_EXPERT_CHANNELS] is not None or dst.replace(pattern=layout.pattern) != layout

    def serving_notes(self, layout: Layout) -> list[str]:
        """Widths the pruned model runs with in transformers but that FP8 / FP4 expert kernels cannot serve."""
        dst, m = self.target_layout(layout), SERVING_EXPERT_MULTIPLE
        cut = dst.is_moe and dst.moe_intermediate_size != layout.moe_intermediate_size
        if cut and dst.moe_intermediate_size % m:
            return [f"routed experts' width {dst.moe_intermediate_size} is not a multiple of {m}: FP8 / FP4 "
                    f"expert kernels (vLLM, TensorRT-LLM) need one; bf16 serving is unaffected"]  # fmt: skip
        return []


# Plan units by form: per layer of the axis's kind, or one list for the model (axes of every layer, like hidden).
_LAYER_UNITS = LAYER_AXES
_MODEL_UNITS = tuple(name for name in WIDTH_AXES if AXES[name].kind is None)


def _check_indices(idx: list[int], full: int, what: str) -> None:
    if not idx:
        raise UserError(f"plan keeps no {what}")
    if sorted(set(idx)) != list(idx) or idx[0] < 0 or idx[-1] >= full:
        raise UserError(f"plan's {what} must be ascending, unique and within 0..{full - 1}")


# ---- per-tensor cutting -----------------------------------------------------------------------------------------


class Cutter:
    """Precomputed index tensors for one (layout, plan) pair: `cut(name, tensor)` slices one tensor (native source
    name), `output_name(name)` renames it (None for a dropped layer). Build once per plan, reuse for every tensor.

    A layer's cuts are the merge of the cutting functions (`CUTS`) of every axis that shapes its kind: each cuts
    the dimensions its units live on and leaves the others (None) to the other axes."""

    def __init__(self, layout: Layout, plan: Plan):
        plan.validate(layout)
        self.src, self.plan = layout, plan
        self.dst = plan.target_layout(layout)
        self.new_index = {old: new for new, old in enumerate(plan.layers)}
        h, kept_hidden = layout.hidden_size, plan["hidden"]
        self.hidden = None if kept_hidden is None or len(kept_hidden) == h else torch.tensor(kept_hidden)
        self.hidden_scale = math.sqrt(h / self.dst.hidden_size) if plan.norm_compensation else 1.0
        self._layer_cuts: dict[int, dict[str, Cut]] = {}
        # Each kind's cutting functions, once each (both Mamba axes share one).
        self._cuts_of_kind = {
            kind: tuple(dict.fromkeys(CUTS[name] for name, axis in AXES.items() if axis.kind in (None, kind)))
            for kind in set(layout.pattern)
        }

    def output_name(self, name: str) -> str | None:
        """Native name of `name` in the pruned model, or None when its layer (or, for one routed expert's tensor
        as stored on disk, its expert) is dropped."""
        m = _LAYER_RE.match(name)
        if not m:
            return name
        i = int(m.group(1))
        if i not in self.new_index:
            return None
        part = expert_part(name)
        if part is not None:
            new_j = self._expert_numbers(i).get(part[1])
            if new_j is None:
                return None
            proj = part[0].rpartition(".")[2]
            return f"model.layers.{self.new_index[i]}.mixer.experts.{new_j}.{proj}.weight"
        return f"model.layers.{self.new_index[i]}.{m.group(2)}"

    def _expert_numbers(self, i: int) -> dict[int, int]:
        """Kept routed experts of layer i: source index -> index in the pruned layer."""
        kept = self.plan.kept("experts", i, self.src.n_routed_experts)
        return {old: new for new, old in enumerate(kept)}

    def cut(self, name: str, t: torch.Tensor) -> torch.Tensor:
        """Slice one tensor (native source name) to the plan."""
        if name in ("model.embeddings.weight", "lm_head.weight"):
            return _apply(t, (None, self.hidden, 1.0))
        if name == "model.norm_f.weight":
            return _apply(t, (self.hidden, None, self.hidden_scale))
        m = _LAYER_RE.match(name)
        if not m:
            raise UserError(f"unexpected weight {name} in a Nemotron-H checkpoint")
        i, rest = int(m.group(1)), m.group(2)
        if rest == "norm.weight":
            return _apply(t, (self.hidden, None, self.hidden_scale))
        if i not in self._layer_cuts:  # tensors come layer by layer
            self._layer_cuts = {i: _merge(f(self, i) for f in self._cuts_of_kind[self.src.pattern[i]])}
        merged = is_merged_experts(name)
        how = self._layer_cuts[i].get(_cut_key(name, rest))
        if how is None or (merged and t.ndim != 3):
            raise UserError(f"unexpected weight {name} for a {self.src.pattern[i]!r} layer")
        if merged:  # routed experts stacked on dim 0: the experts axis keeps some of them
            return _apply_experts(t, self.kept_index("experts", i), how)
        part = expert_part(name)
        if part is not None:  # one expert's matrix on disk: its own row of a per-expert channel choice
            how = tuple(ix[part[1]] if ix is not None and ix.ndim == 2 else ix for ix in how[:2]) + (how[2],)
        return _apply(t, how)

    def kept_index(self, axis: str, i: int) -> torch.Tensor | None:
        """Kept units of layer axis `axis` in layer `i` as an index tensor, None when all stay."""
        full = AXES[axis].width(self.src)
        kept = self.plan.kept(axis, i, full)
        return None if len(kept) == full else torch.tensor(kept)


# ---- the cutting function of each axis: (cutter, source layer i) -> cuts of layer i's tensors under `mixer.` -----
# Each names every tensor whose dimensions its units live on, None for the dimensions it leaves to other axes.


def _ffn_cuts(c: Cutter, i: int) -> dict[str, Cut]:
    ffn = c.kept_index("ffn", i)
    return _linear_cuts(up_proj=(ffn, None), down_proj=(None, ffn))


def _attention_cuts(c: Cutter, i: int) -> dict[str, Cut]:
    heads = c.kept_index("attn_heads", i)
    q = None if heads is None else torch.tensor(attention_rows(c.src, heads.tolist()))
    # K and V stay: query heads are cut within their KV groups, and every group keeps the same number.
    return _linear_cuts(q_proj=(q, None), o_proj=(None, q))


def _mamba_cuts(c: Cutter, i: int) -> dict[str, Cut]:
    """Both Mamba axes: the kept channels of I are the kept head channels of the kept heads."""
    lay = c.src
    heads = c.plan.kept("mamba_heads", i, lay.mamba_num_heads)
    head_channels = c.plan.kept("mamba_head_dim", i, lay.mamba_head_dim)
    inner = in_proj = conv = head_index = None
    norm_scale = 1.0
    if len(heads) < lay.mamba_num_heads or len(head_channels) < lay.mamba_head_dim:
        inner, head_index = torch.tensor(mamba_channels(lay, heads, head_channels)), torch.tensor(heads)
        proj, conv_blocks = mamba_in_proj_slices(lay), mamba_conv_slices(lay)
        # B and C belong to the groups, which all stay; z, x and the conv's x follow the kept channels.
        z, x, dt = _at(proj["z"], inner), _at(proj["x"], inner), _at(proj["dt"], head_index)
        in_proj = torch.cat([z, x, _whole(proj["B"], proj["C"]), dt])
        conv = torch.cat([_at(conv_blocks["x"], inner), _whole(conv_blocks["B"], conv_blocks["C"])])
        if c.plan.norm_compensation:  # the gated norm is a group norm over I / n_groups channels per group
            norm_scale = math.sqrt(lay.mamba_intermediate / len(inner))
    per_head = {name: (head_index, None, 1.0) for name in ("A_log", "D", "dt_bias")}
    # The depthwise conv1d's weight (channels, 1, kernel) and bias are cut on channels alone, like outputs.
    projections = _linear_cuts(in_proj=(in_proj, None), conv1d=(conv, None), out_proj=(None, inner))
    return {**projections, **per_head, "norm.weight": (inner, None, norm_scale)}


def _experts_cuts(c: Cutter, i: int) -> dict[str, Cut]:
    """Router rows and correction bias follow the kept experts (the expert dimension of the merged expert
    tensors: `Cutter.cut`; per-expert tensors on disk: `Cutter.output_name`)."""
    experts = c.kept_index("experts", i)
    return {"gate.weight": (experts, None, 1.0), "gate.e_score_correction_bias": (experts, None, 1.0)}


def _expert_ffn_cuts(c: Cutter, i: int) -> dict[str, Cut]:
    """`experts.*.weight` is the cut of one expert's [out, in] matrix; every kept expert is cut alike, or each by
    its own row of a [source experts, kept width] index under the per-expert channel choice."""
    width = c.kept_index("expert_ffn", i)
    per_expert = (c.plan[PER_EXPERT_CHANNELS] or {}).get(i)
    if per_expert is not None and len(per_expert[0]) < c.src.moe_intermediate_size:
        width = torch.tensor(per_expert)
    return {"experts.up_proj.weight": (width, None, 1.0), "experts.down_proj.weight": (None, width, 1.0)}


def _shared_ffn_cuts(c: Cutter, i: int) -> dict[str, Cut]:
    shared = c.kept_index("shared_ffn", i)
    return _linear_cuts(**{"shared_experts.up_proj": (shared, None), "shared_experts.down_proj": (None, shared)})


def _hidden_cuts(c: Cutter, i: int) -> dict[str, Cut]:
    """Columns of every projection that reads the residual stream, rows of every one that writes it. Routed
    experts read and write the hidden size, or the latent space when `moe_latent_size` is set (then the latent
    projections carry the hidden cut)."""
    hid, kind = c.hidden, c.src.pattern[i]
    if kind == MLP:
        return _linear_cuts(up_proj=(None, hid), down_proj=(hid, None))
    if kind == ATTENTION:
        return _linear_cuts(q_proj=(None, hid), k_proj=(None, hid), v_proj=(None, hid), o_proj=(hid, None))
    if kind == MAMBA:
        return _linear_cuts(in_proj=(None, hid), out_proj=(hid, None))
    cuts = _linear_cuts(**{"shared_experts.up_proj": (None, hid), "shared_experts.down_proj": (hid, None)})
    cuts["gate.weight"] = (None, hid, 1.0)
    if c.src.moe_latent_size is not None:
        return cuts | _linear_cuts(fc1_latent_proj=(None, hid), fc2_latent_proj=(hid, None))
    return cuts | {"experts.up_proj.weight": (None, hid, 1.0), "experts.down_proj.weight": (hid, None, 1.0)}


# The cutting function of every width axis of `anatomy.AXES` (a function shared by two axes runs once a layer).
CUTS = {
    "ffn": _ffn_cuts,
    "mamba_heads": _mamba_cuts,
    "mamba_head_dim": _mamba_cuts,
    "attn_heads": _attention_cuts,
    "hidden": _hidden_cuts,
    "experts": _experts_cuts,
    "expert_ffn": _expert_ffn_cuts,
    "shared_ffn": _shared_ffn_cuts,
}


def _merge(parts) -> dict[str, Cut]:
    """One layer's cuts from its axes' cuts: each dimension of a tensor cut by at most one axis, factors multiplied."""
    out: dict[str, Cut] = {}
    for cuts in parts:
        for name, (rows, cols, scale) in cuts.items():
            old_rows, old_cols, old_scale = out.get(name, (None, None, 1.0))
            if (rows is not None and old_rows is not None) or (cols is not None and old_cols is not None):
                raise RuntimeError(f"two axes cut the same dimension of {name}")
            out[name] = (old_rows if rows is None else rows, old_cols if cols is None else cols, old_scale * scale)
    return out


def _cut_key(name: str, rest: str) -> str | None:
    """Where a layer's cuts hold the cut of tensor `name` (`rest`: its name within the layer): its name under
    `mixer.`, and for routed experts, merged or one tensor per expert, the cut of one expert's matrix
    (`experts.up_proj.weight`: every expert is cut alike; whether one stays is `Cutter.output_name`'s business)."""
    if not rest.startswith("mixer."):
        return None
    part = expert_part(name)
    if part is not None:
        return f"experts.{part[0].rpartition('.')[2]}.weight"
    rest = rest.removeprefix("mixer.")
    return rest + ".weight" if is_merged_experts(name) else rest


def _linear_cuts(**projections: tuple[torch.Tensor | None, torch.Tensor | None]) -> dict[str, Cut]:
    """The cuts of projections given as name=(kept outputs, kept inputs): `name.weight` (out, in) keeps both,
    `name.bias` (out,) the outputs; values unscaled."""
    cuts: dict[str, Cut] = {}
    for name, (rows, cols) in projections.items():
        cuts[f"{name}.weight"] = (rows, cols, 1.0)
        cuts[f"{name}.bias"] = (rows, None, 1.0)
    return cuts


def _apply(t: torch.Tensor, how: Cut) -> torch.Tensor:
    """`t` with only the kept rows and columns, its values scaled (in float32) by the factor when it is not 1."""
    rows, cols, scale = how
    out = t if rows is None else t.index_select(0, rows)
    out = out if cols is None else out.index_select(1, cols)
    return out if scale == 1.0 else (out.float() * scale).to(t.dtype)


def _apply_experts(t: torch.Tensor, experts: torch.Tensor | None, how: Cut) -> torch.Tensor:
    """A merged routed-experts tensor [E, out, in] with only the kept experts, each cut as `how` cuts one [out, in]
    matrix (unscaled). A 2-D row or column index [E, n] gives each source expert its own kept rows or columns."""
    rows, cols, _ = how
    out = t if experts is None else t.index_select(0, experts)
    for dim, ix in ((1, rows), (2, cols)):
        if ix is None:
            continue
        if ix.ndim == 1:
            out = out.index_select(dim, ix)
            continue
        ix = ix if experts is None else ix.index_select(0, experts)  # [kept experts, n]
        shape = list(out.shape)
        shape[dim] = ix.shape[1]
        ix = ix.unsqueeze(3 - dim).expand(shape)  # the expert's index, repeated along the other matrix dim
        out = out.gather(dim, ix)
    return out


def _at(block: slice, index: torch.Tensor) -> torch.Tensor:
    """Positions `index` within `block`, as indices of the whole tensor."""
    return block.start + index


def _whole(first: slice, last: slice) -> torch.Tensor:
    """Every index from the start of block `first` to the end of block `last`."""
    return torch.arange(first.start, last.stop)


# ---- the three entry points -------------------------------------------------------------------------------------


def prune_state_dict(
    state: dict[str, torch.Tensor], layout: Layout, plan: Plan
) -> tuple[Layout, dict[str, torch.Tensor]]:
    """Apply `plan` to a full state dict (either weight-name style). Returns (new layout, new native state)."""
    cutter = Cutter(layout, plan)
    out: dict[str, torch.Tensor] = {}
    for name, t in state.items():
        name = native_name(name)
        new = cutter.output_name(name)
        if new is not None:
            out[new] = cutter.cut(name, t)
    return cutter.dst, out


def cut_model(model, plan: Plan):
    """A new, smaller `NemotronHForCausalLM` with the weights of `model` cut to `plan` (same dtype and device)."""
    layout = Layout.from_config(model.config)
    plan.check_expert_strides(layout, next(model.parameters()).dtype)
    new_layout, state = prune_state_dict(model_state_dict(model), layout, plan)
    new = build_model(new_layout, model.config.to_dict())
    new.load_state_dict(state, strict=True, assign=True)
    new.train(model.training)
    return new


def cut_checkpoint(
    source: str | Path | Checkpoint,
    plan: Plan,
    out: str | Path,
    *,
    overwrite: bool = False,
    max_shard_bytes: int = SHARD_BYTES,
    progress: bool = True,
    extra_files: dict[str, str] | None = None,
) -> Path:
    """Stream `source` through `plan` into a standard checkpoint at `out`, one tensor in memory at a time.

    The output has a native config, sharded safetensors with an index, and the source's tokenizer and generation
    config; it is written to a temporary folder and renamed into place.
    """
    ckpt = source if isinstance(source, Checkpoint) else Checkpoint(source)
    plan.check_expert_strides(ckpt.layout, ckpt.dtype())
    cutter = Cutter(ckpt.layout, plan)
    names = [n for n in ckpt.keys() if cutter.output_name(n) is not None]
    with atomic_dir(out, overwrite) as tmp:
        writer = ShardWriter(tmp, max_shard_bytes)
        dtype = None
        for name in track(names, "cutting weights", progress, transient=True):
            t = ckpt.get(name)
            dtype = dtype or (t.dtype if t.is_floating_point() and not keeps_float32(name) else None)
            writer.add(cutter.output_name(name), cutter.cut(name, t))
            del t
        writer.close()
        write_config(tmp, cutter.dst.to_config(ckpt.config), dtype)
        copy_tokenizer(ckpt.path, tmp)
        (tmp / "prune_plan.json").write_text(_plan_json(plan, ckpt.layout, cutter.dst))
        for fname, text in (extra_files or {}).items():
            (tmp / fname).write_text(text)
    return Path(out)


def _plan_json(plan: Plan, src: Layout, dst: Layout) -> str:

    return json.dumps(
        {
            "source": {"pattern": src.pattern, "params": src.num_params()},
            "result": {"pattern": dst.pattern, "params": dst.num_params(), **dst.summary()},
            "plan": plan.to_dict(),
        },
        indent=1,
    )
