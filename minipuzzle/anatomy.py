"""Nemotron-H's anatomy: the prunable axes, and where each unit of an axis lives in the weights.

This is the one place that says what a "unit" is. Scoring reads a unit's activation, the search picks how many
units stay, the plan names which ones, the cut cuts them: all four name axes as `AXES` does here.

Layer kinds (one character per layer in a layout's pattern, `minipuzzle.kinds`): `M` Mamba-2 mixer, `*` attention,
`-` MLP, `E` mixture of experts (Nemotron 3: routed experts behind a grouped router, and a shared expert).

Prunable axes, with the `Layout` field each sets and where a unit lives (native weight names under
`model.layers.{i}.mixer.`; I = mamba heads x head_dim, P = head_dim, d = attention head_dim):

- `ffn` (intermediate_size, MLP layers): channel c is row c of `up_proj` and column c of `down_proj`.
- `mamba_heads` (mamba_num_heads, Mamba layers): head h is channels h*P .. h*P+P-1 of I: those rows of the z and
  x blocks of `in_proj` and of the x block of `conv1d`, row h of the dt block of `in_proj`, entry h of `A_log`,
  `D` and `dt_bias`, those entries of the gated `norm`, those columns of `out_proj`. Heads belong to B/C groups
  (heads / n_groups contiguous heads each); B and C are never cut, so every group keeps the same number of heads.
- `mamba_head_dim` (mamba_head_dim, Mamba layers): channel p of every head at once (channels h*P + p for all h),
  in the same places as a head's channels. The same channels go in every head, so one score vector per layer.
- `attn_heads` (num_attention_heads, attention layers): query head q is rows q*d .. q*d+d-1 of `q_proj` and those
  columns of `o_proj`; K and V stay. Query heads belong to KV groups (heads / kv_heads contiguous heads each), and
  every group keeps the same number.
- `hidden` (hidden_size, every layer): residual channel j is column j of the embeddings, `lm_head` and every input
  projection, row j of every output projection, entry j of every RMSNorm over the hidden size.
- `experts` (n_routed_experts, MoE layers): routed expert e is row e of the router `gate` and of its
  `e_score_correction_bias`, and expert e's matrices in `experts.up_proj` / `experts.down_proj`. Experts belong to
  the router's `n_group` contiguous groups, and every group keeps the same number.
- `expert_ffn` (moe_intermediate_size, MoE layers): channel c of every routed expert, row c of its `up_proj` and
  column c of its `down_proj` (or, per expert, each expert's own channels: `PER_EXPERT_CHANNELS`).
- `shared_ffn` (moe_shared_expert_intermediate_size, MoE layers): channel c of the shared expert, row c of
  `shared_experts.up_proj` and column c of `shared_experts.down_proj`.

`depth` (dropping whole layers) is a search axis but not a width: `SEARCH_AXES` lists it first.

Adding a width axis is one `Axis` entry here, its scoring hook (`score.width.SCORERS`) and its cutting
function (`cut.CUTS`); the search space, damage model, unit choice, plans, scores file and reports loop over
`AXES`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from minipuzzle.arch import Layout
from minipuzzle.kinds import ATTENTION, KIND_NAMES, MAMBA, MLP, MOE
from minipuzzle.kinds import KINDS as KINDS  # re-exported: reports list kinds from here

# Kinds that keep a cache, and so may lead a pruned model. transformers 5.25.0 asks layer 0 of the cache for the
# sequence length on every cached forward (the default, and generate()); an MLP or MoE layer there holds no cache
# and the forward crashes. A cut never makes such a layer first: it keeps it first only where the source has it.
LEADING_KINDS = (MAMBA, ATTENTION)


def leading_layer_problem(pattern: str, layers: list[int]) -> str | None:
    """Why keeping source `layers` (ascending) of `pattern` would put a layer without a cache first, or None."""
    first = layers[0] if layers else 0
    if first == 0 or pattern[first] in LEADING_KINDS:
        return None
    return (
        f"plan drops layers 0..{first - 1} and leaves layer {first}, a {KIND_NAMES[pattern[first]]} layer, first: "
        f"cached forwards and generate() of such a model fail in transformers 5.25; keep a Mamba or attention "
        f"layer before it"
    )


@dataclass(frozen=True)
class Axis:
    """One prunable width axis.

    name: the one name (plan field, `Scores` attribute, report key, search axis). field: the `Layout` field it
    sets. kind: the layer kind whose weights it shapes, None for `hidden` (every layer). group_field: the `Layout`
    field counting the contiguous groups that must keep equal numbers of units (None: ungrouped). doc: what a
    unit is.
    """

    name: str
    field: str
    kind: str | None
    doc: str
    group_field: str | None = None

    def width(self, layout: Layout) -> int:
        """Units on this axis in `layout` (per layer for layer axes)."""
        return getattr(layout, self.field)

    def unit(self, layout: Layout) -> int:
        """The grouping rule: units fall in this many contiguous equal groups, each keeping the same count, so a
        width is a multiple of it (1 for ungrouped axes)."""
        return getattr(layout, self.group_field) if self.group_field else 1


AXES: dict[str, Axis] = {
    a.name: a
    for a in (
        Axis("ffn", "intermediate_size", MLP, "MLP intermediate channel"),
        Axis("mamba_heads", "mamba_num_heads", MAMBA, "Mamba head (within its B/C group)", "n_groups"),
        Axis("mamba_head_dim", "mamba_head_dim", MAMBA, "channel of every Mamba head"),
        Axis("attn_heads", "num_attention_heads", ATTENTION, "query head (within its KV group)", "num_key_value_heads"),
        Axis("hidden", "hidden_size", None, "residual-stream channel"),
        Axis("experts", "n_routed_experts", MOE, "routed expert (within its router group)", "n_group"),
        Axis("expert_ffn", "moe_intermediate_size", MOE, "channel of every routed expert"),
        Axis("shared_ffn", "moe_shared_expert_intermediate_size", MOE, "shared-expert channel"),
    )
}
WIDTH_AXES = tuple(AXES)

# transformers runs routed experts through a grouped matmul that needs 16-byte strides: a width the experts read or
# produce must be a multiple of 16 / itemsize (8 in bf16, the narrowest dtype a checkpoint is cut in).
GROUPED_MM_BYTES = 16
BF16_BYTES = 2


def cut_multiple(layout: Layout, axis: str, itemsize: int = BF16_BYTES) -> int:
    """Every width of `axis` other than the source's that the cut accepts (in a dtype of `itemsize` bytes) is a
    multiple of this: the axis's grouping unit, and on MoE sources the grouped expert matmul's multiple for the
    routed experts' width and for the hidden size when the experts read it (no latent projection)."""
    unit = AXES[axis].unit(layout)
    experts_read_it = axis == "expert_ffn" or (axis == "hidden" and not layout.moe_latent_size)
    if layout.is_moe and experts_read_it:
        return math.lcm(unit, max(1, GROUPED_MM_BYTES // itemsize))
    return unit
# Width axes scored and cut per layer (one index list per layer of their kind); `hidden` is one list for all.
LAYER_AXES = tuple(name for name, axis in AXES.items() if axis.kind is not None)
SEARCH_AXES = ("depth", *WIDTH_AXES)
# expert_ffn's second form: each routed expert's own channels, an [n_routed_experts, moe_intermediate_size] score
# table per MoE layer and one kept list per source expert in a plan (the per-expert channel choice).
PER_EXPERT_CHANNELS = "expert_channels"


def axes_of_kind(kind: str) -> tuple[str, ...]:
    """The layer axes that shape layers of `kind` ('M' -> mamba_heads, mamba_head_dim)."""
    return tuple(name for name in LAYER_AXES if AXES[name].kind == kind)


def mamba_in_proj_slices(layout: Layout) -> dict[str, slice]:
    """Row blocks of a Mamba layer's `in_proj` [z | x | B | C | dt]: z, x [I] each, B, C [groups x state] each,
    dt [heads]."""
    inner, bc = layout.mamba_intermediate, layout.n_groups * layout.ssm_state_size
    return _blocks({"z": inner, "x": inner, "B": bc, "C": bc, "dt": layout.mamba_num_heads})


def mamba_conv_slices(layout: Layout) -> dict[str, slice]:
    """Channel blocks of a Mamba layer's depthwise `conv1d` [x | B | C] (the conv runs over in_proj's x, B, C)."""
    inner, bc = layout.mamba_intermediate, layout.n_groups * layout.ssm_state_size
    return _blocks({"x": inner, "B": bc, "C": bc})


def mamba_channels(layout: Layout, heads: list[int], head_channels: list[int]) -> list[int]:
    """Indices into I (the z, x, gated-norm and out_proj width) of channels `head_channels` of heads `heads`."""
    p = layout.mamba_head_dim
    return [h * p + c for h in heads for c in head_channels]


def attention_rows(layout: Layout, heads: list[int]) -> list[int]:
    """Rows of `q_proj` (columns of `o_proj`) that hold query heads `heads`."""
    d = layout.head_dim
    return [h * d + c for h in heads for c in range(d)]


def _blocks(sizes: dict[str, int]) -> dict[str, slice]:
    out, start = {}, 0
    for name, size in sizes.items():
        out[name] = slice(start, start + size)
        start += size
    return out
