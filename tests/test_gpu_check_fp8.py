"""benchmarks/gpu_check.py's real FP8 path on CUDA: after `mtq.compress` with Model Optimizer's per-tensor FP8 GEMM
registered, every quantized layer runs that GEMM (torch._scaled_mm) and the logits stay close to the fake-quantized
model Model Optimizer calibrated (the same e4m3 grid and scales; only accumulation and rounding differ). Skips
without a GPU with FP8 tensor cores (compute capability 8.9+); benchmarks/gpu_check.py runs it with `-m gpu`."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("modelopt")
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
    pytest.mark.skipif(
        torch.cuda.is_available() and torch.cuda.get_device_capability() < (8, 9),
        reason="needs FP8 tensor cores (compute capability 8.9+)",
    ),
]


def _gpu_check():
    """benchmarks/ is no package: the script loaded from its file (its own imports put the repository first)."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"
    spec = importlib.util.spec_from_file_location("gpu_check", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = mod  # before running it: its dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def test_real_fp8_gemm_matches_fake_quantization():
    from minipuzzle.quantize.calibrate import quantize_model
    from minipuzzle.testing import random_model, tiny_layout

    gc = _gpu_check()
    # 16 Mamba heads: Mamba in_proj's 2*128 + 2*2*8 + 16 = 304 rows, like every other quantized linear's
    # dimensions a multiple of 16 (torch._scaled_mm's requirement; tiny_layout's default gives 168).
    layout = tiny_layout(mamba_num_heads=16)
    model = random_model(layout).to("cuda", torch.bfloat16).eval()
    ids = torch.randint(3, layout.vocab_size, (4, 64), generator=torch.Generator().manual_seed(1)).cuda()
    with torch.no_grad():
        ref = model(input_ids=ids, use_cache=False).logits.float()
    quantize_model(model, "fp8", ids, batch_size=2)
    with torch.no_grad():
        fake = model(input_ids=ids, use_cache=False).logits.float()
        fake_one = model(input_ids=ids[:1, :1], use_cache=False).logits.float()  # one row: the decode GEMM's M=1
    assert gc.real_fp8_unavailable(model) is None

    done = gc.compress_fp8(model)
    n = done["modules_flagged_for_real_gemm"]
    # By hand, from NVIDIA's hybrid recipe: each Mamba layer's in/out projections and each MLP's up/down projections.
    assert n == 2 * layout.pattern.count("M") + 2 * layout.pattern.count("-")
    assert done["modules_with_fp8_weights"] == n
    with gc._count_fp8_gemm_calls() as calls, torch.no_grad(), gc._quiet_real_quant():
        real = model(input_ids=ids, use_cache=False).logits.float()
        real_one = model(input_ids=ids[:1, :1], use_cache=False).logits.float()
    match = gc.fp8_gemm_matches(model)
    assert match == {"fp8_gemm": n, "no_gemm_found": 0, "other_gemm": 0, "not_called": 0}
    assert calls["calls"] == 2 * n  # every compressed layer, once per forward

    # The FP8 rounding itself (fake vs bf16) is the scale of what quantization changes; the real GEMM must agree
    # with the fake-quantized model far more closely than that, and track it position by position.
    quant_gap = (fake - ref).abs().max()
    assert quant_gap > 0
    for got, want in ((real, fake), (real_one, fake_one)):
        gap = (got - want).abs().max()
        cos = torch.nn.functional.cosine_similarity(got.flatten(), want.flatten(), dim=0)
        assert gap <= 0.25 * quant_gap + 0.02 * want.abs().max(), (gap, quant_gap)
        assert cos > 0.999
