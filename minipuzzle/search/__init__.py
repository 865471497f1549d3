"""Search: the space of pruned layouts, budgets, the damage model, the solver and the measured set (MiniPuzzle's
second stage); ranking the measured candidates is the prune stage's (`minipuzzle.prune`)."""

from minipuzzle.search.budget import Budget, make_budget, parse_memory, parse_target
from minipuzzle.search.damage import DamageModel
from minipuzzle.search.solver import DEFAULT_BAND, Candidate, count_pool, in_pool, is_maximal, search
from minipuzzle.search.space import DEFAULT_AXES, SearchSpace, parse_axes

__all__ = [
    "DEFAULT_AXES",
    "DEFAULT_BAND",
    "Budget",
    "Candidate",
    "DamageModel",
    "SearchSpace",
    "count_pool",
    "in_pool",
    "is_maximal",
    "make_budget",
    "parse_axes",
    "parse_memory",
    "parse_target",
    "search",
]
