"""Mixture-of-experts layouts (Nemotron 3): exact total and active counts against transformers, NVIDIA's published
figures, config round trips in both styles, memory and FLOPs of the active experts, and active-parameter budgets."""

import json

import pytest
import torch
from transformers import NemotronHConfig, NemotronHForCausalLM

from minipuzzle.arch import Layout
from minipuzzle.errors import UserError
from minipuzzle.presets import NANO3_PRUNED_22B, get_preset
from minipuzzle.search.budget import Budget, make_budget, parse_target
from minipuzzle.testing import random_model, run_cli, tiny_layout, tiny_moe_layout

MiB = 2**20


def tiny_moe(**overrides) -> Layout:
    """Every layer kind, 8 experts in 2 groups, top 2 from the best group; a small shared expert (the testing
    helper's layout with the MLP layer in the middle)."""
    return tiny_moe_layout(**{"pattern": "ME*-EM", **overrides})


def meta_model(layout: Layout):
    with torch.device("meta"):
        return NemotronHForCausalLM(layout.to_hf_config())


def active_from_model(model, top_k: int, experts: int) -> int:
    """The active count read off transformers' own parameters: a routed-expert tensor [experts, ...] counts
    top_k / experts of itself, everything else whole."""
    total = 0
    for name, p in model.named_parameters():
        total += p.numel() * top_k // experts if ".mixer.experts." in name else p.numel()
    return total


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"mlp_bias": True},
        {"moe_latent_size": 24},
        {"moe_latent_size": 24, "mlp_bias": True, "use_bias": True},
        {"n_group": 1, "num_experts_per_tok": 5, "pattern": "EEM*"},
    ],
)
def test_tiny_moe_counts_equal_transformers(overrides):
    layout = tiny_moe(**overrides)
    model = meta_model(layout)
    assert layout.num_params() == sum(p.numel() for p in model.parameters())
    assert layout.num_active_params() == active_from_model(model, layout.num_experts_per_tok, layout.n_routed_experts)
    assert layout.num_active_params() < layout.num_params()
    assert Layout.from_config(model.config) == layout
    # The router's correction bias is a buffer: transformers' parameters() leaves it out, and so does the count.
    assert any(name.endswith("e_score_correction_bias") for name, _ in model.named_buffers())


def test_dense_layout_is_unchanged_by_the_moe_fields():
    dense = tiny_layout()
    assert not dense.is_moe and dense.num_active_params() == dense.num_params()
    assert "moe" not in dense.layer_counts() and "n_routed_experts" not in dense.summary()
    # MoE widths shape nothing in a dense model.
    assert dense.replace(n_routed_experts=64, moe_intermediate_size=8).num_params() == dense.num_params()


def test_tiny_moe_model_runs_and_reads_back():
    layout = tiny_moe()
    model = random_model(layout)
    logits = model(torch.randint(0, layout.vocab_size, (2, 12)), use_cache=False).logits
    assert logits.shape == (2, 12, layout.vocab_size) and torch.isfinite(logits).all()
    assert model.num_parameters() == layout.num_params()
    assert Layout.from_config(model.config) == layout
    assert layout.layer_counts() == {"mamba": 2, "mlp": 1, "attention": 1, "moe": 2}


def test_nano3_preset_counts():
    lay = get_preset("nano3-30b-a3b").layout
    model = meta_model(lay)
    assert lay.num_params() == sum(p.numel() for p in model.parameters()) == 31_577_937_344
    assert lay.num_active_params() == active_from_model(model, 6, 128) == 3_580_073_408
    assert (round(lay.num_params() / 1e9, 2), round(lay.num_active_params() / 1e9, 2)) == (31.58, 3.58)
    assert lay.layer_counts() == {"mamba": 23, "mlp": 0, "attention": 6, "moe": 23}
    hub_id = "NVIDIA/NVIDIA-Nemotron-3-Nano-30B-A3B-BF16"
    assert get_preset("nano3") is get_preset(hub_id) is get_preset("nano3-30b-a3b")


# Model Optimizer's Nemotron-3-Nano pruning tutorial: its 52-layer candidates (hidden, Mamba heads, Mamba head dim,
# experts, expert width, shared width) -> (total, active) in billions as printed, the chosen 22.28B one among them.
PUBLISHED_CANDIDATES = [
    ((2688, 56, 48, 96, 1536, 3072), (20.09, 3.00)),
    ((2688, 48, 56, 104, 1536, 3072), (21.61, 3.00)),
    ((2560, 48, 64, 96, 1536, 3712), (19.28, 3.00)),
    ((2304, 64, 64, 104, 1856, 3072), (22.28, 3.00)),
    ((2560, 48, 48, 96, 1792, 3328), (21.99, 3.00)),
    ((2304, 64, 64, 96, 1856, 3072), (20.70, 3.00)),
]


@pytest.mark.parametrize("widths, published", PUBLISHED_CANDIDATES)
def test_published_pruned_candidates(widths, published):
    hidden, mheads, mdim, experts, width, shared = widths
    lay = get_preset("nano3").layout.replace(
        hidden_size=hidden,
        mamba_num_heads=mheads,
        mamba_head_dim=mdim,
        n_routed_experts=experts,
        moe_intermediate_size=width,
        moe_shared_expert_intermediate_size=shared,
    )
    assert (round(lay.num_params() / 1e9, 2), round(lay.num_active_params() / 1e9, 2)) == published


def test_published_22b_layout_and_weights():
    lay = NANO3_PRUNED_22B
    assert (round(lay.num_params() / 1e9, 2), round(lay.num_active_params() / 1e9, 2)) == (22.28, 3.00)
    assert sum(p.numel() for p in meta_model(NANO3_PRUNED_22B).parameters()) == NANO3_PRUNED_22B.num_params()
    # The tutorial's BF16 weights in MiB ("MB" there): every expert resident, two bytes a parameter.
    assert round(get_preset("nano3").layout.memory("bf16")["weights"] / MiB, 1) == 60230.1
    assert round(NANO3_PRUNED_22B.memory("bf16")["weights"] / MiB, 1) == 42489.7


def test_super3_preset_counts():
    lay = get_preset("super3").layout
    model = meta_model(lay)
    assert lay.num_params() == sum(p.numel() for p in model.parameters())
    assert lay.num_active_params() == active_from_model(model, 22, 512)
    assert lay.layer_counts() == {"mamba": 40, "mlp": 0, "attention": 8, "moe": 40}
    # NVIDIA names it 120B total, 12B active (no finer figure is published).
    assert int(lay.num_params() / 1e9) == 120 and int(lay.num_active_params() / 1e9) == 12


def test_remote_code_pattern_config_round_trip():
    lay = get_preset("nano3").layout
    native = lay.to_config()
    assert "moe" in native["layers_block_type"] and "hybrid_override_pattern" not in native
    remote = {k: v for k, v in native.items() if k not in ("layers_block_type", "n_groups")}
    remote.update(hybrid_override_pattern=lay.pattern, mamba_n_groups=8, num_hidden_layers=52, auto_map={"x": "y"})
    assert Layout.from_config(remote) == lay
    back = lay.to_config(remote)
    assert "auto_map" not in back and "hybrid_override_pattern" not in back
    assert Layout.from_config(back) == lay
    # transformers writes the pattern string back from the list.
    assert NemotronHConfig.from_dict(back).hybrid_override_pattern == lay.pattern


@pytest.mark.parametrize(
    "overrides, needle",
    [
        ({"n_routed_experts": 9}, "n_group 2 groups"),
        ({"n_routed_experts": 2}, "at least 2 experts"),
        ({"topk_group": 3}, "topk_group 3"),
        ({"num_experts_per_tok": 5}, "num_experts_per_tok 5"),
        ({"num_experts_per_tok": 0}, "num_experts_per_tok 0"),
        ({"pattern": "MEX"}, "invalid layer pattern"),
    ],
)
def test_bad_moe_layouts(overrides, needle):
    with pytest.raises(UserError, match=needle):
        tiny_moe(**overrides)
    # A dense pattern never checks the MoE fields it does not use.
    if "pattern" not in overrides:
        tiny_layout(**overrides)


def test_memory_counts_every_expert_and_no_state_for_moe_layers():
    lay = get_preset("nano3").layout
    m = lay.memory("bf16", 8192, 8)
    assert m["weights"] == 2 * lay.num_params()
    # The tutorial's KV cache at sequence 8192, batch 8: 384 MiB (6 attention layers x K,V x 2 heads x 128).
    assert m["kv_cache"] == 384 * MiB == 6 * 2 * 2 * 128 * 8192 * 8 * 2
    # MoE layers hold no recurrent state: the same layout without them has the same KV, SSM and conv state.
    no_moe = lay.replace(pattern=lay.pattern.replace("E", ""))
    assert {k: m[k] for k in ("kv_cache", "ssm_state", "conv_state")} == {
        k: no_moe.memory("bf16", 8192, 8)[k] for k in ("kv_cache", "ssm_state", "conv_state")
    }
    assert lay.memory("fp8")["weights"] * 2 == lay.memory("bf16")["weights"]


def test_flops_count_only_the_active_experts():
    lay = get_preset("nano3").layout
    h, w, n_moe = lay.hidden_size, lay.moe_intermediate_size, lay.count("E")
    base = lay.flops_per_token(4096)["decode"]
    # One routed expert more per token: an up and a down projection, 2 FLOPs per multiply-add, in every MoE layer.
    more_k = lay.replace(num_experts_per_tok=7).flops_per_token(4096)["decode"]
    assert more_k - base == n_moe * 2 * 2 * h * w
    # Experts no token runs cost only their router rows.
    fewer = lay.replace(n_routed_experts=64).flops_per_token(4096)["decode"]
    assert base - fewer == n_moe * 2 * 64 * h
    # About 2 x active parameters, far below 2 x total.
    assert 1.8 * lay.num_active_params() < base < 2.3 * lay.num_active_params()


def test_info_shows_total_and_active():
    code, out, err = run_cli(["info", "nano3-30b-a3b", "--json"])
    assert code == 0, err
    rep = json.loads(out)
    assert (rep["params"], rep["active_params"]) == (31_577_937_344, 3_580_073_408)
    assert rep["layers"]["moe"] == 23 and rep["widths"]["experts"] == 128 and rep["widths"]["shared_ffn"] == 3712
    code, out, _ = run_cli(["info", "nano3"])
    assert code == 0 and "31.578B" in out and "3.580B" in out and "23 MoE" in out
    # A dense model's report has no active count (it would equal the total) and no MoE entries.
    code, out, _ = run_cli(["info", "8b", "--json"])
    rep = json.loads(out)
    assert "active_params" not in rep and "moe" not in rep["layers"] and "experts" not in rep["widths"]


# ---- budgets on active parameters ---------------------------------------------------------------------------


def test_active_budget_combines_with_total_and_memory():
    src = get_preset("nano3").layout
    budget = make_budget(src, target="24b", target_active="3b")
    assert (budget.params, budget.active_params) == (24_000_000_000, 3_000_000_000)
    assert budget.fits(NANO3_PRUNED_22B) and not budget.fits(src)
    # Each limit binds on its own: the 22B layout is under 24B total but over a 2.9B active limit, and the
    # source is under its own active count but over 24B total.
    assert not make_budget(src, target="24b", target_active="2.9b").fits(NANO3_PRUNED_22B)
    assert not Budget(params=24 * 10**9, active_params=4 * 10**9).fits(src)
    assert Budget(active_params=4 * 10**9).fits(src)
    mem = make_budget(src, target_active="3b", memory="40GiB")
    assert mem.fits(NANO3_PRUNED_22B) == (NANO3_PRUNED_22B.memory("bf16")["total"] <= 40 * 2**30)
    use = budget.usage(NANO3_PRUNED_22B)
    assert use["active_params"] == NANO3_PRUNED_22B.num_active_params() and use["active_params_limit"] == 3 * 10**9
    assert "active parameters" in budget.describe() and budget.to_dict()["active_params"] == 3 * 10**9


def test_active_budget_parsing():
    src = get_preset("nano3").layout
    # A fraction is of the source's active count; a preset gives its active count.
    assert parse_target("0.5", src, active=True) == src.num_active_params() // 2
    assert parse_target("nano3", src, active=True) == src.num_active_params()
    assert parse_target("3b", src, active=True) == 3 * 10**9
    with pytest.raises(UserError, match="--target-active"):
        make_budget(src, target_active="lots")
    with pytest.raises(UserError, match="already meets"):
        make_budget(src, target_active="4b")
    with pytest.raises(UserError, match="positive"):
        Budget(active_params=0)
    # Dense models: every parameter is active, --target says it; budgets without the limit read as before.
    with pytest.raises(UserError, match="dense"):
        make_budget(get_preset("8b").layout, target_active="4b")
    assert "active_params" not in make_budget(get_preset("8b").layout, target="4b").to_dict()


def test_target_active_on_the_command_line():
    code, _, err = run_cli(["prune", "8b", "--target-active", "3b", "--dry-run"])
    assert code == 2 and "dense" in err and len(err.strip().splitlines()) == 1
    # The budget parses on an MoE model and the search plans under it (tests/test_search_moe.py: the space itself).
    code, out, err = run_cli(["prune", "nano3", "--target", "24b", "--target-active", "3b", "--dry-run"])
    assert code == 0 and "<= 3,000,000,000 active parameters" in out, err
