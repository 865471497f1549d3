"""Find the layouts with the least predicted damage that fit a budget.

Every layout is (one width per axis, a number of layers kept per kind); the layers kept are the top-ranked of each
kind. For fixed widths, parameters and memory are linear in the layer counts, and the predicted damage is a sum
over kept layers (see `damage`). Two exact methods:

* `enumerate` (small spaces): every width combination at once in numpy; for each, every count of all kinds but
  the most numerous, whose count is then the largest that fits (keeping a layer never adds damage).
* `mip` (large spaces): for each hidden width, a multiple-choice integer program solved by HiGHS: per layer kind,
  one binary per (widths of that kind, layer count) option, exactly one option per kind, the budgets as linear
  constraints, maximising the kept value. The next-best solutions come from no-good cuts.

Candidates (the "pool") are the layouts that fit the budget and either lie in the band below it (use at least
(1 - band) of the parameter limit or of the memory limit, whichever the budget has; with both, one of them
suffices, since only one of them binds) or are maximal (no kind can keep one more layer and no axis can take its
next larger width). Maximal layouts below the band stay in: nothing bigger of the same kind fits, so they are not
dominated, and coarse spaces (a tiny model, where one layer is more than the band) would otherwise have no
candidate at all; with band 0 the pool is exactly the maximal layouts. MiniPuzzle kept every layout its memory
filter let through (~400 for 56B -> 47B), not only the largest: the published 47B leaves room for one more layer.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field

import numpy as np

from minipuzzle.arch import ATTENTION, MAMBA, MLP, PRECISION_BITS, Layout
from minipuzzle.errors import UserError
from minipuzzle.search.budget import Budget
from minipuzzle.search.damage import DamageModel
from minipuzzle.search.space import AXIS_KIND, KINDS, WIDTH_AXES, WIDTH_FIELD, SearchSpace

# Above this many (width combination x layer count) points the MIP is used instead of enumeration.
ENUM_LIMIT = 50_000_000
_CHUNK = 2_000_000
# Linear memory model vs Layout.memory's byte rounding: a few bytes of slack, then an exact re-check.
_MEM_SLACK = 16.0
# Default band below the budget whose layouts are candidates (a fraction of each limit).
DEFAULT_BAND = 0.05
# Axes (besides hidden) that shape each kind's layers.
KIND_AXES = {kind: [a for a in WIDTH_AXES if AXIS_KIND.get(a) == kind] for kind in KINDS}


@dataclass
class Candidate:
    """One layout: widths per axis, layers kept per kind, its predicted damage and its costs."""

    widths: dict[str, int]
    counts: dict[str, int]
    damage: float
    params: int = 0
    memory: int | None = None
    extra: dict = field(default_factory=dict)

    def key(self) -> tuple:
        return tuple(self.widths[a] for a in WIDTH_AXES) + tuple(self.counts[k] for k in KINDS)

    def to_dict(self) -> dict:
        out = {
            "widths": dict(self.widths),
            "layers": {"mamba": self.counts[MAMBA], "mlp": self.counts[MLP], "attention": self.counts[ATTENTION]},
            "predicted_damage": self.damage,
            "params": self.params,
        }
        if self.memory is not None:
            out["memory"] = self.memory
        out.update(self.extra)
        return out


class _Costs:
    """Per-layer parameter and memory costs of each kind, tabulated over that kind's width options."""

    def __init__(self, space: SearchSpace, budget: Budget):
        self.space, self.budget = space, budget
        src = space.source
        self.opts = {a: space.widths[a] for a in WIDTH_AXES}
        self.wb = PRECISION_BITS[budget.precision.lower()] / 8
        self.tables: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        nh = len(self.opts["hidden"])
        for kind in KINDS:
            axes = KIND_AXES[kind] + ["hidden"]
            shape = [len(self.opts[a]) for a in axes]
            p = np.zeros(shape, dtype=np.int64)
            m = np.zeros(shape, dtype=np.float64)
            for idx in np.ndindex(*shape):
                lay = src.replace(pattern=kind, **{WIDTH_FIELD[a]: self.opts[a][j] for a, j in zip(axes, idx)})
                p[idx] = lay.layer_params(kind)
                one, two = budget.memory_of(lay), budget.memory_of(lay.replace(pattern=kind * 2))
                state = (two["total"] - two["weights"]) - (one["total"] - one["weights"])
                m[idx] = p[idx] * self.wb + state
            self.tables[kind] = (p, m)
        self.fixed_p = np.array(
            [src.replace(hidden_size=h).embedding_params() for h in self.opts["hidden"]], dtype=np.int64
        )
        self.fixed_m = self.fixed_p * self.wb + _MEM_SLACK
        assert len(self.fixed_p) == nh

    def per_layer(self, kind: str, idx: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """(params, memory) of one layer of `kind` at the combos given by option indices `idx[axis]`."""
        p, m = self.tables[kind]
        key = tuple(idx[a] for a in KIND_AXES[kind] + ["hidden"])
        return p[key], m[key]

    def fixed(self, idx: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        return self.fixed_p[idx["hidden"]], self.fixed_m[idx["hidden"]]


def _limits(budget: Budget) -> tuple[float, float]:
    return (
        float(budget.params) if budget.params is not None else math.inf,
        float(budget.memory) if budget.memory is not None else math.inf,
    )


def _keep_values(model: DamageModel, kind: str, idx: dict[str, np.ndarray]) -> np.ndarray:
    """[C, N_kind + 1] prefix sums of the kept value of the top-n layers of `kind`, for each combo."""
    order = model.order[kind]
    c = len(idx["hidden"])
    vals = np.broadcast_to(model.depth[order][None, :], (c, len(order))).copy()
    for axis in KIND_AXES[kind] + ["hidden"]:
        table = model._dropped.get(axis)
        if table is None:
            continue
        widths = model.space.widths[axis]
        if axis == "hidden":
            keep = np.array([1.0 - table[-1][w] for w in widths])
            vals *= keep[idx[axis]][:, None]
        else:
            keep = np.array([[1.0 - table[i][w] for w in widths] for i in order])  # [N, n_opts]
            vals *= keep[:, idx[axis]].T
    return np.concatenate([np.zeros((c, 1)), np.cumsum(vals, axis=1)], axis=1)


def search(
    space: SearchSpace,
    budget: Budget,
    model: DamageModel,
    k: int = 8,
    method: str = "auto",
    progress: bool = False,
    band: float = DEFAULT_BAND,
) -> list[Candidate]:
    """The `k` layouts of the pool (see the module docstring: within `band` of the budget, or maximal) with the
    least predicted damage, best first.

    method: "enumerate", "mip" or "auto" (enumerate up to ENUM_LIMIT points). Raises UserError when no layout in
    the space fits.
    """
    check_band(band)
    if method == "auto":
        method = "enumerate" if _enum_points(space) <= ENUM_LIMIT else "mip"
    if method not in ("enumerate", "mip"):
        raise UserError(f"unknown search method {method!r}: choose auto, enumerate or mip")
    costs = _Costs(space, budget)
    if method == "enumerate":
        found = _enumerate(space, budget, model, costs, k, progress, band)
    else:
        found = _mip(space, budget, model, costs, k, band)
    out = []
    for cand in found:
        lay = space.layout(cand.widths, cand.counts)
        # The linear memory model's rounding slack; never expected to trigger.
        if not in_pool(space, budget, cand.widths, cand.counts, band):
            continue
        cand.params = lay.num_params()
        cand.memory = budget.memory_of(lay)["total"]
        cand.extra["method"] = method
        out.append(cand)
    if not out:
        no_layout_fits(space, budget)
    return out


def no_layout_fits(space: SearchSpace, budget: Budget):
    """Raise the UserError for a budget that even the smallest layout of `space` misses."""
    small = smallest_layout(space)
    raise UserError(
        f"no layout in the search space meets the budget ({budget.describe()}): the smallest has "
        f"{small.num_params():,} parameters, {budget.memory_of(small)['total'] / 2**30:.2f} GiB; widen the space "
        f"(--axes, --min-width, --min-layers) or relax the budget"
    )


def smallest_layout(space: SearchSpace) -> Layout:
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
    used_p: np.ndarray  # [C, G] parameters without the `last` layers
    used_m: np.ndarray  # [C, G] memory (linear model, with slack) without the `last` layers
    per: dict[str, tuple[np.ndarray, np.ndarray]]  # kind -> per-layer (params, memory) [C]
    n_max: np.ndarray  # [C, G] most `last` layers that fit (int, clipped to its range)
    fits: np.ndarray  # [C, G] bool: the point fits with at least the fewest `last` layers


def _chunks(space: SearchSpace, budget: Budget, costs: _Costs, target: int = _CHUNK):
    """Every (width combo, counts of all kinds but the most numerous) point of `space`, in `_Chunk`s."""
    P, M = _limits(budget)
    shape = [len(space.widths[a]) for a in WIDTH_AXES]
    total = math.prod(shape)
    kinds = [kd for kd in KINDS if space.layers[kd][1] > 0]
    last = max(kinds, key=lambda kd: space.layers[kd][1] - space.layers[kd][0])
    others = [kd for kd in kinds if kd != last]
    grids = np.meshgrid(*[np.arange(space.layers[kd][0], space.layers[kd][1] + 1) for kd in others], indexing="ij")
    grids = [g.reshape(-1) for g in grids] if others else []
    g = len(grids[0]) if grids else 1
    chunk = max(1, target // g)
    for start in range(0, total, chunk):
        flat = np.arange(start, min(total, start + chunk))
        idx = dict(zip(WIDTH_AXES, np.unravel_index(flat, shape)))
        c = len(flat)
        fp, fm = costs.fixed(idx)
        used_p = np.broadcast_to(fp[:, None].astype(np.float64), (c, g)).copy()
        used_m = np.broadcast_to(fm[:, None], (c, g)).copy()
        per = {kd: costs.per_layer(kd, idx) for kd in kinds}
        for kd, n in zip(others, grids):
            used_p += per[kd][0][:, None] * n[None, :]
            used_m += per[kd][1][:, None] * n[None, :]
        lo, hi = space.layers[last]
        lp, lm = per[last]
        n_max = np.full((c, g), float(hi))
        n_max = np.minimum(n_max, np.floor((P - used_p) / lp[:, None]))
        n_max = np.minimum(n_max, np.floor((M - used_m) / lm[:, None]))
        fits = n_max >= lo
        n_max = np.clip(n_max, lo, hi).astype(np.int64)
        yield _Chunk(idx, grids, others, last, used_p, used_m, per, n_max, fits)


def _maximal(space: SearchSpace, budget: Budget, costs: _Costs, ch: _Chunk) -> np.ndarray:
    """[C, G] bool: the point with `n_max` layers of `last` is maximal (see `is_maximal`)."""
    P, M = _limits(budget)
    lp, lm = ch.per[ch.last]
    tot_p = ch.used_p + lp[:, None] * ch.n_max
    tot_m = ch.used_m + lm[:, None] * ch.n_max
    ok = ch.fits.copy()
    for kd, n in zip(ch.others, ch.grids):
        room = (tot_p + ch.per[kd][0][:, None] <= P) & (tot_m + ch.per[kd][1][:, None] <= M)
        ok &= ~(room & (n[None, :] < space.layers[kd][1]))
    counts = {kd: n[None, :] for kd, n in zip(ch.others, ch.grids)} | {ch.last: ch.n_max}
    for axis in WIDTH_AXES:
        if len(space.widths[axis]) < 2:
            continue
        nidx = dict(ch.idx)
        nidx[axis] = np.maximum(ch.idx[axis] - 1, 0)
        np_, nm = costs.fixed(nidx)
        bp, bm = np_[:, None].astype(np.float64), nm[:, None]
        for kd in counts:
            pp, pm = costs.per_layer(kd, nidx)
            bp = bp + pp[:, None] * counts[kd]
            bm = bm + pm[:, None] * counts[kd]
        ok &= ~((ch.idx[axis] > 0)[:, None] & (bp <= P) & (bm <= M))
    return ok


def _pool_low(space: SearchSpace, budget: Budget, costs: _Costs, ch: _Chunk, band: float) -> np.ndarray:
    """[C, G] fewest `last` layers for which the point is in the pool: every count from it to `n_max` is (the band
    is contiguous in the count, and only `n_max` can be maximal). Above `n_max` where nothing is."""
    P, M = _limits(budget)
    lp, lm = ch.per[ch.last]
    lo = space.layers[ch.last][0]
    n_band = np.full(ch.n_max.shape, np.inf)
    if P < math.inf:
        n_band = np.minimum(n_band, np.ceil(((1 - band) * P - ch.used_p) / lp[:, None]))
    if M < math.inf:
        # used_m carries _MEM_SLACK bytes that the exact memory does not.
        n_band = np.minimum(n_band, np.ceil(((1 - band) * M + _MEM_SLACK - ch.used_m) / lm[:, None]))
    low = np.maximum(n_band, lo)
    low = np.where(_maximal(space, budget, costs, ch), np.minimum(low, ch.n_max), low)
    return np.where(ch.fits, low, ch.n_max + 1)


def count_pool(space: SearchSpace, budget: Budget, band: float = 0.0) -> int:
    """How many layouts of `space` are candidates under `budget`: in the band or maximal (see `in_pool`)."""
    check_band(band)
    costs = _Costs(space, budget)
    total = 0
    for ch in _chunks(space, budget, costs):
        low = _pool_low(space, budget, costs, ch, band)
        total += int(np.clip(ch.n_max - low + 1, 0, None).sum())
    return total


def _enumerate(space, budget, model, costs: _Costs, k: int, progress: bool, band: float = 0.0) -> list[Candidate]:
    heap: list[tuple] = []  # (-damage, params, reversed key, candidate): the k best so far
    for ch in _chunks(space, budget, costs):
        low = _pool_low(space, budget, costs, ch, band)
        c, g = ch.n_max.shape
        cums = {kd: _keep_values(model, kd, ch.idx) for kd in ch.per}
        kept = np.zeros((c, g))
        for kd, n in zip(ch.others, ch.grids):
            kept += cums[kd][:, n]
        lp = ch.per[ch.last][0]
        lo, hi = space.layers[ch.last]
        # Fewer `last` layers never lowers the damage: the best of each point are n_max, n_max - 1, ...
        for j in range(min(k, hi - lo + 1)):
            n = ch.n_max - j
            ok = n >= low
            ci, gi = np.nonzero(ok)
            if len(ci) == 0:
                break
            n_sel = n[ci, gi]
            dm = (model.total - kept[ci, gi] - cums[ch.last][ci, n_sel]) / model.total
            tot_p = ch.used_p[ci, gi] + lp[ci] * n_sel
            for t in np.argsort(dm, kind="stable")[: k * 4]:
                a, b = ci[t], gi[t]
                widths = {ax: space.widths[ax][int(ch.idx[ax][a])] for ax in WIDTH_AXES}
                cnt = {kd: int(space.layers[kd][1]) for kd in KINDS}
                for kd, nn in zip(ch.others, ch.grids):
                    cnt[kd] = int(nn[b])
                cnt[ch.last] = int(n_sel[t])
                cand = Candidate(widths, cnt, float(dm[t]))
                entry = (-cand.damage, float(tot_p[t]), tuple(-x for x in cand.key()), cand)
                if len(heap) < k:
                    heapq.heappush(heap, entry)
                elif entry[:3] > heap[0][:3]:
                    heapq.heapreplace(heap, entry)
    return [e[3] for e in sorted(heap, key=lambda e: (-e[0], -e[1], e[3].key()))]


def check_band(band: float) -> None:
    if not 0 <= band <= 1:
        raise UserError(f"--band must be between 0 and 1 (a fraction of the budget, e.g. 0.05), got {band}")


def in_band(budget: Budget, layout: Layout, band: float) -> bool:
    """`layout` fits and uses at least (1 - band) of one of the limits it is held to."""
    if not budget.fits(layout):
        return False
    if budget.params is not None and layout.num_params() >= (1 - band) * budget.params:
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
    for kd in KINDS:
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
    import os
    import sys

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


def _mip(space, budget, model, costs: _Costs, k: int, band: float = 0.0) -> list[Candidate]:
    """Per hidden width, a multiple-choice integer program over (kind widths, layer count) options."""
    import highspy

    P, M = _limits(budget)
    kinds = [kd for kd in KINDS if space.layers[kd][1] > 0]
    results: list[Candidate] = []
    bound = math.inf  # damage of the k-th best so far: hidden widths that cannot beat it are skipped
    for hj, h in enumerate(space.widths["hidden"]):
        options: dict[str, list[tuple]] = {}
        for kd in kinds:
            axes = KIND_AXES[kd]
            lo, hi = space.layers[kd]
            opts = []
            for combo in np.ndindex(*[len(space.widths[a]) for a in axes]):
                idx = {a: np.array([j]) for a, j in zip(axes, combo)} | {"hidden": np.array([hj])}
                for a in WIDTH_AXES:
                    idx.setdefault(a, np.array([0]))
                p, m = costs.per_layer(kd, idx)
                cum = _keep_values(model, kd, idx)[0]
                widths = {a: space.widths[a][j] for a, j in zip(axes, combo)}
                for n in range(lo, hi + 1):
                    opts.append((widths, n, float(p[0]) * n, float(m[0]) * n, float(cum[n])))
            options[kd] = opts
        fixed_p, fixed_m = float(costs.fixed_p[hj]), float(costs.fixed_m[hj])
        best_possible = sum(max(o[4] for o in options[kd]) for kd in kinds)
        if (model.total - best_possible) / model.total > bound:
            continue
        h_ = _silent_highs(highspy)
        h_.setOptionValue("mip_rel_gap", 0.0)
        inf = highspy.kHighsInf
        cols: dict[str, list[int]] = {}
        n_cols = 0
        for kd in kinds:
            cols[kd] = list(range(n_cols, n_cols + len(options[kd])))
            for o in options[kd]:
                h_.addCol(-o[4], 0.0, 1.0, 0, np.array([], dtype=np.int32), np.array([], dtype=np.float64))
                n_cols += 1
        h_.changeColsIntegrality(
            n_cols, np.arange(n_cols, dtype=np.int32), np.full(n_cols, highspy.HighsVarType.kInteger)
        )
        for kd in kinds:
            h_.addRow(1.0, 1.0, len(cols[kd]), np.array(cols[kd], dtype=np.int32), np.ones(len(cols[kd])))
        all_cols = np.array([c for kd in kinds for c in cols[kd]], dtype=np.int32)
        if P < inf:
            coef = np.array([o[2] for kd in kinds for o in options[kd]])
            h_.addRow(-inf, P - fixed_p, len(all_cols), all_cols, coef)
        if M < inf:
            coef = np.array([o[3] for kd in kinds for o in options[kd]])
            h_.addRow(-inf, M - fixed_m, len(all_cols), all_cols, coef)
        found = 0
        for _ in range(20 * k):
            h_.run()
            if h_.getModelStatus() != highspy.HighsModelStatus.kOptimal:
                break
            x = np.asarray(h_.getSolution().col_value)
            chosen = {kd: next(i for i, c in enumerate(cols[kd]) if x[c] > 0.5) for kd in kinds}
            kept = sum(options[kd][chosen[kd]][4] for kd in kinds)
            dmg = (model.total - kept) / model.total
            if dmg > bound + 1e-12:
                break
            widths = {a: space.widths[a][0] for a in WIDTH_AXES} | {"hidden": h}
            counts = dict.fromkeys(KINDS, 0)
            for kd in kinds:
                widths.update(options[kd][chosen[kd]][0])
                counts[kd] = options[kd][chosen[kd]][1]
            if in_pool(space, budget, widths, counts, band):
                results.append(Candidate(widths, counts, dmg))
                found += 1
            # No-good cut: this combination of options is excluded from the next solve.
            idxs = np.array([cols[kd][chosen[kd]] for kd in kinds], dtype=np.int32)
            h_.addRow(-inf, len(kinds) - 1.0, len(idxs), idxs, np.ones(len(idxs)))
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
