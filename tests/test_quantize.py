"""Quantization with Model Optimizer (fake quantization on the CPU; NVFP4 and real FP8 kernels are `gpu` tests).

References are independent of the code under test: which modules a hybrid keeps in bf16 is listed by hand from
the layer pattern; checkpoint bytes are counted by hand from the layout; the exported checkpoint's reload is
compared with the in-memory fake-quantized model Model Optimizer calibrated; error cases check exit code 2, one
line and no output folder.
"""

import copy
import json

import pytest
import torch

from minipuzzle.errors import UserError
from minipuzzle.testing import random_model, run_cli, save_model, tiny_layout, tiny_moe_layout

pytest.importorskip("modelopt")  # the `quant` extra; modelopt.torch is imported quietly by quantize.configs


def _bf16_exact(model):
    """The model with weights rounded to bf16 and held in float32: what a bf16 checkpoint loads as."""
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16).to(torch.float32))
    return model.eval()


def _windows(n=4, t=32, vocab=320, seed=1):
    return torch.randint(0, vocab, (n, t), generator=torch.Generator().manual_seed(seed))


def _expected_quantized(pattern: str) -> list[str]:
    """By hand, from NVIDIA's hybrid recipe: Mamba in/out projections, MLP and expert projections quantized;
    attention, conv1d, routers, embeddings and LM head kept."""
    per_kind = {"M": ["mixer.in_proj", "mixer.out_proj"], "-": ["mixer.up_proj", "mixer.down_proj"], "*": [],
                "E": ["mixer.experts.up_proj", "mixer.experts.down_proj", "mixer.shared_experts.up_proj",
                      "mixer.shared_experts.down_proj"]}  # fmt: skip
    return sorted(f"model.layers.{i}.{m}" for i, k in enumerate(pattern) for m in per_kind[k])


def test_default_keeps_attention_conv_router_and_head_in_bf16():
    from minipuzzle.quantize.calibrate import quantize_model
    from minipuzzle.quantize.configs import quantized_modules

    layout = tiny_moe_layout()
    m = quantize_model(_bf16_exact(random_model(layout)), "fp8", _windows(2), batch_size=2)
    assert sorted(quantized_modules(m)) == _expected_quantized(layout.pattern)


def test_patterns_override_the_default_and_unknown_ones_are_refused():
    from minipuzzle.quantize.calibrate import quantize_model
    from minipuzzle.quantize.configs import quantized_modules

    layout = tiny_layout()
    m = quantize_model(_bf16_exact(random_model(layout)), "fp8", _windows(2), batch_size=2, keep=["*out_proj"],
                       quantize=["lm_head"])  # fmt: skip
    want = [n for n in _expected_quantized(layout.pattern) if not n.endswith("out_proj")] + ["lm_head"]
    assert sorted(quantized_modules(m)) == sorted(want)
    # Only the LM head's weight and input quantizers are on: an enabled output quantizer would be exported as a
    # KV-cache format.
    assert not m.lm_head.output_quantizer.is_enabled and m.lm_head.input_quantizer.amax is not None
    with pytest.raises(UserError, match="matches no module"):
        quantize_model(_bf16_exact(random_model(layout)), "fp8", _windows(2), keep=["*no_such_proj"])


@pytest.mark.parametrize("layout", [tiny_layout(), tiny_moe_layout()], ids=["dense", "moe"])
def test_fp8_export_reloads_as_the_calibrated_model(tmp_path, layout):
    """The exported weights are round-to-nearest-even FP8 of weight / scale (computed here with torch's cast from
    the source weights and the stored scale); the calibrated in-memory model agrees except on exact ties, which
    Model Optimizer 0.47's CPU fake quantization rounds away from zero. With those weights, the reloaded
    checkpoint computes what the calibrated model computes (its input quantizers rebuilt from input_scale)."""
    from safetensors import safe_open

    from minipuzzle.quantize.calibrate import quantize_model
    from minipuzzle.quantize.configs import quantized_modules
    from minipuzzle.quantize.export import export_quantized
    from minipuzzle.quantize.load import load_quantized

    ids = _windows(2, 16)
    base = _bf16_exact(random_model(layout))
    source = {k: v.clone() for k, v in base.state_dict().items()}
    with torch.no_grad():
        plain = base(ids, use_cache=False).logits
    q = quantize_model(base, "fp8", ids, batch_size=2)
    mods, names = dict(q.named_modules()), quantized_modules(q)
    with torch.no_grad():
        fake_w = {n: mods[n].weight_quantizer(mods[n].weight).clone() for n in names if "experts." not in n}
    export_quantized(copy.deepcopy(q), tmp_path / "fp8", summary={})  # the export packs the model it is given
    back = load_quantized(tmp_path / "fp8")
    loaded = dict(back.named_modules())
    with safe_open(tmp_path / "fp8" / "model.safetensors", "pt") as f:
        for n in fake_w:
            hub = "backbone." + n.removeprefix("model.")
            s = f.get_tensor(hub + ".weight_scale")
            ratio = source[n + ".weight"] / s
            want = ratio.to(torch.float8_e4m3fn).to(torch.float32) * s
            got = loaded[n].weight.detach()
            torch.testing.assert_close(got, want, atol=0, rtol=1e-6)
            differ = (fake_w[n] - got).abs() > 1e-6 * got.abs().max()
            lo = ratio.to(torch.float8_e4m3fn).to(torch.float32)
            assert differ.float().mean() < 0.02
            # Every disagreement sits on a tie: the ratio is halfway between two FP8 values (one of them `lo`).
            for r, v in zip(ratio[differ].tolist(), lo[differ].tolist()):
                other = 2 * r - v
                assert torch.tensor(other).to(torch.float8_e4m3fn).item() == other
    # The in-memory model with the exported weights and no weight rounding computes what the reload computes.
    with torch.no_grad():
        for n in names:
            if "experts." in n:
                continue
            mods[n].weight.copy_(loaded[n].weight)
            mods[n].weight_quantizer.disable()
        if layout.is_moe:
            for n, m in mods.items():
                if n.endswith("mixer.experts"):
                    for proj in ("up_proj", "down_proj"):
                        getattr(m, proj).copy_(getattr(loaded[n], proj))
                        for wq in getattr(m, f"{proj}_weight_quantizers"):
                            wq.disable()
        fake = q(ids, use_cache=False).logits
        got = back(ids, use_cache=False).logits
    assert (fake - plain).abs().max() > 1e-3  # the quantizers do round
    torch.testing.assert_close(got, fake, atol=1e-5, rtol=1e-5)


def test_export_format_and_bytes_by_hand(tmp_path):
    """FP8 tensors, float32 scales, bf16 everything else; excluded names clean and true; bytes counted by hand."""
    from safetensors import safe_open

    from minipuzzle.quantize.calibrate import quantize_model
    from minipuzzle.quantize.export import export_quantized

    layout = tiny_layout()
    q = quantize_model(_bf16_exact(random_model(layout)), "fp8", _windows(2), batch_size=2)
    export_quantized(q, tmp_path / "fp8", summary={})
    out = tmp_path / "fp8"
    qc = json.loads((out / "hf_quant_config.json").read_text())["quantization"]
    assert qc["quant_algo"] == "FP8" and qc["kv_cache_quant_algo"] is None
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "modelopt" and cfg["ignore"] == qc["exclude_modules"]
    assert all("\x00" not in n for n in qc["exclude_modules"])
    h, n_m, n_mlp = layout.hidden_size, layout.count("M"), layout.count("-")
    # By hand: in_proj [z|x|B|C|dt] x h and out_proj h x I per Mamba layer; up and down h x F per MLP layer.
    rows = 2 * layout.mamba_intermediate + 2 * layout.n_groups * layout.ssm_state_size + layout.mamba_num_heads
    quant = n_m * (rows * h + h * layout.mamba_intermediate) + n_mlp * 2 * h * layout.intermediate_size
    linears = 2 * (n_m + n_mlp)
    with safe_open(out / "model.safetensors", "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    assert "backbone.layers.0.mixer.conv1d.weight" in tensors  # hub names, as the exporter writes them
    fp8 = {k for k, t in tensors.items() if t.dtype == torch.float8_e4m3fn}
    assert sum(tensors[k].numel() for k in fp8) == quant and len(fp8) == linears
    assert {t.dtype for k, t in tensors.items() if k not in fp8 and not k.endswith("_scale")} == {torch.bfloat16}
    scales = [k for k in tensors if k.endswith(("weight_scale", "input_scale"))]
    assert len(scales) == 2 * linears and all(tensors[k].dtype == torch.float32 for k in scales)
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    params = layout.num_params()
    # The file = arch.py's FP8 count (1 byte a parameter) + 1 more byte for each parameter kept in bf16 + two
    # float32 scales per quantized linear.
    assert total == layout.memory("fp8")["weights"] + (params - quant) + 8 * linears
    doc = json.loads((out / "quantize.json").read_text())["bytes"]
    assert doc["total"] == total and doc["quantized_params"] == quant and doc["kept_params"] == params - quant


def test_repair_of_modelopt_sentinel_names():
    """The exact strings Model Optimizer 0.47 wrote for a Nemotron-H under transformers 5.24, and their intent."""
    from minipuzzle.quantize.export import _repair

    bad = {
        "backbone.layers.0.mixer.conv1d.\x00backbone.pt_name_sentinel": "backbone.layers.0.mixer.conv1d",
        "backbone.layers.2.\x00backbone.pt_name_sentinel*": "backbone.layers.2*",
        "lm_head.\x00backbone.pt_name_sentinel": "lm_head",
        "backbone.layers.1.mixer.gate": "backbone.layers.1.mixer.gate",
    }
    assert {k: _repair(k) for k in bad} == bad


@pytest.fixture(scope="module")
def bf16_checkpoint(tmp_path_factory, tokenizer):
    model = random_model(tiny_layout()).to(torch.bfloat16)
    return save_model(model, tmp_path_factory.mktemp("q") / "bf16", tokenizer=tokenizer)


def test_cli_quantize_then_eval(tmp_path, bf16_checkpoint, text_file):
    from minipuzzle.quantize.load import load_quantized

    code, out, err = run_cli(["quantize", str(bf16_checkpoint), "--data", str(text_file), "--samples", "4",
                              "--seq-len", "32", "--device", "cpu", "-o", str(tmp_path / "fp8")])  # fmt: skip
    assert code == 0, err
    doc = json.loads((tmp_path / "fp8" / "quantize.json").read_text())
    assert doc["precision"] == "fp8" and doc["calibration"]["windows"] == 4
    assert (tmp_path / "fp8" / "tokenizer.json").is_file()
    code, out, err = run_cli(["eval", str(tmp_path / "fp8"), "--teacher", str(bf16_checkpoint), "--data",
                              str(text_file), "--held-out-windows", "4", "--seq-len", "32", "--no-speed", "--device", "cpu",
                              "-o", str(tmp_path / "eval")])  # fmt: skip
    assert code == 0, err
    rep = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert 0 < rep["kl_to_teacher"] < 0.5
    # The reloaded model is the one eval measured: the same loss on the same windows.
    from minipuzzle.data import load_tokenizer, token_windows

    ids = token_windows(text_file, load_tokenizer(bf16_checkpoint), 32, 4, 0)
    m = load_quantized(tmp_path / "fp8")
    with torch.no_grad():
        logits = m(ids, use_cache=False).logits[:, :-1]
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    assert abs(loss.item() - rep["loss"]) < 1e-4


@pytest.mark.parametrize("case", ["precision", "nvfp4_cpu", "already_quantized"])
def test_cli_refusals(tmp_path, bf16_checkpoint, text_file, case):
    src, extra = str(bf16_checkpoint), []
    if case == "precision":
        extra = ["--precision", "int3"]
    elif case == "nvfp4_cpu":
        extra = ["--precision", "nvfp4", "--device", "cpu"]
    else:
        (tmp_path / "q").mkdir()
        for f in bf16_checkpoint.iterdir():
            (tmp_path / "q" / f.name).write_bytes(f.read_bytes())
        (tmp_path / "q" / "hf_quant_config.json").write_text('{"quantization": {"quant_algo": "FP8"}}')
        src = str(tmp_path / "q")
    code, out, err = run_cli(["quantize", src, "--data", str(text_file), "-o", str(tmp_path / "out"), *extra])
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert {"precision": "int3", "nvfp4_cpu": "CUDA", "already_quantized": "already quantized"}[case] in err
    assert not (tmp_path / "out").exists()


def test_plan_places_and_refuses():
    """47B in bf16 (93.6 GB) does not fit one 80 GB GPU: calibration spreads it over two; 56B on one GPU alone is
    refused in one line before anything runs."""
    from minipuzzle.checkpoint.resolve import describe_model
    from minipuzzle.hardware import Hardware
    from minipuzzle.memory import RunMemory
    from minipuzzle.quantize.plan import plan_quantize
    from minipuzzle.settings import QuantizeSettings

    st = QuantizeSettings(precision="nvfp4", samples=128, seq_len=2048)
    _, l47 = describe_model("47b")
    node = Hardware(device="cuda", gpu_memory=80 * 2**30, gpus_per_node=8)
    plan = plan_quantize(l47, node, st)
    assert plan.fits and plan.parts[0].geometry.devices == 2
    assert plan.parts[0].memory.weights >= l47.num_params() * 2 // 2
    _, l56 = describe_model("56b")
    one = Hardware(device="cuda", gpu_memory=80 * 2**30, gpus_per_node=1)
    refusal = RunMemory(hardware=one, hardware_text="", usable_device_bytes=0,
                      stages=[plan_quantize(l56, one, st)]).refusal()  # fmt: skip
    assert refusal is not None and refusal.startswith("quantize (calibration) does not fit")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("precision", ["fp8", "nvfp4"])
def test_gpu_export_reloads_as_the_calibrated_model(tmp_path, precision):
    """NVFP4 (CUDA-only in Model Optimizer) and FP8 on the GPU: the export reloads as the calibrated model."""
    from minipuzzle.quantize.calibrate import quantize_model
    from minipuzzle.quantize.export import export_quantized, weight_bytes
    from minipuzzle.quantize.load import load_quantized

    layout = tiny_layout()
    ids = _windows(4).cuda()
    q = quantize_model(_bf16_exact(random_model(layout)).cuda(), precision, ids, batch_size=2)
    with torch.no_grad():
        fake = q(ids, use_cache=False).logits
    export_quantized(q, tmp_path / precision, summary={})
    back = load_quantized(tmp_path / precision, device="cuda")
    with torch.no_grad():
        got = back(ids, use_cache=False).logits
    torch.testing.assert_close(got, fake, atol=1e-4, rtol=1e-4)
    b = weight_bytes(tmp_path / precision)
    per = {"fp8": 1.0, "nvfp4": 0.5}[precision]
    assert b["quantized"] == b["quantized_params"] * per


def test_recipes_end_at_their_budgets_precision():
    """The 56B -> 47B recipe plans NVFP4 (its 31.7 GiB budget's precision) on its GPUs, Nano 3 and the demo FP8;
    NVFP4 on a CPU-only machine is refused by the plan."""
    from minipuzzle.hardware import Hardware
    from minipuzzle.memory import RunMemory
    from minipuzzle.quantize.plan import plan_quantize
    from minipuzzle.recipe import load_recipe, plan_run

    for name, precision in (("nemotron-h-56b-to-47b", "nvfp4"), ("nemotron-3-nano-30b-to-22b", "fp8"),
                            ("demo", "fp8")):  # fmt: skip
        recipe = load_recipe(name)
        assert recipe.quantize.precision == precision
        if name != "demo":
            plan = plan_run(recipe)
            assert [s["stage"] for s in plan["stages"]][-3:] == ["quantize", "eval", "report"]
            parts = [p for s in plan["memory"]["stages"] if s["stage"] == "quantize" for p in s["parts"]]
            assert [p["name"] for p in parts] == ["calibration", "export"] and all(p["fits"] for p in parts)
    cpu = Hardware(device="cpu", gpu_memory=64 * 2**30)
    st = load_recipe("nemotron-h-56b-to-47b").quantize.model_copy(update={"samples": 1, "seq_len": 8})
    from minipuzzle.testing import tiny_layout

    refusal = RunMemory(hardware=cpu, hardware_text="", usable_device_bytes=0,
                      stages=[plan_quantize(tiny_layout(), cpu, st)]).refusal()  # fmt: skip
    assert refusal is not None and "nvfp4 needs a CUDA GPU" in refusal
