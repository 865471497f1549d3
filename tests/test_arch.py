"""Architecture model: exact parameter counts against transformers, the published figures, config round trips."""

import json

import pytest
import torch
from transformers import NemotronHForCausalLM

from minipuzzle.arch import Layout
from minipuzzle.errors import UserError
from minipuzzle.presets import PRESETS, get_preset
from minipuzzle.testing import random_model, run_cli, tiny_layout

GiB = 2**30


@pytest.mark.parametrize("name", list(PRESETS))
def test_preset_param_count_equals_transformers(name):
    layout = get_preset(name).layout
    with torch.device("meta"):
        model = NemotronHForCausalLM(layout.to_hf_config())
    assert layout.num_params() == sum(p.numel() for p in model.parameters())
    assert Layout.from_config(model.config) == layout


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"tie_word_embeddings": True},
        {"use_conv_bias": False},
        {"use_bias": True, "mlp_bias": True},
        {"pattern": "*-M", "n_groups": 4, "mamba_num_heads": 12, "num_attention_heads": 4, "num_key_value_heads": 4},
    ],
)
def test_tiny_param_count_equals_transformers(overrides):
    layout = tiny_layout(**overrides)
    with torch.device("meta"):
        model = NemotronHForCausalLM(layout.to_hf_config())
    # transformers' NemotronH keeps a separate LM head even when the config says tied.
    assert layout.num_params() == sum(p.numel() for p in model.parameters())


def test_published_figures():
    assert round(get_preset("8b").layout.num_params() / 1e9, 3) == 8.101
    assert round(get_preset("56b").layout.num_params() / 1e9, 3) == 56.324
    assert round(get_preset("47b").layout.num_params() / 1e9, 3) == 46.792
    m56 = get_preset("56b").layout.memory("fp4", 1048576)
    m47 = get_preset("47b").layout.memory("fp4", 1048576)
    assert round(m56["weights"] / GiB, 1) == 29.5
    budget = 31.7 * GiB
    assert m56["total"] > budget > m47["total"]
    # The paper's totals: about 41.6 GiB for 56B and 30.8 GiB for 47B.
    assert abs(m56["total"] / GiB - 41.6) < 0.1 and abs(m47["total"] / GiB - 30.8) < 0.1


def test_memory_parts_scale_as_expected():
    lay = get_preset("8b").layout
    a = lay.memory("bf16", 8192, 1)
    b = lay.memory("bf16", 16384, 2)
    assert b["kv_cache"] == 4 * a["kv_cache"] and b["ssm_state"] == 2 * a["ssm_state"]
    assert lay.memory("fp8")["weights"] * 2 == a["weights"]
    assert lay.memory("bf16", kv_precision="fp8")["kv_cache"] * 2 == a["kv_cache"]
    # 4 attention layers x K,V x 8 heads x 128 x 8192 tokens x 2 bytes
    assert a["kv_cache"] == 4 * 2 * 8 * 128 * 8192 * 2
    assert a["total"] == a["weights"] + a["kv_cache"] + a["ssm_state"] + a["conv_state"]
    with pytest.raises(UserError):
        lay.memory("int3")


def test_flops_grow_with_context_and_match_params():
    lay = get_preset("8b").layout
    short, long = lay.flops_per_token(1024), lay.flops_per_token(8192)
    assert long["decode"] > short["decode"] and long["prefill"] > short["prefill"]
    # Linear layers dominate: about 2 x parameters (embeddings are a lookup, not a matmul).
    assert 1.8 * lay.num_params() < short["decode"] < 2.3 * lay.num_params()


def test_remote_code_config_round_trip():
    lay = get_preset("nano-9b-v2").layout
    native = lay.to_config()
    remote = {k: v for k, v in native.items() if k not in ("layers_block_type", "n_groups", "conv_kernel")}
    remote.update(
        hybrid_override_pattern=lay.pattern,
        mamba_n_groups=8,
        mamba_d_conv=4,
        num_hidden_layers=56,
        auto_map={"AutoConfig": "configuration_nemotron_h.NemotronHConfig"},
    )
    assert Layout.from_config(remote) == lay
    back = lay.to_config(remote)
    assert "auto_map" not in back and "hybrid_override_pattern" not in back and "mamba_n_groups" not in back
    assert Layout.from_config(back) == lay


def test_bad_configs():
    with pytest.raises(UserError, match="not a Nemotron-H"):
        Layout.from_config({"model_type": "llama", "hidden_size": 8})
    with pytest.raises(UserError, match="invalid Nemotron-H config"):
        Layout.from_config({"model_type": "nemotron_h", "layers_block_type": ["mamba", "mixture"]})


def test_info_json_and_text():
    code, out, err = run_cli(["info", "56b", "--precision", "fp4", "--context", "1M", "--json"])
    assert code == 0, err
    rep = json.loads(out)
    assert rep["params"] == 56324350464
    assert rep["layers"] == {"mamba": 54, "attention": 10, "mlp": 54}
    assert set(rep["memory_bytes"]) >= {"weights", "kv_cache", "ssm_state", "conv_state", "activations", "total"}
    assert rep["memory_bytes"]["total"] > 31.7 * GiB
    assert rep["flops_per_token"]["decode"] > 0
    code, out, _ = run_cli(["info", "47b", "--precision", "fp4", "--context", "1M", "--json"])
    assert json.loads(out)["memory_bytes"]["total"] < 31.7 * GiB
    code, out, _ = run_cli(["info", "8b"])
    assert code == 0 and "8.101B" in out


def test_info_on_checkpoint_folder(tiny_checkpoint):
    code, out, err = run_cli(["info", str(tiny_checkpoint), "--json"])
    assert code == 0, err
    assert json.loads(out)["params"] == random_model().num_parameters()


@pytest.mark.parametrize(
    "args, needle",
    [
        (["info", "99b"], "preset"),
        (["info", "8b", "--precision", "int3"], "precision"),
        (["info", "8b", "--context", "lots"], "count"),
        (["info", "/nonexistent/ckpt"], "not found"),
    ],
)
def test_info_user_errors(args, needle):
    code, out, err = run_cli(args)
    assert code == 2
    assert needle in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_anatomy_slices_fit_the_mamba_tensors():
    from minipuzzle.anatomy import AXES, mamba_conv_slices, mamba_in_proj_slices

    layout = tiny_layout(n_groups=4, mamba_num_heads=12, ssm_state_size=6)
    mixer = random_model(layout).model.layers[layout.pattern.index("M")].mixer
    proj, conv = mamba_in_proj_slices(layout), mamba_conv_slices(layout)
    assert list(proj) == ["z", "x", "B", "C", "dt"] and list(conv) == ["x", "B", "C"]
    assert proj["dt"].stop == mixer.in_proj.weight.shape[0] and conv["C"].stop == mixer.conv1d.weight.shape[0]
    assert proj["dt"].stop - proj["dt"].start == mixer.A_log.numel()
    assert all(a.stop == b.start for a, b in zip(list(proj.values()), list(proj.values())[1:]))
    assert {a.width(layout) for a in AXES.values()} <= set(vars(layout).values())
    assert AXES["mamba_heads"].unit(layout) == 4 and AXES["ffn"].unit(layout) == 1
    # z is the gate: silu(0) = 0 zeroes the gated norm's input, so with z's rows at zero the mixer writes nothing,
    # while zeroing as many rows of x leaves it writing.
    x = torch.randn(2, 5, layout.hidden_size)
    with torch.no_grad():
        weight = mixer.in_proj.weight.clone()
        mixer.in_proj.weight[proj["x"]] = 0
        assert mixer(x).abs().max() > 0
        mixer.in_proj.weight.copy_(weight)
        mixer.in_proj.weight[proj["z"]] = 0
        assert mixer(x).abs().max() == 0
