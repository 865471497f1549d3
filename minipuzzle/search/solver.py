"""Find the layouts with the least predicted damage that fit a budget.

Every layout is (one width per axis, a number of layers kept per kind); the layers kept are the top-ranked of each
kind. For fixed widths, parameters, active parameters (mixture-of-experts models: a token runs
`num_experts_per_tok` of the routed experts, which the space never cuts below) and memory are linear in the layer
counts, and the predicted damage is a sum over kept layers (see `damage`). Two exact methods:

* `enumerate` (small spaces): every width combination at once in numpy; for each, every count of all kinds but
  the most numerous, whose count is then the largest that fits (keeping a layer never adds damage).
* `mip` (large spaces): for each hidden width, a multiple-choice integer program solved by HiGHS: per layer kind,
  one binary per (widths of that kind, layer count) option, exactly one option per kind, the budgets as linear
  constraints, maximising the kept value. The next-best solutions come from no-good cuts.

Candidates (the "pool") are the layouts that fit the budget and either lie in the band below it (use at least
(1 - band) of the parameter, active-parameter or memory limit, whichever the budget has; with several, one of them
suffices, since only one of them binds) or are maximal (no kind can keep one more layer and no axis can take its
next larger width). Maximal layouts below the band stay in: nothing bigger of the same kind fits, so they are not
dominated, and coarse spaces (a tiny model, where one layer is more than the band) would otherwise have no
candidate at all; with band 0 the pool is exactly the maximal layouts. MiniPuzzle kept every layout its memory
filter let through (~400 for 56B -> 47B), not only the largest: the published 47B leaves room for one more layer.

A `family` restricts the search to layouts that cut, or leave whole, given groups of the space (`Family`); prune
uses it to find the best layout of each structural family (`search.diversity`).
"""

from __future__ import annotations

import heapq
import math
import os
import sys
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from minipuzzle.anatomy import AXES, KIND_NAMES, MOE, WIDTH_AXES, axes_of_kind
from minipuzzle.arch import LAYER_KINDS, Layout
from minipuzzle.checkpoint.dtypes import PRECISION_BITS
from minipuzzle.errors import UserError
from minipuzzle.search.budget import Budget
from minipuzzle.search.damage import DamageModel
from minipuzzle.search.space import SearchSpace

# Imports inside functions here are of optional packages (Model Optimizer, lm-eval, matplotlib, the MIP solver),
# loaded only where a feature uses them.

# Above this many (width combination x layer count) points the MIP is used instead of enumeration.
ENUM_LIMIT = 50_000_000
# Points (width combinations x counts of the kinds but the last) handled at once by the enumeration.
_CHUNK_POINTS = 2_000_000
# Linear memory model vs Layout.memory's byte rounding: a few bytes of slack, then an exact re-check.
_MEM_SLACK = 16.0
# Default band below the budget whose layouts are candidates (a fraction of each limit).
DEFAULT_BAND = 0.05
# What a layout costs and a budget may limit: parameters, active parameters (MoE), memory in bytes.
RESOURCES = ("params", "active", "memory")
# {names: cut}: the layout cuts at least one of `names` (True) or none of them (False). A name is "depth" (a layer
# of some kind dropped) or a width axis (narrower than the source's).
Family = dict[tuple[str, ...], bool]


def _cost_axes(kind: str) -> tuple[str, ...]:
    """The axes a layer of `kind` costs depend on: its own axes and hidden."""
    return (*axes_of_kind(kind), "hidden")


@dataclass
class Candidate:
    """One layout: widths per axis, layers kept per kind, its predicted damage and its costs."""

    widths: dict[str, int]
    counts: dict[str, int]
    damage: float
    params: int = 0
    memory: int | None = None
    extra: dict = field(default_factory=dict)
    active_params: int | None = None  # mixture-of-experts layouts only

    def key(self) -> tuple:
        return tuple(self.widths[a] for a in WIDTH_AXES) + tuple(self.counts.get(k, 0) for k in LAYER_KINDS)

    def to_dict(self) -> dict:
        """JSON-ready; the MoE layer count, widths and active parameters only for mixture-of-experts layouts
        (`counts` has an `E` entry exactly when the source has MoE layers)."""
        moe = MOE in self.counts
        out = {
            "widths": {a: w for a, w in self.widths.items() if moe or AXES[a].kind != MOE},
            "layers": {KIND_NAMES[kind]: self.counts[kind] for kind in LAYER_KINDS if kind in self.counts},
            "predicted_damage": self.damage,
            "params": self.params,
        }
        if self.active_params is not None:
            out["active_params"] = self.active_params
        if self.memory is not None:
            out["memory"] = self.memory
        out.update(self.extra)
        return out


class LayerCosts:
    """Per-layer costs (`RESOURCES`: parameters, active parameters, memory) of each kind, tabulated over that
    kind's width options.

    Options are indexed per axis (`idx[axis]`: an array of indices into `space.widths[axis]`, one per width
    combination), so a whole batch of combinations is costed at once.
    """

    def __init__(self, space: SearchSpace, budget: Budget):
        self.space, self.budget = space, budget
        src = space.source
        self.weight_bytes = PRECISION_BITS[budget.precision.lower()] / 8
        self.tables = {kind: self._tabulate(kind) for kind in space.kinds}
        embedding = np.array(
            [src.replace(hidden_size=h).embedding_params() for h in space.widths["hidden"]], dtype=np.int64
        )
        # Embeddings and LM head count whole in the active parameters too (`Layout.num_active_params`).
        self.fixed_costs = {
            "params": embedding,
            "active": embedding,
            "memory": embedding * self.weight_bytes + _MEM_SLACK,
        }

    def _tabulate(self, kind: str) -> dict[str, np.ndarray]:
        """Per resource, the cost of one `kind` layer over the grid of its cost axes' options."""
        axes = _cost_axes(kind)
        shape = [len(self.space.widths[a]) for a in axes]
        table = {
            "params": np.zeros(shape, dtype=np.int64),
            "active": np.zeros(shape, dtype=np.int64),
            "memory": np.zeros(shape, dtype=np.float64),
        }
        for idx in np.ndindex(*shape):
            widths = {AXES[a].field: self.space.widths[a][j] for a, j in zip(axes, idx)}
            one = self.space.source.replace(pattern=kind, **widths)
            table["params"][idx] = one.layer_params(kind)
            table["active"][idx] = one.layer_params(kind, active=True)
            # The state a layer adds (KV cache, SSM and conv state): two layers minus one, weights aside.
            m1, m2 = self.budget.memory_of(one), self.budget.memory_of(one.replace(pattern=kind * 2))
            state = (m2["total"] - m2["weights"]) - (m1["total"] - m1["weights"])
            table["memory"][idx] = table["params"][idx] * self.weight_bytes + state
        return table

    def per_layer(self, kind: str, idx: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Per resource, the cost [C] of one layer of `kind` at the combos given by option indices `idx[axis]`."""
        key = tuple(idx[a] for a in _cost_axes(kind))
        return {res: table[key] for res, table in self.tables[kind].items()}

    def fixed(self, idx: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Per resource, the cost [C] of the embeddings, final norm and LM head at the combos `idx`."""
        return {res: table[idx["hidden"]] for res, table in self.fixed_costs.items()}

    def total(self, idx: dict[str, np.ndarray], counts: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Per resource, the cost [C, G] of the layouts with widths `idx` [C] and `counts[kind]` layers
        ([G] or [C, G], broadcast); memory as the linear model (with its slack)."""
        fixed = self.fixed(idx)
        out = {res: fixed[res][:, None].astype(np.float64) for res in RESOURCES}
        for kind, count in counts.items():
            layer = self.per_layer(kind, idx)
            for res in RESOURCES:
                out[res] = out[res] + layer[res][:, None] * count
        return out


def budget_limits(budget: Budget) -> dict[str, float]:
    """The limit on each of `RESOURCES` (memory in bytes), infinite where the budget sets none."""
    given = {"params": budget.params, "active": budget.active_params, "memory": budget.memory}
    return {res: float(limit) if limit is not None else math.inf for res, limit in given.items()}


def _within(limits: dict[str, float], costs: dict[str, np.ndarray]) -> np.ndarray:
    """Where every cost is within its limit."""
    ok = np.array(True)
    for res, limit in limits.items():
        ok = ok & (costs[res] <= limit)
    return ok


def _keep_values(model: DamageModel, kind: str, idx: dict[str, np.ndarray]) -> np.ndarray:
    """[C, N_kind + 1] prefix sums of the kept value of the top-n layers of `kind`, for each combo."""
    order = model.order[kind]
    n_combos = len(idx["hidden"])
    vals = np.broadcast_to(model.depth[order][None, :], (n_combos, len(order))).copy()
    for axis in _cost_axes(kind):
        if axis not in model.scored_axes:
            continue
        widths = model.space.widths[axis]
        if axis == "hidden":
            keep = np.array([1.0 - model.dropped_fraction(axis, w) for w in widths])
            vals *= keep[idx[axis]][:, None]
        else:
            keep = np.array([[1.0 - model.dropped_fraction(axis, w, i) for w in widths] for i in order])  # [N, opts]
            vals *= keep[:, idx[axis]].T
    return np.concatenate([np.zeros((n_combos, 1)), np.cumsum(vals, axis=1)], axis=1)


def search(
    space: SearchSpace,
    budget: Budget,
    model: DamageModel,
    k: int = 8,
    method: str = "auto",
    band: float = DEFAULT_BAND,
    family: Family | None = None,
) -> list[Candidate]:
    """The `k` layouts of the pool (see the module docstring: within `band` of the budget, or maximal) with the
    least predicted damage, best first; only those of `family` when given.

    method: "enumerate", "mip" or "auto" (enumerate up to ENUM_LIMIT points). Raises UserError when no layout in
    the space fits; with a `family`, an empty list when none of it is in the pool.
    """
    check_band(band)
    if method == "auto":
        method = "enumerate" if _enum_points(space) <= ENUM_LIMIT else "mip"
    if method not in ("enumerate", "mip"):
        raise UserError(f"unknown search method {method!r}: choose auto, enumerate or mip")
    costs = LayerCosts(space, budget)
    solve = _enumerate if method == "enumerate" else _mip
    out = []
    for cand in solve(space, budget, model, costs, k, band, family or {}):
        # The exact check behind the linear memory model's rounding slack; never expected to fail.
        if not in_pool(space, budget, cand.widths, cand.counts, band):
            continue
        if family and not in_family(space, cand.widths, cand.counts, family):
            raise AssertionError(f"the solver returned a layout outside {family}: {cand.widths} {cand.counts}")
        lay = space.layout(cand.widths, cand.counts)
        cand.params = lay.num_params()
        cand.active_params = lay.num_active_params() if lay.is_moe else None
        cand.memory = budget.memory_of(lay)["total"]
        cand.extra["method"] = method
        out.append(cand)
    if not out and not family:
        no_layout_fits(space, budget)
    return out


def cuts(space: SearchSpace, name: str, widths: dict[str, int], counts: dict[str, int]) -> bool:
    """The layout drops a layer (`name` "depth") or narrows axis `name` below the source's width."""
    if name == "depth":
        return any(counts[kd] < hi for kd, (_, hi) in space.layers.items())
    return widths[name] < AXES[name].width(space.source)


def in_family(space: SearchSpace, widths: dict[str, int], counts: dict[str, int], family: Family) -> bool:
    """The layout cuts one of each group of `family` marked True and none of those marked False."""
    return all(any(cuts(space, n, widths, counts) for n in names) == cut for names, cut in family.items())


def _family_mask(space: SearchSpace, family: Family, idx: dict[str, np.ndarray], counts: dict[str, np.ndarray]):
    """[P] bool: `in_family` of P points at width options `idx[axis]` [P] with `counts[kind]` [P] layers."""
    ok = np.ones(len(idx["hidden"]), dtype=bool)
    for names, cut in family.items():
        hit = np.zeros_like(ok)
        for name in names:
            if name == "depth":
                for kd, n in counts.items():
                    hit |= n < space.layers[kd][1]
            else:
                hit |= (np.array(space.widths[name]) < AXES[name].width(space.source))[idx[name]]
        ok &= hit == cut
    return ok


def no_layout_fits(space: SearchSpace, budget: Budget):
    """Raise the UserError for a budget that even the smallest layout of `space` misses."""
    small = smallest_layout(space)
    active = f"{small.num_active_params():,} active, " if budget.active_params is not None else ""
    raise UserError(
        f"no layout in the search space meets the budget ({budget.describe()}): the smallest has "
        f"{small.num_params():,} parameters, {active}{budget.memory_of(small)['total'] / 2**30:.2f} GiB; widen the "
        f"space (--axes, --min-width, --min-layers) or relax the budget"
    )


def smallest_layout(space: SearchSpace) -> Layout:
    """The narrowest widths and fewest layers of `space`: the least of every resource, active parameters included
    (each is non-decreasing in every width and count)."""
    return space.layout({a: v[-1] for a, v in space.widths.items()}, {k: lo for k, (lo, _) in space.layers.items()})


def _enum_points(space: SearchSpace) -> int:
    ranges = sorted((hi - lo + 1 for lo, hi in space.layers.values()), reverse=True)
    return space.num_width_combos() * math.prod(ranges[1:])


@dataclass
class _Chunk:
    """Width combos [C] x counts of every kind but `last` [G]: costs so far and the most `last` layers that fit."""

    idx: dict[str, np.ndarray]
    grids: list[np.ndarray]  # [G] counts of each of `others`
    others: list[str]
    last: str
    used: dict[str, np.ndarray]  # resource -> [C, G] cost without the `last` layers (memory: linear, with slack)
    per: dict[str, dict[str, np.ndarray]]  # kind -> resource -> per-layer cost [C]
    n_max: np.ndarray  # [C, G] most `last` layers that fit (int, clipped to its range)
    fits: np.ndarray  # [C, G] bool: the point fits with at least the fewest `last` layers


def _chunks(space: SearchSpace, budget: Budget, costs: LayerCosts, target: int = _CHUNK_POINTS):
    """Every (width combo, counts of all kinds but the most numerous) point of `space`, in `_Chunk`s."""
    limits = budget_limits(budget)
    shape = [len(space.widths[a]) for a in WIDTH_AXES]
    total = math.prod(shape)
    kinds = [kd for kd in space.kinds if space.layers[kd][1] > 0]
    last = max(kinds, key=lambda kd: space.layers[kd][1] - space.layers[kd][0])
    others = [kd for kd in kinds if kd != last]
    grids = np.meshgrid(*[np.arange(space.layers[kd][0], space.layers[kd][1] + 1) for kd in others], indexing="ij")
    grids = [grid.reshape(-1) for grid in grids] if others else []
    n_grid = len(grids[0]) if grids else 1
    step = max(1, target // n_grid)
    lo, hi = space.layers[last]
    for start in range(0, total, step):
        flat = np.arange(start, min(total, start + step))
        idx = dict(zip(WIDTH_AXES, np.unravel_index(flat, shape)))
        used = costs.total(idx, {kd: n[None, :] for kd, n in zip(others, grids)})
        used = {res: np.broadcast_to(cost, (len(flat), n_grid)) for res, cost in used.items()}
        per = {kd: costs.per_layer(kd, idx) for kd in kinds}
        n_max = np.full((len(flat), n_grid), float(hi))
        for res, limit in limits.items():
            n_max = np.minimum(n_max, np.floor((limit - used[res]) / per[last][res][:, None]))
        fits = n_max >= lo
        n_max = np.clip(n_max, lo, hi).astype(np.int64)
        yield _Chunk(idx, grids, others, last, used, per, n_max, fits)


def _maximal(space: SearchSpace, budget: Budget, costs: LayerCosts, ch: _Chunk) -> np.ndarray:
    """[C, G] bool: the point with `n_max` layers of `last` is maximal (see `is_maximal`)."""
    limits = budget_limits(budget)
    last_cost = ch.per[ch.last]
    totals = {res: ch.used[res] + last_cost[res][:, None] * ch.n_max for res in RESOURCES}
    ok = ch.fits.copy()
    for kd, n in zip(ch.others, ch.grids):
        room = _within(limits, {res: totals[res] + ch.per[kd][res][:, None] for res in RESOURCES})
        ok &= ~(room & (n[None, :] < space.layers[kd][1]))
    counts = {kd: n[None, :] for kd, n in zip(ch.others, ch.grids)} | {ch.last: ch.n_max}
    for axis in WIDTH_AXES:
        if len(space.widths[axis]) < 2:
            continue
        wider = dict(ch.idx)
        wider[axis] = np.maximum(ch.idx[axis] - 1, 0)  # options are largest first: one step wider
        ok &= ~((ch.idx[axis] > 0)[:, None] & _within(limits, costs.total(wider, counts)))
    return ok


def _pool_low(space: SearchSpace, budget: Budget, costs: LayerCosts, ch: _Chunk, band: float) -> np.ndarray:
    """[C, G] fewest `last` layers for which the point is in the pool: every count from it to `n_max` is (the band
    is contiguous in the count, and only `n_max` can be maximal). Above `n_max` where nothing is."""
    lo = space.layers[ch.last][0]
    n_band = np.full(ch.n_max.shape, np.inf)
    for res, limit in budget_limits(budget).items():
        if limit == math.inf:
            continue
        # The linear memory model carries _MEM_SLACK bytes that the exact memory does not.
        room = (1 - band) * limit + (_MEM_SLACK if res == "memory" else 0.0) - ch.used[res]
        n_band = np.minimum(n_band, np.ceil(room / ch.per[ch.last][res][:, None]))
    low = np.maximum(n_band, lo)
    low = np.where(_maximal(space, budget, costs, ch), np.minimum(low, ch.n_max), low)
    return np.where(ch.fits, low, ch.n_max + 1)


def count_feasible(space: SearchSpace, budget: Budget) -> int:
    """How many layouts (widths x layer counts) of `space` fit `budget` (no scores needed)."""
    total = 0
    for ch in _chunks(space, budget, LayerCosts(space, budget)):
        lo = space.layers[ch.last][0]
        total += int(np.where(ch.fits, ch.n_max - lo + 1, 0).sum())
    return total


def count_pool(space: SearchSpace, budget: Budget, band: float = 0.0) -> int:
    """How many layouts of `space` are candidates under `budget`: in the band or maximal (see `in_pool`)."""
    check_band(band)
    costs = LayerCosts(space, budget)
    total = 0
    for ch in _chunks(space, budget, costs):
        low = _pool_low(space, budget, costs, ch, band)
        total += int(np.clip(ch.n_max - low + 1, 0, None).sum())
    return total


def _enumerate(space, budget, model, costs: LayerCosts, k: int, band: float = 0.0, family: Family | None = None):
    """The `k` least damaging pool points (of `family`, when given), every point of the space visited chunk by
    chunk."""
    best: list[tuple] = []  # heap of (-damage, params, reversed key, candidate): the k best so far
    for ch in _chunks(space, budget, costs):
        low = _pool_low(space, budget, costs, ch, band)
        kept_values = {kd: _keep_values(model, kd, ch.idx) for kd in ch.per}
        kept_others = np.zeros(ch.n_max.shape)
        for kd, n in zip(ch.others, ch.grids):
            kept_others += kept_values[kd][:, n]
        lo, hi = space.layers[ch.last]
        # Fewer `last` layers never lowers the damage: the best of each point are n_max, n_max - 1, ... (a family
        # may skip some of them, so then every count is visited)
        for fewer in range(hi - lo + 1 if family else min(k, hi - lo + 1)):
            n_last = ch.n_max - fewer
            combo, grid = np.nonzero(n_last >= low)
            if len(combo) == 0:
                break
            n_last = n_last[combo, grid]
            if family:
                counts = {kd: n[grid] for kd, n in zip(ch.others, ch.grids)} | {ch.last: n_last}
                keep = _family_mask(space, family, {a: i[combo] for a, i in ch.idx.items()}, counts)
                combo, grid, n_last = combo[keep], grid[keep], n_last[keep]
            damage = (model.total - kept_others[combo, grid] - kept_values[ch.last][combo, n_last]) / model.total
            params = ch.used["params"][combo, grid] + ch.per[ch.last]["params"][combo] * n_last
            for t in np.argsort(damage, kind="stable")[: k * 4]:
                cand = _chunk_candidate(space, ch, combo[t], grid[t], int(n_last[t]), float(damage[t]))
                entry = (-cand.damage, float(params[t]), tuple(-x for x in cand.key()), cand)
                if len(best) < k:
                    heapq.heappush(best, entry)
                elif entry[:3] > best[0][:3]:
                    heapq.heapreplace(best, entry)
    return [e[3] for e in sorted(best, key=lambda e: (-e[0], -e[1], e[3].key()))]


def _chunk_candidate(space: SearchSpace, ch: _Chunk, combo: int, grid: int, n_last: int, damage: float) -> Candidate:
    """The candidate at width combo `combo`, counts `grid` of the other kinds and `n_last` layers of `last`."""
    widths = {ax: space.widths[ax][int(ch.idx[ax][combo])] for ax in WIDTH_AXES}
    counts = {kd: int(space.layers[kd][1]) for kd in space.kinds}
    for kd, n in zip(ch.others, ch.grids):
        counts[kd] = int(n[grid])
    counts[ch.last] = n_last
    return Candidate(widths, counts, damage)


def check_band(band: float) -> None:
    if not 0 <= band <= 1:
        raise UserError(f"--band must be between 0 and 1 (a fraction of the budget, e.g. 0.05), got {band}")


def in_band(budget: Budget, layout: Layout, band: float) -> bool:
    """`layout` fits and uses at least (1 - band) of one of the limits it is held to."""
    if not budget.fits(layout):
        return False
    if budget.params is not None and layout.num_params() >= (1 - band) * budget.params:
        return True
    if budget.active_params is not None and layout.num_active_params() >= (1 - band) * budget.active_params:
        return True
    return budget.memory is not None and budget.memory_of(layout)["total"] >= (1 - band) * budget.memory


def in_pool(space: SearchSpace, budget: Budget, widths: dict[str, int], counts: dict[str, int], band: float) -> bool:
    """A candidate: the layout is in the band, or it fits and is maximal."""
    lay = space.layout(widths, counts)
    if in_band(budget, lay, band):
        return True
    return budget.fits(lay) and is_maximal(space, budget, widths, counts)


def is_maximal(space: SearchSpace, budget: Budget, widths: dict[str, int], counts: dict[str, int]) -> bool:
    """No kind can keep one more layer and no axis can take its next larger width within `budget`."""
    for kd in space.kinds:
        if counts[kd] < space.layers[kd][1]:
            if budget.fits(space.layout(widths, counts | {kd: counts[kd] + 1})):
                return False
    for axis in WIDTH_AXES:
        opts = space.widths[axis]
        j = opts.index(widths[axis])
        if j > 0 and budget.fits(space.layout(widths | {axis: opts[j - 1]}, counts)):
            return False
    return True


def _silent_highs(highspy):
    """A HiGHS instance that prints nothing: its constructor writes a banner to the C-level stdout, which would
    corrupt `--json` output, so fd 1 points at /dev/null while it is built."""

    sys.stdout.flush()
    saved = os.dup(1)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        h = highspy.Highs()
        h.setOptionValue("output_flag", False)
    finally:
        os.dup2(saved, 1)
        os.close(saved)
        os.close(devnull)
    return h


class _Option(NamedTuple):
    """One choice for a layer kind in the MIP: its widths, how many layers stay, their costs and kept value."""

    widths: dict[str, int]
    count: int
    params: float
    active: float
    memory: float
    kept_value: float


def _mip(space, budget, model, costs: LayerCosts, k: int, band: float = 0.0, family: Family | None = None):
    """Per hidden width, a multiple-choice integer program over (kind widths, layer count) options; a `family`
    removes the options it forbids and adds a row for each group it needs cut."""
    limits = budget_limits(budget)
    kinds = [kd for kd in space.kinds if space.layers[kd][1] > 0]
    results: list[Candidate] = []
    bound = math.inf  # damage of the k-th best so far: hidden widths that cannot beat it are skipped
    for hidden_index, hidden in enumerate(space.widths["hidden"]):
        options = {kd: _mip_options(space, model, costs, kd, hidden_index) for kd in kinds}
        options, need = _family_options(space, family or {}, hidden, options)
        if not options:
            continue
        best_possible = sum(max(o.kept_value for o in options[kd]) for kd in kinds)
        if (model.total - best_possible) / model.total > bound:
            continue
        fixed = costs.fixed({"hidden": np.array([hidden_index])})
        room = {res: limit - float(fixed[res][0]) for res, limit in limits.items()}
        found = 0
        for widths, counts, damage in _MultipleChoice(options, room, need).solutions(model.total, bound, 20 * k):
            widths = {a: space.widths[a][0] for a in WIDTH_AXES} | {"hidden": hidden} | widths
            counts = dict.fromkeys(space.kinds, 0) | counts
            if in_pool(space, budget, widths, counts, band):
                results.append(Candidate(widths, counts, damage))
                found += 1
                if found >= k:
                    break
        results.sort(key=lambda c: (c.damage, -c.params, c.key()))
        results = results[: 4 * k]
        if len(results) >= k:
            bound = results[k - 1].damage
    # Params for the final order's tie-break.
    for c in results:
        c.params = space.layout(c.widths, c.counts).num_params()
    results.sort(key=lambda c: (c.damage, -c.params, c.key()))
    return results[:k]


def _mip_options(space, model, costs: LayerCosts, kind: str, hidden_index: int) -> list[_Option]:
    """Every (widths of `kind`'s axes, layer count) choice for `kind` at hidden width option `hidden_index`."""
    axes = axes_of_kind(kind)
    lo, hi = space.layers[kind]
    options = []
    for combo in np.ndindex(*[len(space.widths[a]) for a in axes]):
        idx = {a: np.array([0]) for a in WIDTH_AXES} | {a: np.array([j]) for a, j in zip(axes, combo)}
        idx["hidden"] = np.array([hidden_index])
        cost = {res: float(per[0]) for res, per in costs.per_layer(kind, idx).items()}
        kept = _keep_values(model, kind, idx)[0]
        widths = {a: space.widths[a][j] for a, j in zip(axes, combo)}
        for n in range(lo, hi + 1):
            options.append(
                _Option(widths, n, cost["params"] * n, cost["active"] * n, cost["memory"] * n, float(kept[n]))
            )
    return options


def _option_cuts(space: SearchSpace, name: str, kind: str, o: _Option) -> bool:
    """The option of `kind` drops a layer (`name` "depth") or narrows axis `name` (see `cuts`)."""
    if name == "depth":
        return o.count < space.layers[kind][1]
    return name in o.widths and o.widths[name] < AXES[name].width(space.source)


def _family_options(space: SearchSpace, family: Family, hidden: int, options: dict[str, list[_Option]]):
    """(the options of each kind that `family` allows at hidden width `hidden`, one [(kind, option index)] list
    per group that some chosen option must cut); ({}, []) when no layout of the family has this hidden width."""
    hidden_cut = hidden < AXES["hidden"].width(space.source)
    need = []
    for names, cut in family.items():
        if "hidden" in names and hidden_cut:
            if not cut:
                return {}, []
            continue  # the hidden width already cuts this group
        if cut:
            need.append(names)
        else:
            options = {kd: [o for o in opts if not any(_option_cuts(space, n, kd, o) for n in names)]
                       for kd, opts in options.items()}  # fmt: skip
    rows = [[(kd, j) for kd, opts in options.items() for j, o in enumerate(opts)
             if any(_option_cuts(space, n, kd, o) for n in names)] for names in need]  # fmt: skip
    if any(not opts for opts in options.values()) or any(not row for row in rows):
        return {}, []
    return options, rows


class _MultipleChoice:
    """HiGHS program: one binary per option, exactly one option per kind, the summed costs within `room`
    (per resource: parameters, active parameters, memory), at least one chosen option from each list of
    `need` [(kind, option index)], maximising the kept value."""

    def __init__(self, options: dict[str, list[_Option]], room: dict[str, float], need=()):
        import highspy

        self.highspy, self.options, self.kinds = highspy, options, list(options)
        self.highs = _silent_highs(highspy)
        self.highs.setOptionValue("mip_rel_gap", 0.0)
        self.cols: dict[str, list[int]] = {}
        for kd in self.kinds:
            start = sum(len(c) for c in self.cols.values())
            self.cols[kd] = list(range(start, start + len(options[kd])))
            for o in options[kd]:
                self.highs.addCol(-o.kept_value, 0.0, 1.0, 0, np.array([], dtype=np.int32), np.array([], dtype=np.float64))
        n_cols = sum(len(c) for c in self.cols.values())
        self.highs.changeColsIntegrality(
            n_cols, np.arange(n_cols, dtype=np.int32), np.full(n_cols, highspy.HighsVarType.kInteger)
        )
        for kd in self.kinds:
            self._add_row(1.0, 1.0, self.cols[kd], np.ones(len(self.cols[kd])))
        every = [c for kd in self.kinds for c in self.cols[kd]]
        for res, limit in room.items():
            if limit < highspy.kHighsInf:
                coef = np.array([getattr(o, res) for kd in self.kinds for o in options[kd]])
                self._add_row(-highspy.kHighsInf, limit, every, coef)
        for row in need:
            self._add_row(1.0, highspy.kHighsInf, [self.cols[kd][j] for kd, j in row], np.ones(len(row)))

    def _add_row(self, lower: float, upper: float, cols: list[int], coef: np.ndarray) -> None:
        self.highs.addRow(lower, upper, len(cols), np.array(cols, dtype=np.int32), coef)

    def solutions(self, total: float, bound: float, tries: int):
        """Yield (widths, counts, damage) best first, up to damage `bound`, excluding each by a no-good cut."""
        for _ in range(tries):
            self.highs.run()
            if self.highs.getModelStatus() != self.highspy.HighsModelStatus.kOptimal:
                return
            x = np.asarray(self.highs.getSolution().col_value)
            chosen = {kd: next(i for i, c in enumerate(self.cols[kd]) if x[c] > 0.5) for kd in self.kinds}
            picked = [self.options[kd][chosen[kd]] for kd in self.kinds]
            damage = (total - sum(o.kept_value for o in picked)) / total
            if damage > bound + 1e-12:
                return
            widths = {a: w for o in picked for a, w in o.widths.items()}
            counts = {kd: o.count for kd, o in zip(self.kinds, picked)}
            yield widths, counts, damage
            # No-good cut: this combination of options is excluded from the next solve.
            used = [self.cols[kd][chosen[kd]] for kd in self.kinds]
            self._add_row(-self.highspy.kHighsInf, len(self.kinds) - 1.0, used, np.ones(len(used)))
