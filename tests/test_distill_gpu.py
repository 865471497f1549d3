"""GPU path: bf16 autocast step with SDPA attention (and the mamba-ssm kernels when installed). Skips without CUDA."""

import importlib.util
import json

import pytest
import torch

from minipuzzle.distill.loop import distill
from minipuzzle.distill.losses import DistillObjective
from minipuzzle.distill.toy import drop_layers, make_pair
from minipuzzle.settings import DistillSettings
from minipuzzle.testing import random_model

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_bf16_autocast_step_matches_float32_and_keeps_master_weights():
    teacher = random_model(seed=0).cuda().to(torch.bfloat16)
    student = drop_layers(random_model(seed=0), [0, 1, 2, 4, 5, 7, 8, 9]).cuda()
    for m in (student, teacher):
        m.set_attn_implementation("sdpa")
    obj = DistillObjective(student, teacher, chunk=100).train()
    ids = torch.randint(0, 320, (4, 64), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = obj(ids)
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and out["kl"] > 0
    assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in student.parameters())
    ref = DistillObjective(student.float(), teacher.float(), chunk=100)(ids)
    assert out["kl"].item() == pytest.approx(ref["kl"].item(), rel=0.1, abs=5e-3)  # bf16 vs float32


def test_distill_on_cuda_lowers_heldout_kl(tmp_path, tokenizer):
    teacher, student, data = make_pair(tmp_path / "pair", tokenizer)
    cfg = DistillSettings(teacher=str(teacher), student=str(student), data=str(data), output=str(tmp_path / "out"),
                        max_steps=20, seq_len=64, batch_size=8, lr=3e-3, warmup=2, eval_every=10, held_out_windows=4,
                        save_every=10, device="cuda", attn_implementation="sdpa")  # fmt: skip
    out = distill(cfg)
    evals = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"eval"' in x]
    assert evals[-1]["kl_to_teacher"] < 0.7 * evals[0]["kl_to_teacher"]
    mamba_kernels = importlib.util.find_spec("mamba_ssm") is not None
    print(f"cuda distill ok; mamba-ssm kernels {'used' if mamba_kernels else 'not installed'}")


def test_fsdp2_gathers_the_student_in_bf16_and_keeps_float32_master_weights(monkeypatch):
    """`parallel.shard` with the loop's GPU policy (a one-rank NCCL group): the student's blocks compute on bf16
    gathered parameters, the sharded parameters and their gradients stay float32, and the loss matches the
    unsharded float32 student under autocast."""
    import socket

    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    from minipuzzle.distill import parallel

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(port))
    dev = torch.device("cuda:0")
    dist.init_process_group("nccl", rank=0, world_size=1, device_id=dev)
    try:
        teacher = random_model(seed=0).cuda().to(torch.bfloat16)
        student = drop_layers(random_model(seed=0), [0, 1, 2, 4, 5, 7, 8, 9]).cuda()
        obj = DistillObjective(student, teacher, chunk=100).train()
        ids = torch.randint(0, 320, (4, 64), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
        with torch.autocast("cuda", dtype=torch.bfloat16):
            ref = obj(ids)["kl"].item()
        parallel.shard(obj, parallel.Dist(0, 1, dev), "full", torch.bfloat16)
        seen = []
        student.model.layers[0].mixer.register_forward_pre_hook(lambda m, _a: seen.append(next(m.parameters()).dtype))
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = obj(ids)
        out["loss"].backward()
        assert seen == [torch.bfloat16]
        for p in student.parameters():
            assert isinstance(p, DTensor) and p.dtype == torch.float32 and p.grad.dtype == torch.float32
            assert torch.isfinite(p.grad.full_tensor()).all()
        assert out["kl"].item() == pytest.approx(ref, rel=0.05, abs=5e-3)
    finally:
        dist.destroy_process_group()
