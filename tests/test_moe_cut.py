"""Surgery on mixture-of-experts models (Nemotron 3): keep-all is bit-exact, removing experts the router never
chooses and dead expert / shared-expert channels leaves the logits unchanged, streamed equals in memory in both
weight-name styles and both expert forms on disk, and the output loads natively."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from minipuzzle.arch import Layout
from minipuzzle.checkpoint.build import load_model
from minipuzzle.checkpoint.read import Checkpoint
from minipuzzle.cut import Plan, cut_checkpoint, cut_model, prune_state_dict
from minipuzzle.errors import UserError
from minipuzzle.testing import (
    cached_and_uncached_greedy,
    moe_layers,
    plant_dead_units,
    random_model,
    rel_err,
    save_model,
    tiny_config,
    tiny_moe_layout,
)

IDS = torch.randint(0, 320, (2, 37), generator=torch.Generator().manual_seed(1))
LAYOUTS = {
    "grouped": tiny_moe_layout(),  # 8 experts in 2 router groups, top 2 from the best group
    "ungrouped": tiny_moe_layout(n_group=1, num_experts_per_tok=3, pattern="EM*E-E"),
    "latent": tiny_moe_layout(moe_latent_size=24, mlp_bias=True),  # routed experts in a latent space (Super)
}


def logits(model):
    with torch.no_grad():
        return model(IDS, use_cache=False).logits




def plans(layout: Layout) -> dict[str, Plan]:
    """One plan per MoE axis, hidden and depth, and one with all of them; different units in each MoE layer."""
    every, moe = list(range(layout.num_layers)), moe_layers(layout)
    per_group = layout.n_routed_experts // layout.n_group
    gen = torch.Generator().manual_seed(3)

    def pick(n, k):
        return sorted(torch.randperm(n, generator=gen)[:k].tolist())

    def experts():  # one expert fewer in every router group
        return sorted(g * per_group + j for g in range(layout.n_group) for j in pick(per_group, per_group - 1))

    w, s = layout.moe_intermediate_size, layout.moe_shared_expert_intermediate_size
    out = {
        "experts": Plan(layers=every, experts={i: experts() for i in moe}),
        "expert_ffn": Plan(layers=every, expert_ffn={i: pick(w, w * 3 // 4) for i in moe}),
        "shared_ffn": Plan(layers=every, shared_ffn={i: pick(s, s * 2 // 3) for i in moe}),
        "hidden": Plan(layers=every, hidden=pick(layout.hidden_size, layout.hidden_size * 3 // 4)),
        "depth": Plan(layers=[i for i in every if i != moe[-1]]),
    }
    kept = [i for i in every if i not in (moe[0], 0)]
    out["all"] = Plan(
        layers=kept,
        experts={i: experts() for i in moe if i in kept},
        expert_ffn={i: pick(w, w // 2) for i in moe if i in kept},
        shared_ffn={i: pick(s, s // 2) for i in moe if i in kept},
        hidden=pick(layout.hidden_size, layout.hidden_size * 5 // 8),
    )
    return out


def model_for(name: str, seed: int = 5):
    layout = LAYOUTS[name]
    return random_model(layout, seed=seed, config=tiny_config(layout, layer_norm_epsilon=1e-7))


@pytest.mark.parametrize("style", ["model", "backbone"])
@pytest.mark.parametrize("split", [True, False])
def test_keep_all_is_bit_exact(style, split, tmp_path):
    model = model_for("grouped")
    ref = logits(model)
    layout = Layout.from_config(model.config)
    every_unit = Plan(
        layers=list(range(layout.num_layers)),
        experts={i: list(range(layout.n_routed_experts)) for i in moe_layers(layout)},
        hidden=list(range(layout.hidden_size)),
    )
    for plan in (Plan.keep_all(layout), every_unit):
        assert torch.equal(logits(cut_model(model, plan)), ref)
    src = save_model(model, tmp_path / "src", style=style, max_shard_bytes=30_000, split_experts=split)
    out = cut_checkpoint(src, every_unit, tmp_path / "out", progress=False)
    assert torch.equal(logits(load_model(out)), ref)
    assert torch.equal(logits(load_model(src)), ref)


@pytest.mark.parametrize("layout_name", list(LAYOUTS))
@pytest.mark.parametrize("axis", ["experts", "expert_ffn", "shared_ffn", "hidden", "depth", "all"])
def test_cutting_dead_units_keeps_logits(layout_name, axis):
    """Never-chosen experts (zero router row, correction bias -1e4: never among a group's best two nor the top-k)
    and zeroed channels removed: the logits stay, up to float rounding (a smaller matrix multiply sums in another
    order) and, for hidden cuts, the norm epsilon."""
    layout = LAYOUTS[layout_name]
    model = model_for(layout_name)
    plan = plans(layout)[axis]
    plant_dead_units(model, plan)
    ref = logits(model)
    small = cut_model(model, plan)
    target = plan.target_layout(layout)
    assert Layout.from_config(small.config) == target
    assert sum(p.numel() for p in small.parameters()) == target.num_params()
    assert target.num_params() < layout.num_params()
    assert rel_err(logits(small), ref) < (1e-4 if axis in ("hidden", "all") else 1e-6)
    if axis == "experts":
        assert target.n_routed_experts == layout.n_routed_experts - layout.n_group
        assert (target.n_group, target.topk_group, target.num_experts_per_tok) == (
            layout.n_group, layout.topk_group, layout.num_experts_per_tok,
        )  # fmt: skip


@pytest.mark.parametrize("layout_name", list(LAYOUTS))
def test_cutting_live_units_changes_logits(layout_name):
    """The exactness tests would pass vacuously if cutting did nothing: live experts and channels matter."""
    model = model_for(layout_name)
    ref = logits(model)
    for axis, plan in plans(LAYOUTS[layout_name]).items():
        assert rel_err(logits(cut_model(model, plan)), ref) > 1e-3, axis


def test_router_slices_follow_the_kept_experts():
    model = model_for("grouped")
    layout = Layout.from_config(model.config)
    plan = plans(layout)["experts"]
    small = cut_model(model, plan)
    for new_i, i in enumerate(plan.layers):
        if layout.pattern[i] != "E":
            continue
        keep = torch.tensor(plan["experts"][i])
        old, new = model.model.layers[i].mixer, small.model.layers[new_i].mixer
        assert torch.equal(new.gate.weight, old.gate.weight[keep])
        assert torch.equal(new.gate.e_score_correction_bias, old.gate.e_score_correction_bias[keep])
        assert torch.equal(new.experts.up_proj, old.experts.up_proj[keep])
        assert torch.equal(new.experts.down_proj, old.experts.down_proj[keep])
        assert new.gate.num_experts == len(keep) == new.experts.num_experts


@pytest.mark.parametrize("style", ["model", "backbone"])
@pytest.mark.parametrize("layout_name", ["grouped", "latent"])
def test_streamed_equals_in_memory_and_loads_natively(style, layout_name, tmp_path):
    layout = LAYOUTS[layout_name]
    model = model_for(layout_name, seed=7)
    plan = plans(layout)["all"]
    in_memory = cut_model(model, plan)
    for split in (True, False):
        src = save_model(model, tmp_path / f"src{split}", style=style, max_shard_bytes=30_000, split_experts=split)
        new_layout, state = prune_state_dict(Checkpoint(src).state_dict(), layout, plan)
        out = cut_checkpoint(src, plan, tmp_path / f"out{split}", max_shard_bytes=20_000, progress=False)
        streamed = Checkpoint(out)
        assert streamed.layout == new_layout == plan.target_layout(layout)
        # Written as transformers writes it: one tensor per kept expert, numbered 0..n-1.
        experts = {k for k in streamed.keys() if ".mixer.experts." in k}
        kept = new_layout.n_routed_experts
        assert experts == {
            f"model.layers.{j}.mixer.experts.{e}.{p}.weight"
            for j, c in enumerate(new_layout.pattern) if c == "E" for e in range(kept) for p in ("up_proj", "down_proj")
        }  # fmt: skip
        assert set(streamed.module_keys()) == set(state) == set(in_memory.state_dict())
        for k, v in state.items():
            assert torch.equal(streamed.get(k), v), k
            assert torch.equal(in_memory.state_dict()[k], v), k
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "nemotron_h" and "auto_map" not in cfg and cfg["n_routed_experts"] == kept
    hf = AutoModelForCausalLM.from_pretrained(out)
    assert type(hf).__name__ == "NemotronHForCausalLM"
    # Tensors memory-mapped at unaligned offsets may take another SIMD path: compare on owned copies.
    with torch.no_grad():
        for p in hf.parameters():
            p.data = p.data.clone()
    assert torch.equal(logits(hf), logits(in_memory))
    # Needs a cached forward: the written model generates (the plan dropped layers 0 and 1) as it decodes uncached.
    cached, uncached = cached_and_uncached_greedy(hf, IDS[:, :9], 4)
    assert torch.equal(cached, uncached)


def test_bad_moe_plans_are_one_line_user_errors():
    layout = LAYOUTS["grouped"]  # 8 experts, 2 groups of 4, top 2 from 1 group
    every, moe = list(range(layout.num_layers)), moe_layers(layout)
    cases = {
        "unevenly across its 2 groups": {moe[0]: [0, 1, 2, 4, 5, 6], moe[1]: [0, 1, 2, 3, 4, 5]},
        "keeps 1 expert": {i: [0, 4] for i in moe},  # one per group: a group needs its best two
        "different numbers of experts": {moe[0]: [0, 1, 4, 5], moe[1]: [0, 1, 2, 4, 5, 6]},
        "ascending, unique": {i: [0, 9] for i in moe},
    }
    for needle, experts in cases.items():
        with pytest.raises(UserError, match=needle) as e:
            Plan(layers=every, experts=experts).target_layout(layout)
        assert "\n" not in str(e.value)
    # Top 3 from 1 group of 2 experts cannot be chosen.
    wide = tiny_moe_layout(num_experts_per_tok=3)
    with pytest.raises(UserError, match="too few for num_experts_per_tok 3"):
        Plan(layers=every, experts={i: [0, 1, 4, 5] for i in moe}).target_layout(wide)
    with pytest.raises(UserError, match="not a kept 'E' layer"):
        Plan(layers=every, expert_ffn={0: [0, 1]}).target_layout(layout)


def test_cut_command_on_a_moe_checkpoint(tmp_path):
    from minipuzzle.testing import run_cli

    layout = LAYOUTS["grouped"]
    model = model_for("grouped")
    plan = plans(layout)["all"]
    plant_dead_units(model, plan)
    src = save_model(model, tmp_path / "src", style="backbone")
    (tmp_path / "plan.json").write_text(json.dumps(plan.to_dict()))
    code, _, err = run_cli(["cut", str(src), "--plan", str(tmp_path / "plan.json"), "-o", str(tmp_path / "out")])
    assert code == 0, err
    assert Plan.from_dict(json.loads((tmp_path / "out" / "prune_plan.json").read_text())["plan"]) == plan
    assert rel_err(logits(load_model(tmp_path / "out")), logits(model)) < 1e-4


def test_candidate_ranking_streams_moe_checkpoints(tmp_path):
    """Ranking a candidate cuts the source's merged expert tensors layer by layer (`prune.ranking.PrunedStack`):
    the same statistics as pruning the model in memory."""
    from minipuzzle.prune.ranking import measure_in_memory, measure_streamed

    model = model_for("latent")
    src = save_model(model, tmp_path / "src", style="backbone")
    candidates = [plans(LAYOUTS["latent"])[axis] for axis in ("experts", "all")]
    ids = IDS[:, :20]
    assert measure_streamed(src, candidates, ids) == measure_in_memory(model, candidates, ids)
