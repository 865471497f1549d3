"""A run killed with SIGKILL, resumed, stopped with SIGTERM, resumed again ends with the same weights, bit for bit,
as an uninterrupted run (float32 on CPU). The SIGKILL hits a real CLI subprocess; the other runs go through the
CLI in this process (a subprocess each would spend most of the test importing transformers)."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from minipuzzle.testing import run_cli

STEPS, SAVE_EVERY = 16, 4


pytestmark = pytest.mark.usefixtures("one_thread")


def _command(pair, out: Path) -> list[str]:
    teacher, student, data = pair
    return [sys.executable, "-m", "minipuzzle.cli", "distill", "--teacher", str(teacher), "--student", str(student),
            "--data", str(data), "-o", str(out), "--max-steps", str(STEPS), "--seq-len", "32", "--batch-size", "4",
            "--grad-accum", "2", "--lr", "3e-3", "--warmup", "3", "--save-every", str(SAVE_EVERY),
            "--eval-every", "8", "--held-out-windows", "2", "--no-progress"]  # fmt: skip


def _env() -> dict[str, str]:
    # Same thread count in every run: float sums are only reproducible bit for bit with the same parallel split.
    return dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")


def _steps_saved(out: Path) -> list[int]:
    ck = out.with_name(out.name + ".partial") / "checkpoints"
    if not ck.is_dir():
        return []
    return [int(p.name.split("-")[1]) for p in ck.iterdir() if p.name.startswith("step-")]


def _start_and_signal(cmd, out: Path, min_step: int, sig: int) -> subprocess.CompletedProcess:
    """Start the run, wait until a checkpoint at step >= min_step exists, send `sig`, wait for the exit."""
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not any(s >= min_step for s in _steps_saved(out)):
        assert proc.poll() is None, f"run ended before step {min_step}: {proc.communicate()[1][-2000:]}"
        assert time.time() < deadline, "no checkpoint within 120 s"
        time.sleep(0.02)
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def _train_losses(out: Path) -> list[tuple[int, float, float]]:
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"], r.get("kl", r.get("kl_to_teacher"))) for r in recs]


def _sigterm_self_at(out: Path, min_step: int) -> threading.Thread:
    """Send this process SIGTERM once a checkpoint at step >= min_step exists (as a cluster scheduler would)."""

    def watch():
        deadline = time.time() + 120
        while time.time() < deadline:
            if any(s >= min_step for s in _steps_saved(out)):
                os.kill(os.getpid(), signal.SIGTERM)
                return
            time.sleep(0.01)

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    return t


def test_killed_and_preempted_run_resumes_to_identical_weights(pair, tmp_path):
    ref_out, out = tmp_path / "ref", tmp_path / "out"
    cmd = _command(pair, out)
    # Uninterrupted reference, in this process (one thread, like the subprocess).
    assert run_cli(_command(pair, ref_out)[3:])[0] == 0

    # 1. SIGKILL a real process right after it wrote a checkpoint.
    killed = _start_and_signal(cmd, out, SAVE_EVERY, signal.SIGKILL)
    assert killed.returncode == -signal.SIGKILL
    assert not out.exists()
    first = max(_steps_saved(out))

    # 2. Rerun: resumes from that checkpoint; SIGTERM makes it save where it is and exit 143.
    watcher = _sigterm_self_at(out, first + SAVE_EVERY)
    code, _, err = run_cli(cmd[3:])
    watcher.join()
    assert code == 143, err[-2000:]
    assert "stopped by SIGTERM after step" in err
    assert not out.exists() and max(_steps_saved(out)) > first

    # 3. Rerun to the end.
    code, _, err = run_cli(cmd[3:])
    assert code == 0, err[-2000:]
    assert not out.with_name("out.partial").exists()

    a, b = load_file(ref_out / "model.safetensors"), load_file(out / "model.safetensors")
    assert a.keys() == b.keys()
    before = load_file(Path(pair[1]) / "model.safetensors")
    assert any(not a[k].equal(before[k]) for k in a)  # training moved the weights
    for k in a:
        assert a[k].equal(b[k]), k
    assert _train_losses(ref_out) == _train_losses(out)
