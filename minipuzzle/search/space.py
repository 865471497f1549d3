"""The search space: which widths each axis may take and how many layers of each kind may stay.

Axes: `depth` (drop whole layers; the top-ranked layers of each kind stay) and the width axes of
`minipuzzle.anatomy` (ffn, mamba_heads, mamba_head_dim, attn_heads, hidden; on mixture-of-experts sources also
experts, expert_ffn, shared_ffn), each a multiple of its `Axis.unit` (grouped axes keep the same count in every
group). Widths are uniform across the layers of a kind so the result stays a plain Nemotron-H config. MiniPuzzle
searched depth + ffn, the default here.

Mixture-of-experts sources add a fourth layer kind, `E`, whose count is searched like the others. Their expert
axes follow what serving needs: experts stay a multiple of `n_group` (the same count in every router group) and
at least what the router needs (two per group, `num_experts_per_tok` within the `topk_group` groups it picks
from), so `num_experts_per_tok` never has to change; FP8 / FP4 (NVFP4, scales per 16 values) kernels want expert
widths in multiples of 16, so the default steps of `expert_ffn` and `shared_ffn` are multiples of 16 (every width
searched is then one when the source's is: Nemotron 3's are); an explicit `--step` or `--widths` may choose
otherwise.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from minipuzzle.anatomy import AXES, KINDS, MOE, SEARCH_AXES, WIDTH_AXES, cut_multiple
from minipuzzle.arch import LAYER_KINDS, Layout
from minipuzzle.errors import UserError

DEFAULT_AXES = ("depth", "ffn")
# With at most this many valid widths an axis is searched at every valid width by default (tiny models).
EVERY_WIDTH_LIMIT = 128
# Otherwise the default step is about 1/32 of the width: the paper's FFN step, 1024 of 32768.
DEFAULT_STEP_FRACTION = 1 / 32
# FP8 / FP4 expert kernels work on blocks of 16 channels: the default steps of the expert widths are multiples of it.
SERVING_MULTIPLE = {"expert_ffn": 16, "shared_ffn": 16}


def parse_axes(axes: str | Iterable[str] | None) -> tuple[str, ...]:
    """'depth,ffn' or a list -> validated axis names in canonical order. An unknown axis is a UserError."""
    if axes is None:
        return DEFAULT_AXES
    items = [a.strip() for a in axes.split(",")] if isinstance(axes, str) else [str(a).strip() for a in axes]
    items = [a for a in items if a]
    if not items:
        raise UserError(f"--axes is empty: choose from {', '.join(SEARCH_AXES)}")
    unknown = [a for a in items if a not in SEARCH_AXES]
    if unknown:
        raise UserError(f"unknown axis {unknown[0]!r}: choose from {', '.join(SEARCH_AXES)}")
    return tuple(a for a in SEARCH_AXES if a in items)


def search_kinds(layout: Layout) -> tuple[str, ...]:
    """The layer kinds whose counts a search over `layout` decides: the dense ones, and `E` for MoE sources."""
    return LAYER_KINDS if layout.is_moe else KINDS


def layout_axes(layout: Layout) -> tuple[str, ...]:
    """The width axes that describe `layout`: the MoE ones only when it has MoE layers (reports of dense models
    name the dense axes alone)."""
    return tuple(a for a in WIDTH_AXES if layout.is_moe or AXES[a].kind != MOE)


def default_step(layout: Layout, axis: str) -> int:
    """Step between searched widths: every valid width for small axes, else ~1/32 of the width in whole units
    (multiples of 16 for the expert widths: `SERVING_MULTIPLE`)."""
    full, unit = AXES[axis].width(layout), cut_multiple(layout, axis)
    align = math.lcm(unit, SERVING_MULTIPLE.get(axis, 1))
    if full // unit <= EVERY_WIDTH_LIMIT:
        return align
    return max(align, round(full * DEFAULT_STEP_FRACTION / align) * align)


def smallest_width(layout: Layout, axis: str) -> int:
    """The narrowest width `layout` stays valid at on `axis`: one unit per group; for experts, what the router
    needs without changing `num_experts_per_tok` (two per group, and top-k within the `topk_group` groups)."""
    unit = AXES[axis].unit(layout)
    if axis != "experts":
        return unit
    return unit * max(2, math.ceil(layout.num_experts_per_tok / layout.topk_group))


def width_options(layout: Layout, axis: str, step: int | None = None, min_fraction: float = 0.5) -> list[int]:
    """Widths searched on `axis`, largest (the source's) first: full, full - step, ... down to min_fraction, each
    one the cut accepts (`anatomy.cut_multiple`)."""
    full, unit = AXES[axis].width(layout), cut_multiple(layout, axis)
    step = default_step(layout, axis) if step is None else int(step)
    if step < 1 or step % unit:
        raise UserError(f"step {step} for {axis} must be a positive multiple of {unit}{_why_multiple(layout, axis)}")
    lowest = max(smallest_width(layout, axis), math.ceil(full * min_fraction))
    return [w for w in range(full, lowest - 1, -step) if w > 0 and (w == full or w % unit == 0)]


def _why_multiple(layout: Layout, axis: str) -> str:
    """The reason for a multiple beyond the axis's groups, for error messages ('' when there is none)."""
    if cut_multiple(layout, axis) == AXES[axis].unit(layout):
        return ""
    return " (transformers' grouped expert matmul needs 16-byte strides in bf16)"


def listed_widths(layout: Layout, axis: str, values: Iterable[int]) -> list[int]:
    """An explicit list of widths for `axis` (`--widths`), checked and largest first: each a multiple of the
    axis's unit, at least `smallest_width` and at most the source's width (pruning never widens)."""
    full, unit, least = AXES[axis].width(layout), cut_multiple(layout, axis), smallest_width(layout, axis)
    values = sorted({int(w) for w in values}, reverse=True)
    if not values:
        raise UserError(f"--widths {axis}= lists no width")
    for w in values:
        if (w % unit and w != full) or not least <= w <= full:
            raise UserError(
                f"--widths {axis}={w}: widths of {axis} must be multiples of {unit} from {least} to the source's "
                f"{full}{_why_multiple(layout, axis)}"
            )
    return values


@dataclass
class SearchSpace:
    """Every layout reachable from `source`: one width per searched axis and a layer count per kind.

    widths[axis]: allowed widths, largest first (axes not searched hold the source width only).
    layers[kind]: (lowest, highest) number of layers of that kind kept (both the source count without depth).
    """

    source: Layout
    axes: tuple[str, ...]
    widths: dict[str, list[int]]
    layers: dict[str, tuple[int, int]]
    steps: dict[str, int] = field(default_factory=dict)

    @classmethod
    def build(
        cls,
        source: Layout,
        axes: str | Iterable[str] | None = None,
        steps: dict[str, int] | None = None,
        min_width: float = 0.5,
        min_layers: float = 0.5,
        widths: dict[str, Iterable[int]] | None = None,
    ) -> SearchSpace:
        """The space for `axes` with widths down to `min_width` and at least `min_layers` of each kind kept
        (fractions of the source). `steps` overrides the default step of an axis; `widths` lists an axis's widths
        outright (`--widths expert_ffn=1536,1792,1856`), `min_width` aside."""
        axes = parse_axes(axes)
        steps, listed = dict(steps or {}), dict(widths or {})
        _check_width_options(source, axes, steps, listed)
        if not 0 < min_width <= 1 or not 0 <= min_layers <= 1:
            raise UserError("--min-width must be in (0, 1] and --min-layers in [0, 1]")
        options, used_steps = {}, {}
        for a in WIDTH_AXES:
            if a in listed:
                options[a] = listed_widths(source, a, listed[a])
            elif a in axes and _axis_present(source, a):
                used_steps[a] = steps.get(a, default_step(source, a))
                options[a] = width_options(source, a, used_steps[a], min_width)
            else:
                options[a] = [AXES[a].width(source)]
        layers = {}
        for kind in search_kinds(source):
            n = source.count(kind)
            lo = math.ceil(n * min_layers) if "depth" in axes else n
            # A kind the source has keeps at least one layer: a Nemotron-H without it is another architecture.
            layers[kind] = (max(lo, 1 if n else 0), n)
        return cls(source, axes, options, layers, used_steps)

    @property
    def kinds(self) -> tuple[str, ...]:
        """The layer kinds whose counts are searched (`search_kinds` of the source)."""
        return tuple(self.layers)

    def width_combos(self) -> Iterator[dict[str, int]]:
        """Every combination of widths, as {axis: width}."""
        names = list(WIDTH_AXES)
        for values in itertools.product(*(self.widths[a] for a in names)):
            yield dict(zip(names, values))

    def num_width_combos(self) -> int:
        return math.prod(len(v) for v in self.widths.values())

    def num_layer_combos(self) -> int:
        return math.prod(hi - lo + 1 for lo, hi in self.layers.values())

    def size(self) -> int:
        """Number of layouts in the space (width combinations x layer-count combinations)."""
        return self.num_width_combos() * self.num_layer_combos()

    def layout(self, widths: dict[str, int], counts: dict[str, int]) -> Layout:
        """The layout with these widths and layer counts. Only the counts matter for costs, so the pattern is
        `pattern_with_counts`'s; which layers really stay is `DamageModel.kept_layers`."""
        return self.source.replace(
            pattern=pattern_with_counts(self.source.pattern, counts),
            **{AXES[a].field: w for a, w in widths.items()},
        )

    def describe(self) -> dict:
        """JSON-ready summary (for reports and --dry-run)."""
        return {
            "axes": list(self.axes),
            # An axis whose layers the source lacks (ffn on Nemotron 3, which has no MLP layers) has one width.
            "widths": {a: _span(v) for a, v in self.widths.items() if a in self.axes and _axis_present(self.source, a)},
            "steps": self.steps,
            "layers": {k: {"min": lo, "max": hi} for k, (lo, hi) in self.layers.items() if hi},
            "width_combinations": self.num_width_combos(),
            "layer_combinations": self.num_layer_combos(),
            "size": self.size(),
        }


def pattern_with_counts(pattern: str, counts: dict[str, int]) -> str:
    """A pattern with `counts[kind]` layers of each kind, in source order (the last ones of each kind dropped).

    Costs depend only on the counts; the real kept layers are chosen by importance (`DamageModel.kept_layers`).
    """
    seen = dict.fromkeys(LAYER_KINDS, 0)
    out = []
    for ch in pattern:
        if seen[ch] < counts.get(ch, 0):
            out.append(ch)
        seen[ch] += 1
    return "".join(out)


def _check_width_options(source: Layout, axes: tuple[str, ...], steps: dict, listed: dict) -> None:
    """--step and --widths name width axes that the space searches on this source, each axis in one of them."""
    for option, given in (("--step", steps), ("--widths", listed)):
        for a in given:
            if a not in WIDTH_AXES:
                raise UserError(f"unknown axis {a!r} in {option}: choose from {', '.join(WIDTH_AXES)}")
            if option == "--widths" and (a not in axes or not _axis_present(source, a)):
                raise UserError(
                    f"--widths gives {a}, which this search does not cut (add it to --axes; the model needs layers "
                    f"it shapes)"
                )
    both = sorted(set(steps) & set(listed))
    if both:
        raise UserError(f"{both[0]} has both a --step and --widths: give one of them")


def _axis_present(layout: Layout, axis: str) -> bool:
    kind = AXES[axis].kind
    return kind is None or layout.count(kind) > 0


def _span(values: list[int]) -> dict:
    """max, min, step and count of evenly spaced widths; an uneven list (`--widths`) gives its values instead of
    a step."""
    gaps = {a - b for a, b in zip(values, values[1:])}
    if len(gaps) > 1:
        return {"max": values[0], "min": values[-1], "values": list(values), "count": len(values)}
    if len(values) > 1:
        return {"max": values[0], "min": values[-1], "step": values[0] - values[1], "count": len(values)}
    return {"max": values[0], "min": values[0], "step": 0, "count": 1}
