"""The search of the prune stage from its settings, offline (no weights, no torch): the space `PruneSettings`
describe over a layout, its candidates, and the plan of `prune --dry-run` with what scoring and ranking would
cost, which the recipe's plan prices too (`recipe.plan_run`)."""

from __future__ import annotations

from minipuzzle.arch import Layout
from minipuzzle.communication import H100_FLOPS  # the GPU-hour price, defined once
from minipuzzle.search.budget import Budget
from minipuzzle.search.damage import DamageModel
from minipuzzle.search.diversity import families, measured_set
from minipuzzle.search.solver import count_feasible, count_pool, no_layout_fits, search, smallest_layout
from minipuzzle.search.space import SearchSpace
from minipuzzle.settings import PruneSettings


def build_space(layout: Layout, settings: PruneSettings) -> SearchSpace:
    """The search space the settings describe over `layout`."""
    return SearchSpace.build(
        layout, settings.axes, settings.steps, settings.min_width, settings.min_layers, widths=settings.widths
    )


def check_budget(space: SearchSpace, budget: Budget) -> None:
    """Raise the user error of a budget that even the smallest layout of the search space misses."""
    if not budget.fits(smallest_layout(space)):
        no_layout_fits(space, budget)


def run_search(layout: Layout, scores, settings: PruneSettings, k: int | None = None):
    """(space, damage model, candidates best first) for `layout` under the settings' budget."""
    space = build_space(layout, settings)
    model = DamageModel(scores, space)
    cands = search(space, settings.budget_for(layout), model, k or settings.candidates, settings.method, band=settings.band)
    return space, model, cands


def measured_candidates(layout: Layout, scores, settings: PruneSettings):
    """(space, damage model, the candidates prune measures, best predicted first): no layout that another fitting
    one dominates, and the best of every structural family (`diversity.measured_set`)."""
    space = build_space(layout, settings)
    model = DamageModel(scores, space)
    budget = settings.budget_for(layout)
    return space, model, measured_set(space, budget, model, settings.candidates, settings.method)


def measured_count(layout: Layout, settings: PruneSettings) -> int:
    """The most candidates prune measures: `--candidates`, or one per structural family of the space when there
    are more families (`diversity.measured_set`; a family with no layout under the budget measures none)."""
    return max(settings.candidates, len(families(build_space(layout, settings))))


def scoring_cost(layout: Layout, settings: PruneSettings) -> dict:
    """FLOPs and H100-hours of scoring and candidate ranking, and of measuring one candidate.

    Depth scoring runs the model once plus, with prefix reuse, about half a model per dropped layer: ~L/2 + 1
    full passes over the depth tokens. Width scoring is one pass. Ranking runs the parent once and each candidate
    once (counted at the parent's cost, an upper bound) over the held-out tokens. One measurement is that pass,
    plus, with candidate distillation, its tokens at 6 x student + 2 x teacher parameters FLOPs per token (the
    student bounded by the parameter budget), as `recipe.plan_run` prices training; `flops_ranking` and
    `flops_total` leave the distillation out.
    """
    per_token = layout.flops_per_token(settings.seq_len)["prefill"]
    passes_depth = layout.num_layers / 2 + 1 if "depth" in settings.axes else 0
    width_axes = [a for a in settings.axes if a != "depth"]
    depth = per_token * settings.depth_samples * settings.seq_len * passes_depth
    width = per_token * settings.width_samples * settings.seq_len * (1 if width_axes else 0)
    measured = measured_count(layout, settings)
    one_rank = per_token * settings.held_out_windows * settings.seq_len
    rank = one_rank * (1 + measured)
    total = depth + width + rank
    student = min(layout.num_params(), settings.budget_for(layout).params or layout.num_params())
    distill_tokens = settings.candidate_distill_steps * settings.candidate_distill_batch * settings.seq_len
    one = one_rank + distill_tokens * (6 * student + 2 * layout.num_params())
    return {
        "flops_depth": depth,
        "flops_width": width,
        "flops_ranking": rank,
        "flops_total": total,
        "depth_passes": passes_depth,
        "gpu_hours_h100": total / H100_FLOPS / 3600,
        "assumed_flops_per_second": H100_FLOPS,
        "tokens": (settings.depth_samples + settings.width_samples + settings.held_out_windows) * settings.seq_len,
        "candidates_measured": measured,
        "flops_per_measurement": one,
        "gpu_hours_per_measurement": one / H100_FLOPS / 3600,
    }


def dry_run(layout: Layout, settings: PruneSettings) -> dict:
    """The plan for `prune` without weights: search space, feasible layouts, smallest layout, scoring cost."""
    space = build_space(layout, settings)
    small = smallest_layout(space)
    b = settings.budget_for(layout)
    return {
        "source": {"params": layout.num_params(), "pattern": layout.pattern, **_costs(b, layout)},
        "budget": b.to_dict(),
        "space": space.describe(),
        "feasible_layouts": count_feasible(space, b),
        "band": settings.band,
        "pool_layouts": count_pool(space, b, settings.band),
        "families": list(families(space)),
        "smallest_layout": {"params": small.num_params(), **_costs(b, small)},
        "cost": scoring_cost(layout, settings),
    }


def _costs(b: Budget, lay: Layout) -> dict:
    """The active parameters of an MoE layout and the memory of a memory budget, where they apply."""
    out = {"active_params": lay.num_active_params()} if lay.is_moe else {}
    return out | ({"memory_bytes": b.memory_of(lay)["total"]} if b.memory is not None else {})


__all__ = [
    "H100_FLOPS",
    "build_space",
    "check_budget",
    "count_feasible",
    "dry_run",
    "measured_candidates",
    "measured_count",
    "run_search",
    "scoring_cost",
]
