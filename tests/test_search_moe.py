"""The search on mixture-of-experts layouts (Nemotron 3): `E` layers as a fourth kind, the expert axes, active-
parameter budgets in the solver's bounds and band, and the published Nano 3 search space (synthetic scores, no
model needed)."""

import itertools
import json

import pytest
import torch

from minipuzzle.arch import Layout
from minipuzzle.errors import UserError
from minipuzzle.presets import NANO3_PRUNED_22B, get_preset
from minipuzzle.score.scores import Scores
from minipuzzle.search import DamageModel, SearchSpace, count_pool, in_pool, make_budget, search
from minipuzzle.search.plan import choose_units, layout_document
from minipuzzle.search.stage import build_space, count_feasible, dry_run
from minipuzzle.settings import PruneSettings
from minipuzzle.testing import run_cli, tiny_layout


def tiny_moe(**overrides) -> Layout:
    """Every layer kind, 8 experts in 2 router groups (top 2 from the best group), a small shared expert."""
    moe = dict(pattern="ME*-EMEM", n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
               moe_shared_expert_intermediate_size=48, n_group=2, topk_group=1)  # fmt: skip
    return tiny_layout(**{**moe, **overrides})


def synthetic_scores(layout: Layout, seed: int = 0) -> Scores:
    """Random positive scores for every unit of every axis, the expert axes included."""
    g = torch.Generator().manual_seed(seed)

    def rand(n):
        return torch.rand(n, generator=g) + 0.01

    s = Scores(pattern=layout.pattern, depth=rand(layout.num_layers), hidden=rand(layout.hidden_size))
    for i, kind in enumerate(layout.pattern):
        if kind == "-":
            s["ffn"][i] = rand(layout.intermediate_size)
        elif kind == "M":
            s["mamba_heads"][i], s["mamba_head_dim"][i] = rand(layout.mamba_num_heads), rand(layout.mamba_head_dim)
        elif kind == "*":
            s["attn_heads"][i] = rand(layout.num_attention_heads)
        else:
            s["experts"][i], s["expert_ffn"][i] = rand(layout.n_routed_experts), rand(layout.moe_intermediate_size)
            s["shared_ffn"][i] = rand(layout.moe_shared_expert_intermediate_size)
    return s


# ---- the space ---------------------------------------------------------------------------------------------------


def test_moe_space_has_a_fourth_kind_and_the_expert_axes():
    src = tiny_moe()
    space = SearchSpace.build(src, "depth,experts,expert_ffn,shared_ffn", min_width=0.25)
    assert space.kinds == ("M", "-", "*", "E") and space.layers["E"] == (2, 3)
    # Experts: multiples of the 2 router groups and at least 2 per group (top-2 from one group), never below.
    assert space.widths["experts"] == [8, 6, 4]
    # Expert widths step by 16 by default (FP8/FP4 kernels); the shared expert's too.
    assert space.widths["expert_ffn"] == [32, 16] and space.widths["shared_ffn"] == [48, 32, 16]
    lay = space.layout({**{a: v[-1] for a, v in space.widths.items()}}, {"M": 2, "-": 1, "*": 1, "E": 2})
    assert (lay.count("E"), lay.n_routed_experts, lay.num_experts_per_tok) == (2, 4, 2)
    # A router that picks its top 3 from one group of 2 groups needs 3 experts per group: 6 is the fewest.
    three = SearchSpace.build(tiny_moe(num_experts_per_tok=3), "experts", min_width=0.1)
    assert three.widths["experts"] == [8, 6]
    # Dense sources search the dense kinds only, as before.
    assert SearchSpace.build(tiny_layout(), "depth,ffn").kinds == ("M", "-", "*")


def test_listed_widths_and_their_errors():
    src = tiny_moe()
    space = SearchSpace.build(src, "experts,expert_ffn,hidden", widths={"expert_ffn": [8, 32, 16], "hidden": [40]})
    assert space.widths["expert_ffn"] == [32, 16, 8] and space.widths["hidden"] == [40]
    assert space.describe()["widths"]["expert_ffn"] == {"max": 32, "min": 8, "values": [32, 16, 8], "count": 3}
    bad = [
        ({"experts": [5]}, "multiples of 2"),  # uneven across the 2 router groups
        ({"experts": [2]}, "from 4"),  # too few for the router's top-2 within one group
        ({"expert_ffn": [64]}, "source's 32"),  # pruning never widens
        ({"expert_ffn": [20]}, "multiples of 8 .*grouped expert matmul"),  # the cut refuses it in bf16
        ({"hidden": [44]}, "multiples of 8"),  # the experts read the hidden size
        ({"shared_ffn": [32]}, "--axes"),  # not searched
        ({"width": [1]}, "unknown axis"),
    ]
    for widths, message in bad:
        with pytest.raises(UserError, match=message):
            SearchSpace.build(src, "experts,expert_ffn,hidden", widths=widths)
    with pytest.raises(UserError, match="both a --step and --widths"):
        SearchSpace.build(src, "expert_ffn", steps={"expert_ffn": 16}, widths={"expert_ffn": [16]})
    with pytest.raises(UserError, match="does not cut"):  # a dense model has no experts to list
        SearchSpace.build(tiny_layout(), "depth,experts", widths={"experts": [4]})
    assert PruneSettings(target="0.5", widths="expert_ffn=16,32,hidden=48").widths == {
        "expert_ffn": [16, 32], "hidden": [48]
    }  # fmt: skip
    with pytest.raises(UserError, match="--widths"):
        PruneSettings(target="0.5", widths="16,32")


# ---- the solver against brute force ------------------------------------------------------------------------------


def brute_force(space, budget, model, band):
    """Every point of the space, checked with Layout directly (parameters, active parameters, memory). A point that
    fits is a candidate when it uses at least (1 - band) of a limit or when none of its one-step neighbours (one
    more layer of a kind, an axis's next larger width) fits: maximality is read off the enumeration itself."""
    fitting = {}
    for widths in space.width_combos():
        ranges = [range(lo, hi + 1) for lo, hi in space.layers.values()]
        for counts in itertools.product(*ranges):
            counts = dict(zip(space.kinds, counts))
            lay = space.layout(widths, counts)
            used = [lay.num_params() / budget.params] if budget.params is not None else []
            if budget.active_params is not None:
                used.append(lay.num_active_params() / budget.active_params)
            if budget.memory is not None:
                used.append(budget.memory_of(lay)["total"] / budget.memory)
            if max(used) <= 1:
                fitting[_point(widths, counts)] = (widths, counts, max(used))
    best = []
    for widths, counts, use in fitting.values():
        grown = [counts | {k: counts[k] + 1} for k, (_, hi) in space.layers.items() if counts[k] < hi]
        wider = [widths | {a: opts[opts.index(widths[a]) - 1]} for a, opts in space.widths.items()
                 if opts.index(widths[a]) > 0]  # fmt: skip
        neighbours = [_point(widths, g) for g in grown] + [_point(w, counts) for w in wider]
        if use >= 1 - band or not any(n in fitting for n in neighbours):
            best.append(model.damage(widths, counts))
    return sorted(best)


def _point(widths, counts):
    return tuple(sorted(widths.items())), tuple(sorted(counts.items()))


BUDGETS = {
    "active": dict(target_active="0.8"),
    "params+active": dict(target="0.85", target_active="0.9"),
    "active+memory": dict(target_active="0.9", memory="165000", context=64),
}


@pytest.mark.parametrize("band", [0.0, 0.05, 0.3])
@pytest.mark.parametrize("budget_name", list(BUDGETS))
def test_moe_solver_matches_brute_force_and_mip(budget_name, band):
    src = tiny_moe(hidden_size=32, mamba_num_heads=4)
    space = SearchSpace.build(src, "depth,experts,expert_ffn,shared_ffn,mamba_heads,hidden", steps={"hidden": 8})
    model = DamageModel(synthetic_scores(src, seed=4), space)
    budget = make_budget(src, **BUDGETS[budget_name])
    ref = brute_force(space, budget, model, band)
    assert len(ref) >= 5
    assert count_pool(space, budget, band) == len(ref)
    assert count_pool(space, budget, 1.0) == count_feasible(space, budget) == len(brute_force(space, budget, model, 1.0))
    for method in ("enumerate", "mip"):
        got = search(space, budget, model, k=5, method=method, band=band)
        assert [c.damage for c in got] == pytest.approx(ref[:5], abs=1e-12)
        for c in got:
            lay = space.layout(c.widths, c.counts)
            assert c.active_params == lay.num_active_params() <= budget.active_params
            assert in_pool(space, budget, c.widths, c.counts, band)


def test_active_limit_binds_in_the_solver_bounds():
    """Under an active-parameter limit alone, the total is free: the best layouts keep every expert (experts cost
    total parameters, hardly active ones) and cut what every token runs through."""
    src = tiny_moe()
    space = SearchSpace.build(src, "depth,experts,expert_ffn,shared_ffn")
    model = DamageModel(synthetic_scores(src, seed=1), space)
    budget = make_budget(src, target_active="0.9")
    feasible = count_feasible(space, budget)
    assert 0 < feasible < space.size()
    best = search(space, budget, model, k=3)
    assert all(c.active_params <= budget.active_params < src.num_active_params() for c in best)
    assert best[0].widths["experts"] == 8


# ---- candidates, plans and reports -------------------------------------------------------------------------------


def test_moe_choose_units_keeps_top_experts_per_group_and_reports_moe():
    src = tiny_moe()
    scores = synthetic_scores(src, seed=2)
    for i in scores["experts"]:  # experts 1 and 6 (one in each group of 4) never chosen; expert channels 0-3 dead
        scores["experts"][i][[1, 6]] = 0.0
        scores["expert_ffn"][i][:16] = 0.0
    space = SearchSpace.build(src, "depth,experts,expert_ffn,shared_ffn")
    model = DamageModel(scores, space)
    widths = {a: v[0] for a, v in space.widths.items()} | {"experts": 6, "expert_ffn": 16}
    target = space.layout(widths, {k: hi for k, (_, hi) in space.layers.items()})
    best = search(space, make_budget(src, target=str(target.num_params())), model, k=2)[0]
    assert best.damage == 0.0 and best.widths == widths
    plan = choose_units(best, model, scores, expert_channels="shared")  # the summed channel scores planted above
    moe_layers = [i for i, kind in enumerate(src.pattern) if kind == "E"]
    assert sorted(plan["experts"]) == moe_layers and all(v == [0, 2, 3, 4, 5, 7] for v in plan["experts"].values())
    assert all(v == list(range(16, 32)) for v in plan["expert_ffn"].values()) and plan["shared_ffn"] is None
    doc = layout_document(plan, src, cand=best)
    assert doc["result"]["layers"] == {"mamba": 3, "mlp": 1, "attention": 1, "moe": 3}
    assert doc["result"]["widths"]["experts"] == 6 and doc["result"]["active_params"] == target.num_active_params()
    assert best.to_dict()["layers"]["moe"] == 3 and best.to_dict()["active_params"] == target.num_active_params()


def test_dense_reports_name_no_moe():
    src = tiny_layout()
    space = SearchSpace.build(src, "depth,ffn")
    best = search(space, make_budget(src, target="0.8"), DamageModel(synthetic_scores(src), space), k=1)[0]
    row = best.to_dict()
    assert set(row["layers"]) == {"mamba", "mlp", "attention"} and "active_params" not in row
    assert set(row["widths"]) == {"ffn", "mamba_heads", "mamba_head_dim", "attn_heads", "hidden"}


# ---- the published Nano 3 search -----------------------------------------------------------------------------------

# Model Optimizer's Nemotron 3 Nano space: Mamba heads and head dim 48/56/64, experts 96..128 step 8 (steps of 8 from
# the source down to 75 %), hidden, expert and shared widths the multiples of 256 from 75 % of the source plus the
# source's own width (listed). Their depth axis, 46..52 layers step 2, is a total layer count; ours counts each kind:
# Mamba and MoE layers 20..23 each (--min-layers 0.85) and all 6 attention layers.
NANO3_SPACE = dict(
    axes="depth,hidden,mamba_heads,mamba_head_dim,experts,expert_ffn,shared_ffn",
    steps="mamba_heads=8,mamba_head_dim=8,experts=8",
    widths="hidden=2048,2304,2560,2688,expert_ffn=1536,1792,1856,shared_ffn=2816,3072,3328,3584,3712",
    min_width=0.75,
    min_layers=0.85,
)
PUBLISHED_22B = (
    {"hidden": 2304, "mamba_heads": 64, "mamba_head_dim": 64, "experts": 104, "expert_ffn": 1856, "shared_ffn": 3072},
    {"M": 23, "-": 0, "*": 6, "E": 23},
)


def nano3_settings(**extra) -> PruneSettings:
    return PruneSettings(target="24e9", target_active="3e9", **NANO3_SPACE, **extra)


def test_published_nano3_space_holds_the_published_22b():
    src = get_preset("nano3").layout
    st = nano3_settings()
    space, budget = build_space(src, st), st.budget_for(src)
    assert space.widths["hidden"] == [2688, 2560, 2304, 2048] and space.widths["shared_ffn"][-2:] == [3072, 2816]
    assert space.widths["experts"] == list(range(128, 95, -8)) and space.widths["expert_ffn"] == [1856, 1792, 1536]
    # 2 x 2 x 3 x 3 x 5 x 3 x 5 / 4: the published 10,800 layouts are these 2,700 width combinations x 4 depths.
    assert space.num_width_combos() == 2700 and space.num_layer_combos() == 16
    widths = {a: v[0] for a, v in space.widths.items()} | PUBLISHED_22B[0]
    lay = space.layout(widths, PUBLISHED_22B[1])
    assert lay == NANO3_PRUNED_22B and (lay.num_params(), lay.num_active_params()) == (22276865600, 2999647808)
    assert budget.fits(lay) and in_pool(space, budget, widths, PUBLISHED_22B[1], st.band)
    assert in_pool(space, budget, widths, PUBLISHED_22B[1], 0.0)  # 8 more experts would pass 3e9 active


def test_published_22b_is_what_the_search_picks_when_only_its_cuts_are_free():
    """Scores that make exactly the published cuts free (hidden channels past 2304, experts past 104, shared
    channels past 3072 score zero): both methods find the published layout with zero predicted damage."""
    src = get_preset("nano3").layout
    st = nano3_settings()
    space, budget = build_space(src, st), st.budget_for(src)
    scores = synthetic_scores(src, seed=7)
    scores["hidden"][2304:] = 0.0
    for i in scores["experts"]:
        scores["experts"][i][104:] = 0.0
        scores["shared_ffn"][i][3072:] = 0.0
    model = DamageModel(scores, space)
    for method in ("enumerate", "mip"):
        best = search(space, budget, model, k=2, method=method, band=st.band)[0]
        assert best.damage == 0.0 and best.counts == PUBLISHED_22B[1]
        assert {a: best.widths[a] for a in PUBLISHED_22B[0]} == PUBLISHED_22B[0]
        assert (best.params, best.active_params) == (22276865600, 2999647808)


def test_nano3_dry_run_prints_the_space_feasible_and_pool():
    src = get_preset("nano3").layout
    plan = dry_run(src, nano3_settings())
    assert plan["space"]["size"] == 2700 * 16 and 0 < plan["pool_layouts"] < plan["feasible_layouts"] < 2700 * 16
    # Nemotron 3 Nano's counts, as transformers' own model on the meta device has them (test_arch_moe).
    assert (plan["source"]["params"], plan["source"]["active_params"]) == (31_577_937_344, 3_580_073_408)
    flags = [f"--{key.replace('_', '-')}={value}" for key, value in NANO3_SPACE.items()]
    base = ["prune", "nano3", "--target", "24b", "--target-active", "3b", *flags, "--dry-run"]
    code, out, err = run_cli(base)
    assert code == 0, err
    assert "31,577,937,344 parameters (3,580,073,408 active)" in out
    assert "43,200 layouts" in out and f"layouts within the budget: {plan['feasible_layouts']:,}" in out
    assert f"{plan['pool_layouts']:,} layouts" in out
    code, out, _ = run_cli([*base, "--json"])
    assert code == 0 and json.loads(out)["feasible_layouts"] == plan["feasible_layouts"]
    code, _, err = run_cli([*base[:-1], "--widths", "expert_ffn=1536,2048", "--dry-run"])
    assert code == 2 and "--widths expert_ffn=2048" in err and len(err.strip().splitlines()) == 1
