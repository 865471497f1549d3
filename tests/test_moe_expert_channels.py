"""Per-expert channel choice for the routed experts (`plan["expert_channels"]`): every expert keeps the same number of
channels but its own ones. Dead channels that differ per expert are cut exactly; the cut matrices are the source
experts' own rows and columns; streamed equals in memory in both weight-name styles and both expert forms on disk."""

import pytest
import torch

from minipuzzle.arch import Layout
from minipuzzle.checkpoint.read import Checkpoint
from minipuzzle.cut import Plan, cut_checkpoint, cut_model, prune_state_dict
from minipuzzle.errors import UserError
from minipuzzle.testing import (
    moe_layers,
    plant_dead_units,
    random_model,
    rel_err,
    save_model,
    tiny_config,
    tiny_layout,
    tiny_moe_layout,
)

IDS = torch.randint(0, 320, (2, 29), generator=torch.Generator().manual_seed(2))
LAYOUTS = {
    "grouped": tiny_moe_layout(),  # 8 experts of width 32 in 2 router groups
    "latent": tiny_moe_layout(moe_latent_size=24, mlp_bias=True),
}


def logits(model):
    with torch.no_grad():
        return model(IDS, use_cache=False).logits




def per_expert_plan(layout: Layout, keep: int, seed: int = 0, drop_experts: bool = False) -> Plan:
    """Each expert of each MoE layer keeps `keep` random channels of its own (different sets per expert)."""
    gen = torch.Generator().manual_seed(seed)
    w = layout.moe_intermediate_size
    chans = {
        i: [sorted(torch.randperm(w, generator=gen)[:keep].tolist()) for _ in range(layout.n_routed_experts)]
        for i in moe_layers(layout)
    }
    experts = None
    if drop_experts:  # expert 0 of every router group goes: the kept experts' channel lists must follow them
        per = layout.n_routed_experts // layout.n_group
        experts = {i: [e for e in range(layout.n_routed_experts) if e % per] for i in moe_layers(layout)}
    return Plan(layers=list(range(layout.num_layers)), expert_channels=chans, experts=experts)


def model_for(name: str, seed: int = 5):
    layout = LAYOUTS[name]
    return random_model(layout, seed=seed, config=tiny_config(layout, layer_norm_epsilon=1e-7))


@pytest.mark.parametrize("layout_name", list(LAYOUTS))
def test_dead_channels_that_differ_per_expert_are_cut_exactly(layout_name):
    layout, model = LAYOUTS[layout_name], model_for(layout_name)
    plan = per_expert_plan(layout, keep=24)
    # The planted dead channels really differ between experts (else this would test the shared choice).
    i = moe_layers(layout)[0]
    assert len({tuple(c) for c in plan["expert_channels"][i]}) == layout.n_routed_experts
    plant_dead_units(model, plan)
    ref = logits(model)
    small = cut_model(model, plan)
    target = plan.target_layout(layout)
    assert target.moe_intermediate_size == 24 and Layout.from_config(small.config) == target
    assert sum(p.numel() for p in small.parameters()) == target.num_params() < layout.num_params()
    assert rel_err(logits(small), ref) < 1e-6
    # One shared set of 24 channels cannot keep every expert's live ones: the same count cut alike is not exact.
    shared = Plan(layers=plan.layers, expert_ffn={i: list(range(24)) for i in moe_layers(layout)})
    assert rel_err(logits(cut_model(model, shared)), ref) > 1e-3


def test_each_expert_keeps_its_own_rows_and_columns():
    """Against plain indexing of the source tensors, expert by expert (kept experts renumbered in order)."""
    layout, model = LAYOUTS["grouped"], model_for("grouped")
    plan = per_expert_plan(layout, keep=16, seed=1, drop_experts=True)
    small = cut_model(model, plan)
    assert rel_err(logits(small), logits(model)) > 1e-3  # live channels: the cut is not vacuous
    for new_i, i in enumerate(plan.layers):
        if layout.pattern[i] != "E":
            continue
        old, new = model.model.layers[i].mixer.experts, small.model.layers[new_i].mixer.experts
        assert new.up_proj.shape == (len(plan["experts"][i]), 16, layout.hidden_size)
        for j, e in enumerate(plan["experts"][i]):
            c = plan["expert_channels"][i][e]
            assert torch.equal(new.up_proj[j], old.up_proj[e][c, :])
            assert torch.equal(new.down_proj[j], old.down_proj[e][:, c])


@pytest.mark.parametrize("style", ["model", "backbone"])
def test_streamed_equals_in_memory_in_both_expert_forms(style, tmp_path):
    layout, model = LAYOUTS["grouped"], model_for("grouped", seed=7)
    every = list(range(layout.num_layers))
    base = per_expert_plan(layout, keep=16, seed=2, drop_experts=True)
    plan = Plan(layers=every[:4] + every[5:], experts=base["experts"], expert_channels=base["expert_channels"],
                hidden=list(range(0, layout.hidden_size, 2)))  # fmt: skip
    plan = Plan.from_dict(plan.to_dict())  # the plan file's form
    in_memory = cut_model(model, plan).state_dict()
    for split in (True, False):
        src = save_model(model, tmp_path / f"src{split}", style=style, max_shard_bytes=30_000, split_experts=split)
        new_layout, state = prune_state_dict(Checkpoint(src).state_dict(), layout, plan)
        out = cut_checkpoint(src, plan, tmp_path / f"out{split}", max_shard_bytes=20_000, progress=False)
        streamed = Checkpoint(out)
        assert streamed.layout == new_layout == plan.target_layout(layout)
        assert set(streamed.module_keys()) == set(state) == set(in_memory)
        for k, v in state.items():
            assert torch.equal(streamed.get(k), v), k
            assert torch.equal(in_memory[k], v), k


def test_bad_per_expert_plans_are_one_line_user_errors():
    layout = LAYOUTS["grouped"]
    every, moe = list(range(layout.num_layers)), moe_layers(layout)
    good = [list(range(16))] * layout.n_routed_experts
    cases = {
        "different numbers of channels per expert": {i: [list(range(16))] * 7 + [list(range(8))] for i in moe},
        "one per expert: 8": {i: good[:7] for i in moe},
        "ascending, unique": {i: good[:7] + [[3, 2]] for i in moe},
        "not a kept 'E' layer": {0: good},
        "different numbers of expert_ffn per layer": {moe[0]: good, moe[1]: [list(range(8))] * 8},
    }
    for needle, chans in cases.items():
        with pytest.raises(UserError, match=needle) as e:
            Plan(layers=every, expert_channels=chans).target_layout(layout)
        assert "\n" not in str(e.value)
    with pytest.raises(UserError, match="not a kept 'E' layer"):  # a dense model has no experts to give channels
        Plan(layers=[0, 1, 2], expert_channels={1: good}).target_layout(tiny_layout())
    with pytest.raises(UserError, match="both expert_ffn and expert_channels"):
        Plan(layers=every, expert_channels={moe[0]: good}, expert_ffn={moe[0]: list(range(16))}).target_layout(layout)
    with pytest.raises(UserError, match=r"different numbers of expert_ffn per layer \(\[8, 16\]\)"):
        Plan(layers=every, expert_channels={moe[0]: good}, expert_ffn={moe[1]: list(range(8))}).target_layout(layout)
    with pytest.raises(UserError, match="one channel list per expert"):
        Plan.from_dict({"layers": every, "expert_channels": {str(moe[0]): [1, 2]}})


# ---- scores and the plan ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seq", ["abs_mean", "signed_mean", "l2", "max"])
def test_per_expert_rows_equal_a_dense_brute_force(seq):
    """`per_expert_channel_rows` against the [B, T, E, width] activation built densely, token by token."""
    from minipuzzle.score.experts import per_expert_channel_rows

    model = random_model(LAYOUTS["grouped"], seed=4)
    mixer = model.model.layers[1].mixer
    seen = {}
    handle = mixer.experts.register_forward_hook(lambda m, a, out: seen.update(args=a))
    with torch.no_grad():
        model(IDS, use_cache=False)
    handle.remove()
    x, idx, w = seen["args"]
    rows, t = IDS.shape
    ex = mixer.experts
    dense = torch.zeros(rows * t, ex.num_experts, ex.up_proj.shape[1])
    for n in range(rows * t):
        for slot in range(idx.shape[1]):
            e = int(idx[n, slot])
            dense[n, e] = torch.relu(ex.up_proj[e].detach() @ x[n]).pow(2) * w[n, slot]
    dense = dense.view(rows, t, *dense.shape[1:])
    want = {"abs_mean": dense.abs().mean(1), "signed_mean": dense.mean(1), "l2": dense.pow(2).mean(1).sqrt(),
            "max": dense.abs().amax(1)}[seq]  # fmt: skip
    with torch.no_grad():
        got = per_expert_channel_rows(mixer, x, idx, w, (rows, t), seq)
    assert got.shape == want.shape and torch.allclose(got, want, rtol=1e-5, atol=1e-7)
    assert (want > 0).any(dim=(0, 2)).sum() >= 4  # several experts were routed to


def test_scores_find_per_expert_dead_channels_and_the_plan_cuts_them_exactly(tmp_path):
    """Channels planted dead differently in each expert score exactly 0 in that expert only; the search's
    per-expert choice keeps exactly the live ones, and the cut model computes the same logits. The shared
    scores, summed over experts, keep every channel alive, so the shared choice cannot find them."""
    from minipuzzle.score.scores import Scores
    from minipuzzle.score.scoring import score_model
    from minipuzzle.search import DamageModel, SearchSpace, make_budget, search
    from minipuzzle.search.plan import choose_units

    layout, model = LAYOUTS["grouped"], model_for("grouped", seed=6)
    planted = per_expert_plan(layout, keep=16, seed=3)
    plant_dead_units(model, planted)
    windows = torch.randint(0, layout.vocab_size, (6, 32), generator=torch.Generator().manual_seed(8))
    s = score_model(model, None, windows, ["expert_ffn"], progress=False, width_agg="abs_mean,mean")
    for i, lists in planted["expert_channels"].items():
        table = s["expert_channels"][i]
        assert table.shape == (layout.n_routed_experts, 32)
        for e, live in enumerate(lists):
            dead = [c for c in range(32) if c not in live]
            assert table[e, dead].eq(0).all() and table[e, live].gt(0).all(), (i, e)
        # Summed over the experts (a linear statistic): the shared scores, every channel of which some expert uses.
        assert torch.allclose(table.sum(0), s["expert_ffn"][i], rtol=1e-5) and s["expert_ffn"][i].gt(0).all()
    s.save(tmp_path)
    s = Scores.load(tmp_path)  # the per-expert table survives the scores file
    space = SearchSpace.build(layout, "expert_ffn")
    dmodel = DamageModel(s, space)
    target = layout.replace(moe_intermediate_size=16)
    best = next(c for c in search(space, make_budget(layout, target=str(target.num_params())), dmodel, k=4)
                if c.widths["expert_ffn"] == 16)  # fmt: skip
    plan = choose_units(best, dmodel, s, expert_channels="per_expert")
    assert plan["expert_ffn"] is None and plan["expert_channels"] == planted["expert_channels"]
    ref = logits(model)
    assert rel_err(logits(cut_model(model, plan)), ref) < 1e-6
    shared = choose_units(best, dmodel, s, expert_channels="shared")
    assert shared["expert_channels"] is None and rel_err(logits(cut_model(model, shared)), ref) > 1e-3
    with pytest.raises(UserError, match="unknown expert channel choice"):
        choose_units(best, dmodel, s, expert_channels="each")
    # The same through `minipuzzle search --expert-channels per_expert`, and a bad choice is a one-line error.
    from minipuzzle.search.plan import read_plan
    from minipuzzle.testing import run_cli

    src = save_model(model, tmp_path / "src")
    args = ["search", str(src), "--scores", str(tmp_path), "--target", str(target.num_params()), "--axes",
            "expert_ffn", "-o", str(tmp_path / "layout.yaml"), "--expert-channels"]  # fmt: skip
    code, _, err = run_cli([*args, "per_expert"])
    assert code == 0, err
    assert read_plan(tmp_path / "layout.yaml")["expert_channels"] == planted["expert_channels"]
    code, _, err = run_cli([*args, "each"])
    assert code == 2 and "expert-channels" in err and len(err.strip().splitlines()) == 1, err
    s["expert_channels"] = {}  # scores from before this version
    with pytest.raises(UserError, match="no per-expert channel scores"):
        choose_units(best, dmodel, s, expert_channels="per_expert")


def test_recipe_expert_channels_reach_the_prune_settings():
    import yaml

    from minipuzzle.recipe import RECIPES_DIR, parse_recipe, prune_settings

    doc = yaml.safe_load((RECIPES_DIR / "demo-moe.yaml").read_text())
    assert prune_settings(parse_recipe(doc)).expert_channels == "per_expert"  # the default moe_quality supports
    doc["prune"]["expert_channels"] = "shared"
    assert prune_settings(parse_recipe(doc)).expert_channels == "shared"
    doc["prune"]["expert_channels"] = "each"
    with pytest.raises(UserError, match=r"prune\.expert_channels"):
        parse_recipe(doc)


def test_the_moe_demo_teacher_ships_with_the_package():
    """The shipped teacher is the preset's layout, Nemotron 3-shaped, with a trained (nonzero) correction bias."""
    import json

    from minipuzzle.checkpoint.resolve import resolve_checkpoint
    from minipuzzle.presets import DEMO_MOE_LAYOUT, get_preset

    path = resolve_checkpoint("demo-moe")
    assert path == get_preset("demo-moe").local_path
    ckpt = Checkpoint(path)
    assert ckpt.layout == DEMO_MOE_LAYOUT and ckpt.layout.is_moe and set(ckpt.layout.pattern) == {"M", "E", "*"}
    assert ckpt.config.routed_scaling_factor == 2.5 and ckpt.config.n_shared_experts == 1
    bias = [ckpt.get(k) for k in ckpt.keys() if k.endswith("e_score_correction_bias")]
    assert len(bias) == DEMO_MOE_LAYOUT.pattern.count("E") and all(b.abs().sum() > 0 for b in bias)
    record = json.loads((path / "training.json").read_text())
    assert record["steps"] > 0 and record["held_out_files"] and (path / "tokenizer.json").is_file()
