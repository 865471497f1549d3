"""Distillation's final save under FSDP2 (2 gloo ranks): rank 0 receives every weight whole, in the source's
dtypes and equal to it bit for bit after the float32 round trip; rank 1 takes part in every gather but copies
nothing to its host."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from minipuzzle.checkpoint.read import Checkpoint
from minipuzzle.testing import random_model, save_model, tiny_moe_layout

pytestmark = pytest.mark.usefixtures("one_thread")

# Each rank: teacher and student as the loop builds them (meta, float32 master weights, sharded by `parallel.shard`,
# filled shard by shard from the checkpoint), then `_final_tensors` with every host copy (Tensor.cpu, Tensor.to
# onto the CPU) counted while it runs.
WORKER = """
import json, sys, torch
from pathlib import Path
from safetensors.torch import save_file
from minipuzzle.checkpoint.read import Checkpoint
from minipuzzle.distill import loop, parallel

torch.set_num_threads(1)
src, out = Path(sys.argv[1]), Path(sys.argv[2])
d = parallel.init("cpu")
ckpt = Checkpoint(src)
class Pair(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.student = parallel.build_meta(ckpt, torch.float32)
        self.teacher = parallel.build_meta(ckpt, torch.float32)
pair = Pair()
parallel.shard(pair, d, "full")
parallel.fill_sharded(pair.student, ckpt, d)
parallel.fill_sharded(pair.teacher, ckpt, d)
model = pair.student
copies = []
real_cpu, real_to = torch.Tensor.cpu, torch.Tensor.to
def cpu(self, *a, **k):
    copies.append("cpu")
    return real_cpu(self, *a, **k)
def to(self, *a, **k):
    if any(str(x) == "cpu" for x in (*a, *k.values())):
        copies.append("to")
    return real_to(self, *a, **k)
torch.Tensor.cpu, torch.Tensor.to = cpu, to
got = list(loop._final_tensors(model, ckpt, d))
torch.Tensor.cpu, torch.Tensor.to = real_cpu, real_to
if d.main:
    save_file({n: t.contiguous() for n, t in got}, str(out / "rank0.safetensors"))
(out / f"rank{d.rank}.json").write_text(json.dumps(
    {"names": [n for n, _ in got], "none": [t is None for _, t in got], "host_copies": len(copies)}))
parallel.shutdown(d)
"""


@pytest.fixture(scope="module")
def bf16_moe(tmp_path_factory):
    """A bf16 tiny MoE checkpoint as transformers loads and saves one: routers float32, the rest bf16."""
    from transformers import NemotronHForCausalLM

    root = tmp_path_factory.mktemp("final_save")
    f32 = save_model(random_model(tiny_moe_layout(), seed=3), root / "f32")
    return save_model(NemotronHForCausalLM.from_pretrained(f32, dtype=torch.bfloat16), root / "bf16")


def test_only_rank_0_copies_the_final_weights_to_its_host(bf16_moe, tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(script), str(bf16_moe),
           str(tmp_path)]  # fmt: skip
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, (res.stdout + res.stderr)[-3000:]
    r0, r1 = (json.loads((tmp_path / f"rank{i}.json").read_text()) for i in (0, 1))

    # Both ranks walked the same tensors (the gathers matched); only rank 0 received them.
    assert r0["names"] == r1["names"] and len(r0["names"]) > 10
    assert not any(r0["none"]) and all(r1["none"])
    assert r1["host_copies"] == 0
    assert r0["host_copies"] >= len(r0["names"])  # the counter sees rank 0's copies: a zero on rank 1 means none

    # Rank 0's tensors are the source checkpoint's, in its dtypes (float32 routers), bit for bit.
    ckpt, got = Checkpoint(bf16_moe), load_file(tmp_path / "rank0.safetensors")
    routers = [n for n in got if ".mixer.gate." in n]
    assert routers and {got[n].dtype for n in routers} == {torch.float32}
    assert {t.dtype for n, t in got.items() if n not in routers} == {torch.bfloat16}
    for name, t in got.items():
        src = ckpt.get(ckpt.source_of(name))
        assert src.dtype == t.dtype and torch.equal(src, t), name

