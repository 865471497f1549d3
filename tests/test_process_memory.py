"""A memory limit covers the whole process: `score --host-memory X` on a generated float32 checkpoint plans with
the interpreter's own memory counted (`memory.PROCESS_BYTES`) and its measured peak RSS stays within X.

The limit is chosen so that the checkpoint and its activations fit 90 % of it but not beside an interpreter: a plan
that counts no interpreter loads the model whole and the process exceeds the limit (0.81 GB measured against
a 0.70 GB limit); counting it, the plan streams the layers."""

import importlib.util
import sys
import sysconfig
from pathlib import Path

import pytest

from minipuzzle.checkpoint.read import Checkpoint
from minipuzzle.hardware import Hardware
from minipuzzle.memory import PROCESS_BYTES, score_memory

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "scale_rehearsal.py"
# 12 layers, 6 of them MLPs of 512 x 12288: 84M float32 parameters, 0.34 GB of safetensors.
WIDTHS = dict(hidden_size=512, intermediate_size=12288, num_attention_heads=8, num_key_value_heads=2, head_dim=64,
              mamba_num_heads=8, mamba_head_dim=64, n_groups=2, ssm_state_size=16)  # fmt: skip
LIMIT = 700 * 10**6


def _rehearsal():
    spec = importlib.util.spec_from_file_location("scale_rehearsal", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("limit") / "ckpt"
    _, nbytes = _rehearsal().write_checkpoint(path, WIDTHS)
    assert 0.32e9 < nbytes < 0.35e9
    return path


def test_score_under_a_host_memory_limit_stays_within_it(checkpoint, tmp_path):
    sr = _rehearsal()
    text = Path(sysconfig.get_paths()["stdlib"]) / "argparse.py"
    out = tmp_path / "scores"
    cmd = [sys.executable, "-m", "minipuzzle.cli", "score", str(checkpoint), "--data", str(text), "--host-memory",
           str(LIMIT), "--samples", "2", "--seq-len", "32", "--axes", "ffn", "-o", str(out)]  # fmt: skip
    # The premise: the checkpoint fits the limit's usable share, but not beside an interpreter.
    nbytes = sum(f.stat().st_size for f in checkpoint.glob("*.safetensors"))
    assert nbytes < 0.9 * LIMIT < nbytes + PROCESS_BYTES
    m = sr.measure(cmd, Path.cwd(), tmp_path / "score.log")
    # Polled every 20 ms over the process tree (the kernel's ru_maxrss of a child starts from this large test
    # process's RSS at the fork, so it says nothing here).
    assert 0.3e9 < m["peak_rss"] <= LIMIT, m
    # ... because the plan streamed the layers: the whole model does not fit beside the interpreter
    parts = score_memory(Checkpoint(checkpoint).layout, Hardware(device="cpu", gpu_memory=LIMIT), seq_len=32,
                         depth_samples=2, width_samples=2, axes=("ffn",), dtype="float32", stored_bytes=4)  # fmt: skip
    assert all(p.geometry.streaming and p.fits for p in parts)
