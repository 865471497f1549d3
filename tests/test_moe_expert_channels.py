"""Per-expert channel choice for the routed experts (`Plan.expert_channels`): every expert keeps the same number of
channels but its own ones. Dead channels that differ per expert are cut exactly; the cut matrices are the source
experts' own rows and columns; streamed equals in memory in both weight-name styles and both expert forms on disk."""

import pytest
import torch

from minipuzzle.arch import Layout
from minipuzzle.checkpoint import Checkpoint
from minipuzzle.errors import UserError
from minipuzzle.surgery import Plan, prune_checkpoint, prune_model, prune_state_dict
from minipuzzle.testing import plant_dead_units, random_model, save_model, tiny_config, tiny_moe_layout

IDS = torch.randint(0, 320, (2, 29), generator=torch.Generator().manual_seed(2))
LAYOUTS = {
    "grouped": tiny_moe_layout(),  # 8 experts of width 32 in 2 router groups
    "latent": tiny_moe_layout(moe_latent_size=24, mlp_bias=True),
}


def logits(model):
    with torch.no_grad():
        return model(IDS, use_cache=False).logits


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


def moe_layers(layout):
    return [i for i, c in enumerate(layout.pattern) if c == "E"]


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
    assert len({tuple(c) for c in plan.expert_channels[i]}) == layout.n_routed_experts
    plant_dead_units(model, plan)
    ref = logits(model)
    small = prune_model(model, plan)
    target = plan.target_layout(layout)
    assert target.moe_intermediate_size == 24 and Layout.from_config(small.config) == target
    assert sum(p.numel() for p in small.parameters()) == target.num_params() < layout.num_params()
    assert rel_err(logits(small), ref) < 1e-6
    # One shared set of 24 channels cannot keep every expert's live ones: the same count cut alike is not exact.
    shared = Plan(layers=plan.layers, expert_ffn={i: list(range(24)) for i in moe_layers(layout)})
    assert rel_err(logits(prune_model(model, shared)), ref) > 1e-3


def test_each_expert_keeps_its_own_rows_and_columns():
    """Against plain indexing of the source tensors, expert by expert (kept experts renumbered in order)."""
    layout, model = LAYOUTS["grouped"], model_for("grouped")
    plan = per_expert_plan(layout, keep=16, seed=1, drop_experts=True)
    small = prune_model(model, plan)
    assert rel_err(logits(small), logits(model)) > 1e-3  # live channels: the cut is not vacuous
    for new_i, i in enumerate(plan.layers):
        if layout.pattern[i] != "E":
            continue
        old, new = model.model.layers[i].mixer.experts, small.model.layers[new_i].mixer.experts
        assert new.up_proj.shape == (len(plan.experts[i]), 16, layout.hidden_size)
        for j, e in enumerate(plan.experts[i]):
            c = plan.expert_channels[i][e]
            assert torch.equal(new.up_proj[j], old.up_proj[e][c, :])
            assert torch.equal(new.down_proj[j], old.down_proj[e][:, c])


@pytest.mark.parametrize("style", ["model", "backbone"])
def test_streamed_equals_in_memory_in_both_expert_forms(style, tmp_path):
    layout, model = LAYOUTS["grouped"], model_for("grouped", seed=7)
    every = list(range(layout.num_layers))
    base = per_expert_plan(layout, keep=16, seed=2, drop_experts=True)
    plan = Plan(layers=every[:4] + every[5:], experts=base.experts, expert_channels=base.expert_channels,
                hidden=list(range(0, layout.hidden_size, 2)))  # fmt: skip
    plan = Plan.from_dict(plan.to_dict())  # the plan file's form
    in_memory = prune_model(model, plan).state_dict()
    for split in (True, False):
        src = save_model(model, tmp_path / f"src{split}", style=style, max_shard_bytes=30_000, split_experts=split)
        new_layout, state = prune_state_dict(Checkpoint(src).state_dict(), layout, plan)
        out = prune_checkpoint(src, plan, tmp_path / f"out{split}", max_shard_bytes=20_000, progress=False)
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
    with pytest.raises(UserError, match="both expert_ffn and expert_channels"):
        Plan(layers=every, expert_channels={moe[0]: good}, expert_ffn={moe[0]: list(range(16))}).target_layout(layout)
    with pytest.raises(UserError, match=r"different numbers of expert_ffn per layer \(\[8, 16\]\)"):
        Plan(layers=every, expert_channels={moe[0]: good}, expert_ffn={moe[1]: list(range(8))}).target_layout(layout)
    with pytest.raises(UserError, match="one channel list per expert"):
        Plan.from_dict({"layers": every, "expert_channels": {str(moe[0]): [1, 2]}})
