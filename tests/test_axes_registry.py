"""`anatomy.AXES` is the single source of the width axes: each has one scoring function and one cutting function,
and scores, plans and the cut handle every axis by looping over `AXES`, without naming it."""

import json

import torch

from minipuzzle.anatomy import AXES, PER_EXPERT_CHANNELS, SEARCH_AXES
from minipuzzle.cut import CUTS, PLAN_UNITS, Plan, cut_model
from minipuzzle.score.scores import SCORE_TABLES, Scores
from minipuzzle.score.scoring import score_model
from minipuzzle.score.width import SCORERS
from minipuzzle.testing import random_model, tiny_moe_layout

LAYOUT = tiny_moe_layout()  # every layer kind, so every axis has units to score and cut
WINDOWS = torch.randint(0, LAYOUT.vocab_size, (2, 8), generator=torch.Generator().manual_seed(0))


def test_every_axis_has_a_scoring_and_a_cutting_function_and_a_table():
    assert set(SCORERS) == set(AXES) == set(CUTS)
    assert all(callable(f) for f in (*SCORERS.values(), *CUTS.values()))
    assert SCORE_TABLES == (*SEARCH_AXES, PER_EXPERT_CHANNELS) and PLAN_UNITS == (*AXES, PER_EXPERT_CHANNELS)


def _layers(name: str) -> list[int]:
    return [i for i, ch in enumerate(LAYOUT.pattern) if ch == AXES[name].kind]


def _half(name: str) -> list[int]:
    """The first half (rounded up) of every group of `name`'s units."""
    full, groups = AXES[name].width(LAYOUT), AXES[name].unit(LAYOUT)
    per = full // groups
    return [g * per + u for g in range(groups) for u in range(-(-per // 2))]


def test_scores_round_trip_every_axis(tmp_path):
    g = torch.Generator().manual_seed(1)
    tables = {"depth": torch.rand(LAYOUT.num_layers, generator=g)}
    for name, axis in AXES.items():
        width = axis.width(LAYOUT)
        whole = axis.kind is None
        tables[name] = torch.rand(width, generator=g) if whole else {
            i: torch.rand(width, generator=g) for i in _layers(name)
        }  # fmt: skip
    s = Scores(LAYOUT.pattern, tables)
    s.save(tmp_path)
    back = Scores.load(tmp_path)
    assert back.pattern == LAYOUT.pattern
    for name, table in tables.items():
        assert name in back
        if isinstance(table, dict):
            assert sorted(back[name]) == sorted(table)
            assert all(torch.equal(back[name][i], t) for i, t in table.items())
        else:
            assert torch.equal(back[name], table)
    summary = json.loads((tmp_path / "scores.json").read_text())["summary"]
    assert set(summary) == {"depth", *AXES}


def test_scoring_one_axis_alone_gives_its_scores_among_all():
    """Each axis's scoring function, run alone, gives the same scores as in a pass over every axis (installers
    shared by two axes run once either way), and nothing for the other axes."""
    model = random_model(LAYOUT, seed=3)
    how = {"expert_estimator": "router_load", "progress": False}  # the cheapest estimator: the pass is the point
    every = score_model(model, None, WINDOWS, axes=tuple(AXES), **how)
    for name in AXES:
        alone = score_model(model, None, WINDOWS, axes=(name,), **how)
        assert [n for n in SCORE_TABLES if n in alone] == [name] + ([PER_EXPERT_CHANNELS] if name == "expert_ffn" else [])
        if AXES[name].kind is None:
            assert torch.equal(alone[name], every[name])
        else:
            assert sorted(alone[name]) == _layers(name)
            assert all(torch.equal(alone[name][i], every[name][i]) for i in _layers(name))


def test_plan_round_trips_and_cuts_every_axis():
    units = {
        name: _half(name) if axis.kind is None else {i: _half(name) for i in _layers(name)}
        for name, axis in AXES.items()
    }
    plan = Plan(list(range(LAYOUT.num_layers)), units)
    doc = json.loads(json.dumps(plan.to_dict()))
    # The plan file's keys, in the order every existing layout and prune_plan.json has them.
    assert list(doc) == [
        "layers", "ffn", "mamba_heads", "mamba_head_dim", "attn_heads", "experts", "expert_ffn", "shared_ffn",
        "hidden", "norm_compensation",
    ]  # fmt: skip
    assert Plan.from_dict(doc) == plan
    target = plan.target_layout(LAYOUT)
    for name, axis in AXES.items():  # hand count: half of each group's units, rounded up, in every group
        full, groups = axis.width(LAYOUT), axis.unit(LAYOUT)
        assert axis.width(target) == groups * -(-(full // groups) // 2), name
    small = cut_model(random_model(LAYOUT, seed=4), plan)
    assert small.config.hidden_size == len(units["hidden"])
    assert sum(p.numel() for p in small.parameters()) == target.num_params()
