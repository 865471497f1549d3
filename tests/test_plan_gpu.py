"""GPU paths of the stages that run their memory plan: bf16 ranking streamed and in memory, and eval through
accelerate's device map on CUDA (over every visible GPU). Skips without CUDA; benchmarks/gpu_check.py runs it."""

import pytest
import torch

from minipuzzle.testing import random_model, save_model

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, tokenizer):
    return save_model(random_model(seed=4), tmp_path_factory.mktemp("gpu") / "m", tokenizer=tokenizer)


def test_bf16_ranking_on_cuda_streamed_matches_in_memory_and_float32(ckpt):
    from minipuzzle.checkpoint.build import load_model
    from minipuzzle.cut import Plan
    from minipuzzle.prune.ranking import measure_in_memory, measure_streamed

    plans = [Plan(layers=[0, 1, 2, 3, 4, 6, 7, 8, 9])]
    windows = torch.randint(0, 320, (4, 64), generator=torch.Generator().manual_seed(1))
    fp32 = measure_in_memory(load_model(ckpt, torch.float32, "cuda"), plans, windows)[0]
    mem = measure_in_memory(load_model(ckpt, torch.bfloat16, "cuda"), plans, windows)[0]
    streamed = measure_streamed(ckpt, plans, windows, 2, "cuda", dtype=torch.bfloat16, chunk_rows=2, host_bytes=1)[0]
    assert mem["kl_to_teacher"] == pytest.approx(streamed["kl_to_teacher"], rel=0.05, abs=1e-3)
    assert mem["kl_to_teacher"] == pytest.approx(fp32["kl_to_teacher"], rel=0.1, abs=5e-3)


def test_device_mapped_eval_on_cuda_matches_one_device(ckpt):
    from minipuzzle.checkpoint.build import load_model
    from minipuzzle.evaluate.placement import compute_devices, load_mapped, load_placed
    from minipuzzle.evaluate.runner import held_out_stats, record_teacher
    from minipuzzle.evaluate.speed import measure_speed

    whole = load_model(ckpt, torch.bfloat16, "cuda")
    if torch.cuda.device_count() > 1:  # two GPUs, each holding about half the weights
        share = sum(p.numel() * 2 for p in whole.parameters()) // 2 + 2**20
        mapped = load_placed(ckpt, torch.bfloat16, torch.device("cuda"), devices=2, per_device_bytes=share)
        assert len(compute_devices(mapped)) == 2
    else:  # one GPU: the device-mapped loader and accelerate's dispatch still run
        mapped = load_mapped(ckpt, torch.bfloat16, max_memory={0: 2**30})
    assert hasattr(mapped, "hf_device_map")
    windows = torch.randint(0, 320, (4, 64), generator=torch.Generator().manual_seed(2))
    plain = held_out_stats(whole, windows, whole, batch_size=2)
    got = held_out_stats(mapped, windows, record_teacher(mapped, windows, 2), batch_size=2)
    assert got["loss"] == pytest.approx(plain["loss"], rel=1e-3)
    assert got["kl_to_teacher"] == pytest.approx(0.0, abs=1e-3)
    speed = measure_speed(mapped, 1, 32, 4, 1)
    assert speed["decode_tokens_per_s"] > 0 and speed["peak_memory_bytes"] > 0
