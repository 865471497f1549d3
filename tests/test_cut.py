"""Surgery: keep-everything is exact, cutting dead units on every axis leaves the logits unchanged, streamed equals
in memory bit for bit, and the output loads natively."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from minipuzzle.arch import Layout
from minipuzzle.checkpoint.build import load_model
from minipuzzle.checkpoint.read import Checkpoint
from minipuzzle.cut import Plan, cut_checkpoint, cut_model, prune_state_dict
from minipuzzle.testing import (
    cached_and_uncached_greedy,
    plant_dead_units,
    random_model,
    rel_err,
    save_model,
    tiny_config,
    tiny_layout,
)

IDS = torch.randint(0, 320, (2, 37), generator=torch.Generator().manual_seed(1))


def logits(model):
    with torch.no_grad():
        return model(IDS, use_cache=False).logits



@pytest.mark.parametrize("compensation", [True, False])
def test_keep_all_is_bit_exact(tiny_model, tiny_checkpoint, tmp_path, compensation):
    ref = logits(tiny_model)
    layout = Layout.from_config(tiny_model.config)
    # Listing every hidden channel is keeping all of them: no norm is rescaled, with or without compensation.
    for plan in (
        Plan.keep_all(layout),
        Plan(layers=list(range(layout.num_layers)), hidden=list(range(layout.hidden_size))),
    ):
        plan.norm_compensation = compensation
        assert torch.equal(logits(cut_model(tiny_model, plan)), ref)
    out = cut_checkpoint(tiny_checkpoint, plan, tmp_path / "out", progress=False)
    assert torch.equal(logits(load_model(out)), ref)


def _plans(layout: Layout):
    """One plan per axis, and one with every axis (and depth) at once."""
    L = layout.pattern
    mlp = [i for i, c in enumerate(L) if c == "-"]
    mamba = [i for i, c in enumerate(L) if c == "M"]
    att = [i for i, c in enumerate(L) if c == "*"]
    gen = torch.Generator().manual_seed(3)

    def pick(n, k):
        return sorted(torch.randperm(n, generator=gen)[:k].tolist())

    def per_group(n, groups, k):  # k kept in each of `groups` contiguous groups of n/groups (at most half)
        size = n // groups
        k = min(k, max(1, size // 2))
        return sorted(g * size + j for g in range(groups) for j in pick(size, k))

    everything = list(range(len(L)))
    plans = {
        "depth": Plan(layers=[i for i in everything if i not in (mamba[1], mlp[0], att[0])]),
        "ffn": Plan(layers=everything, ffn={i: pick(layout.intermediate_size, 60) for i in mlp}),
        "mamba_heads": Plan(
            layers=everything, mamba_heads={i: per_group(layout.mamba_num_heads, layout.n_groups, 2) for i in mamba}
        ),
        "mamba_head_dim": Plan(
            layers=everything, mamba_head_dim={i: pick(layout.mamba_head_dim, 5) for i in mamba}
        ),
        "attn_heads": Plan(
            layers=everything,
            attn_heads={i: per_group(layout.num_attention_heads, layout.num_key_value_heads, 3) for i in att},
        ),
        "hidden": Plan(layers=everything, hidden=pick(layout.hidden_size, layout.hidden_size * 3 // 4)),
    }
    # Layers 0 and 1 go (the first Mamba and the first MLP), so a Mamba or attention layer still leads.
    kept = [i for i in everything if i not in (mamba[0], mlp[0], mlp[-1])]
    plans["all"] = Plan(
        layers=kept,
        ffn={i: pick(layout.intermediate_size, 40) for i in mlp if i in kept},
        mamba_heads={i: per_group(layout.mamba_num_heads, layout.n_groups, 3) for i in mamba if i in kept},
        mamba_head_dim={i: pick(layout.mamba_head_dim, 6) for i in mamba if i in kept},
        attn_heads={i: per_group(layout.num_attention_heads, layout.num_key_value_heads, 2) for i in att if i in kept},
        hidden=pick(layout.hidden_size, layout.hidden_size * 5 // 8),
    )
    return plans


LAYOUTS = {
    "default": tiny_layout(),
    # Another shape: more groups, MQA-like attention, odd widths, starts with MLP.
    "other": tiny_layout(
        pattern="-M*M--M*",
        hidden_size=48,
        intermediate_size=72,
        num_attention_heads=6,
        num_key_value_heads=3,
        head_dim=12,
        mamba_num_heads=12,
        mamba_head_dim=6,
        n_groups=3,
        ssm_state_size=4,
    ),
}


@pytest.mark.parametrize("layout_name", list(LAYOUTS))
@pytest.mark.parametrize("axis", ["depth", "ffn", "mamba_heads", "mamba_head_dim", "attn_heads", "hidden", "all"])
def test_cutting_dead_units_keeps_logits(layout_name, axis):
    layout = LAYOUTS[layout_name]
    model = random_model(layout, seed=5, config=tiny_config(layout, layer_norm_epsilon=1e-7))
    plan = _plans(layout)[axis]
    plant_dead_units(model, plan)
    ref = logits(model)
    small = cut_model(model, plan)
    assert Layout.from_config(small.config) == plan.target_layout(layout)
    assert sum(p.numel() for p in small.parameters()) == plan.target_layout(layout).num_params()
    if axis != "depth":
        assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in model.parameters())
    assert rel_err(logits(small), ref) < 1e-4


@pytest.mark.parametrize("axis", ["hidden", "mamba_heads", "mamba_head_dim"])
def test_without_norm_compensation_dead_units_change_logits(axis):
    """The axes whose removal shrinks an RMSNorm's input (hidden size; the Mamba gated group norm): without the
    sqrt(old/new) scaling, even units that carry zeros change the output. Other weights are cut identically."""
    layout = LAYOUTS["default"]
    model = random_model(layout, seed=5, config=tiny_config(layout, layer_norm_epsilon=1e-7))
    plan = _plans(layout)[axis]
    plant_dead_units(model, plan)
    ref = logits(model)
    on = cut_model(model, plan)
    plan.norm_compensation = False
    off = cut_model(model, plan)
    assert rel_err(logits(on), ref) < 1e-4 and rel_err(logits(off), ref) > 1e-2
    a, b = on.state_dict(), off.state_dict()
    changed = {k for k in a if not torch.equal(a[k], b[k])}
    assert changed and all(k.endswith("norm.weight") or k.endswith("norm_f.weight") for k in changed)


def test_cutting_live_units_changes_logits(tiny_model):
    """The exactness tests above would pass vacuously if cutting did nothing: live units must matter."""
    layout = Layout.from_config(tiny_model.config)
    ref = logits(tiny_model)
    for axis, plan in _plans(layout).items():
        assert rel_err(logits(cut_model(tiny_model, plan)), ref) > 1e-3, axis


@pytest.mark.parametrize("style", ["model", "backbone"])
def test_streamed_equals_in_memory_and_loads_natively(style, tmp_path, tokenizer):
    layout = tiny_layout()
    model = random_model(layout, seed=7)
    src = save_model(model, tmp_path / "src", style=style, tokenizer=tokenizer, max_shard_bytes=30_000)
    plan = _plans(layout)["all"]
    new_layout, state = prune_state_dict(Checkpoint(src).state_dict(), layout, plan)
    out = cut_checkpoint(src, plan, tmp_path / "out", max_shard_bytes=20_000, progress=False)
    streamed = Checkpoint(out)
    assert streamed.layout == new_layout
    assert set(streamed.keys()) == set(state)
    for k, v in state.items():
        assert torch.equal(streamed.get(k), v), k
    assert (out / "model.safetensors.index.json").is_file()
    assert (out / "tokenizer.json").is_file()
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "nemotron_h" and "auto_map" not in cfg and "hybrid_override_pattern" not in cfg
    hf = AutoModelForCausalLM.from_pretrained(out)
    assert type(hf).__name__ == "NemotronHForCausalLM"
    assert torch.equal(logits(hf), logits(cut_model(model, plan)))
    # Needs a cached forward: the written model generates (the plan dropped layer 0) as it decodes without a cache.
    cached, uncached = cached_and_uncached_greedy(hf, IDS[:, :9], 4)
    assert torch.equal(cached, uncached)


def test_bad_plans_are_user_errors():
    from minipuzzle.errors import UserError

    layout = tiny_layout()
    mamba = [i for i, c in enumerate(layout.pattern) if c == "M"]
    bad = [
        Plan(layers=[]),
        Plan(layers=[1, 0]),
        Plan(layers=[0, 99]),
        Plan(layers=list(range(layout.num_layers)), mamba_heads={mamba[0]: [0, 1]}),  # both heads in group 0
        Plan(layers=list(range(layout.num_layers)), ffn={0: [1, 2]}),  # layer 0 is Mamba
        Plan(layers=list(range(layout.num_layers)), hidden=[3, 3]),
    ]
    for plan in bad:
        with pytest.raises(UserError):
            plan.target_layout(layout)
    with pytest.raises(UserError):
        Plan.from_dict({"layers": [0], "depth": 3})


def test_plan_round_trips_through_json():
    from minipuzzle.errors import UserError

    plan = _plans(tiny_layout())["all"]
    for comp in (True, False):
        plan.norm_compensation = comp
        again = Plan.from_dict(json.loads(json.dumps(plan.to_dict())))
        assert again == plan and again.norm_compensation is comp
    assert Plan.from_dict({"layers": [0]}).norm_compensation is True  # plans written before the switch
    with pytest.raises(UserError, match="norm_compensation"):
        Plan.from_dict({"layers": [0], "norm_compensation": "no"})


def test_cut_command_norm_compensation_switch(tiny_checkpoint, tmp_path):
    """`cut` follows the plan's norm_compensation unless --[no-]norm-compensation overrides it; the choice is
    recorded in prune_plan.json."""
    from minipuzzle.testing import run_cli

    src = Checkpoint(tiny_checkpoint)
    hidden = list(range(0, src.layout.hidden_size, 2))
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"layers": list(range(src.layout.num_layers)), "hidden": hidden}))
    norm = src.get("model.norm_f.weight")[hidden]
    for flag, scale in ((None, 2**0.5), ("--no-norm-compensation", 1.0), ("--norm-compensation", 2**0.5)):
        out = tmp_path / f"out-{flag}"
        code, _, err = run_cli(
            ["cut", str(tiny_checkpoint), "--plan", str(plan), "-o", str(out), *([flag] if flag else [])]
        )
        assert code == 0, err
        assert torch.allclose(Checkpoint(out).get("model.norm_f.weight"), norm * scale)
        assert json.loads((out / "prune_plan.json").read_text())["plan"]["norm_compensation"] is (scale != 1.0)
    plan.write_text(json.dumps({"layers": [0], "hidden": hidden, "norm_compensation": False}))
    code, _, err = run_cli(["cut", str(tiny_checkpoint), "--plan", str(plan), "-o", str(tmp_path / "off")])
    assert code == 0, err
    assert torch.equal(Checkpoint(tmp_path / "off").get("model.norm_f.weight"), norm)
