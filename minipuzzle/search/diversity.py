"""Which candidate layouts `prune` measures: none that another fitting layout dominates, and the best of every
structural family, so that the measurement, not the prediction, chooses between dropping layers and narrowing.

Dominance. Layout B dominates A when B keeps at least as many layers of each kind and no axis narrower. Which
layers and units stay follows from the counts and widths alone (`DamageModel.kept_layers`: the top-ranked of
each kind; the top-scored units of each axis, `plan.py`), so B keeps a superset of A's layers and units whenever
both kept sets are the top-ranked ones (a rule that trades a layer for a valid first layer is the exception), and
dominance is read off counts and widths. Costs never fall as a count or a width grows, so a fitting layout has a fitting dominator exactly when it
is not maximal (one more layer, or the next wider width, fits): a dominator is reached by growing one count or
width a step at a time, and the first step already fits. Hence the non-dominated members of any band's pool are
its maximal layouts, the band-0 pool, and a dominator of a pool member is itself in the pool. The band still
decides the pool (`search`, `count_pool`; the published 47B, which has room for one more layer, is in it);
prune measures only the members nothing fitting dominates.

Families. The damage model's terms for different axes are not on one scale (`damage`), so the prediction alone
cannot choose between layouts that cut different things. The groups a layout may cut are `depth` (a layer
dropped), `experts` (the routed expert count, MoE) and `width` (any other width); a layout's family is "G only"
when it cuts one group G and "mixed" when it cuts two or more. The measured set is the best layout by predicted
damage, then the best of every other family that has a maximal layout, then the next best by predicted damage
until it holds `k` (so `k` below the number of families still measures every family).
"""

from __future__ import annotations

import itertools

from minipuzzle.anatomy import AXES, WIDTH_AXES
from minipuzzle.search.budget import Budget
from minipuzzle.search.damage import DamageModel
from minipuzzle.search.solver import Candidate, Family, budget_limits, cuts, search
from minipuzzle.search.space import SearchSpace

BEST = "best predicted"
NEXT = "next best predicted"


def groups(space: SearchSpace) -> dict[str, tuple[str, ...]]:
    """The groups that some layout of `space` cuts, each with the names it covers ("depth" or width axes)."""
    out = {}
    if any(lo < hi for lo, hi in space.layers.values()):
        out["depth"] = ("depth",)
    narrower = [a for a in WIDTH_AXES if min(space.widths[a]) < AXES[a].width(space.source)]
    if "experts" in narrower:
        out["experts"] = ("experts",)
    rest = tuple(a for a in narrower if a != "experts")
    if rest:
        out["width"] = rest
    return out


def families(space: SearchSpace) -> dict[str, list[Family]]:
    """Family name -> the `solver.Family` constraints whose union it is ("mixed": every two groups or more)."""
    g = groups(space)
    out = {f"{name} only": [{names: n == name for n, names in g.items()}] for name in g}
    if len(g) > 1:
        subsets = [s for r in range(2, len(g) + 1) for s in itertools.combinations(g, r)]
        out["mixed"] = [{names: n in s for n, names in g.items()} for s in subsets]
    return out


def family_of(space: SearchSpace, widths: dict[str, int], counts: dict[str, int]) -> str:
    """The family of a layout: "G only" for the one group G it cuts, "mixed" for more, "none" for the source."""
    cut = [n for n, names in groups(space).items() if any(cuts(space, a, widths, counts) for a in names)]
    return f"{cut[0]} only" if len(cut) == 1 else ("mixed" if cut else "none")


def dominates(a: Candidate, b: Candidate) -> bool:
    """`a` keeps at least as many layers of each kind and no narrower width than `b`, and is another layout."""
    return (
        a.key() != b.key()
        and all(a.counts[kd] >= n for kd, n in b.counts.items())
        and all(a.widths[x] >= w for x, w in b.widths.items())
    )


def budget_used(cand: Candidate, budget: Budget) -> float:
    """The largest fraction of a limit the candidate uses (the limit that binds)."""
    used = {"params": cand.params, "active": cand.active_params, "memory": cand.memory}
    return max(used[res] / lim for res, lim in budget_limits(budget).items() if lim != float("inf"))


def _order(c: Candidate) -> tuple:
    return (c.damage, -c.params, c.key())  # the solver's order: least damage, then the larger layout


def measured_set(space: SearchSpace, budget: Budget, model: DamageModel, k: int, method: str = "auto"):
    """The candidates prune measures (module docstring), best predicted first, each with `extra` "family",
    "why" (best predicted, best FAMILY, next best predicted) and "budget_used". Raises the solver's UserError
    when nothing fits."""
    top = search(space, budget, model, k, method, band=0.0)  # the k best maximal (= non-dominated) layouts
    picked: dict[tuple, Candidate] = {}

    def take(c: Candidate, why: str) -> None:
        if c.key() not in picked:
            family = family_of(space, c.widths, c.counts)
            c.extra |= {"family": family, "why": why, "budget_used": round(budget_used(c, budget), 6)}
            picked[c.key()] = c

    take(top[0], BEST)
    for name, parts in families(space).items():
        if name == top[0].extra["family"]:
            continue
        # Everything better than the first of `top` in this family is in `top` and of another family.
        best = next((c for c in top if family_of(space, c.widths, c.counts) == name), None)
        if best is None:
            found = [c for fam in parts for c in search(space, budget, model, 1, method, band=0.0, family=fam)]
            best = min(found, key=_order, default=None)
        if best is not None:
            take(best, f"best {name}")
    for c in top[1:]:
        if len(picked) >= k:
            break
        take(c, NEXT)
    return sorted(picked.values(), key=_order)
