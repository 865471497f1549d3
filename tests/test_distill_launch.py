"""Distillation obeys its memory plan: the plan's geometry reaches DistillSettings (recipe and command), a user's
choice that does not fit is refused in one line, and candidate distillation goes through the same torchrun
launcher when its plan needs more devices than the prune process has."""

import math
import subprocess
from pathlib import Path

import pytest
import yaml

from minipuzzle import runner
from minipuzzle.checkpoint import Checkpoint
from minipuzzle.distill import launch
from minipuzzle.errors import UserError
from minipuzzle.hardware import Hardware
from minipuzzle.memory_plan import USABLE, Fixed, plan_training
from minipuzzle.recipe import RECIPES_DIR, parse_recipe
from minipuzzle.testing import run_cli

SEQ, BATCH = 32, 8


def _tight_gpu(pair, ranks: int) -> int:
    """GPU memory in which `ranks` GPUs hold the pair's training at micro-batch 1 with checkpointing, and no
    larger micro-batch or run without checkpointing."""
    t, s = Checkpoint(pair[0]).layout, Checkpoint(pair[1]).layout
    roomy = Hardware(gpu_memory="80GiB", gpus_per_node=ranks)
    need = plan_training("distill", "distill", t, s, roomy, seq_len=SEQ, global_batch=BATCH, dtype="float32",
                         stored_bytes=4, fixed=Fixed(grad_accum=BATCH // ranks, checkpointing=True)).device_total  # fmt: skip
    return math.ceil(need / USABLE) + 64


def _recipe(pair, gpu_memory: int, gpus: int, **distill):
    doc = yaml.safe_load((RECIPES_DIR / "demo.yaml").read_text())
    doc["model"] |= {"dtype": "float32"}
    doc["distill"] |= {"seq_len": SEQ, "batch_size": BATCH, **distill}
    doc["hardware"] = {"gpu_memory": gpu_memory, "gpus_per_node": gpus}
    return parse_recipe(doc)


def _settings(recipe, pair, tmp_path):
    tmp_path.mkdir(exist_ok=True)
    (tmp_path / "prune").symlink_to(pair[1])
    rd = runner.RunData(train=str(pair[2]), held_out=str(pair[2]))
    return runner.distill_settings(recipe, pair[0], rd, tmp_path, progress=False)


def test_plan_geometry_reaches_distill_settings_from_a_recipe_hardware_section(pair, tmp_path):
    recipe = _recipe(pair, _tight_gpu(pair, 2), 2)
    cfg = _settings(recipe, pair, tmp_path)
    # 2 GPUs take 4 sequences each of the global 8, one at a time, recomputing activations.
    assert (cfg.grad_accum, cfg.activation_checkpointing, cfg.sharding) == (4, True, "full")
    assert runner.distill_launch(recipe, cfg) == (1, 2)
    cmd = launch.torchrun_command(cfg, 1, 2)
    assert cmd[:3] == ["torchrun", "--nnodes=1", "--nproc_per_node=2"]
    assert cmd[cmd.index("--grad-accum") + 1] == "4" and "--activation-checkpointing" in cmd
    # With room to spare: the whole share at once, nothing recomputed.
    roomy = _settings(_recipe(pair, 80 * 2**30, 2), pair, tmp_path / "roomy")
    assert (roomy.grad_accum, roomy.activation_checkpointing) == (1, False)


def test_a_grad_accum_that_does_not_fit_is_refused_in_one_line(pair, tmp_path):
    recipe = _recipe(pair, _tight_gpu(pair, 2), 2, grad_accum=1)
    with pytest.raises(UserError, match=r"^distill does not fit with --grad-accum 1 as given: needs "):
        _settings(recipe, pair, tmp_path)
    teacher, student, data = pair
    out = tmp_path / "out"
    code, _, err = run_cli(["distill", "--teacher", str(teacher), "--student", str(student), "--data", str(data),
                            "-o", str(out), "--max-steps", "1", "--seq-len", str(SEQ), "--batch-size", str(BATCH),
                            "--grad-accum", "1", "--no-activation-checkpointing",
                            "--gpu-memory", str(_tight_gpu(pair, 1)), "--gpus", "1"])  # fmt: skip
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "distill does not fit with --grad-accum 1, --activation-checkpointing False as given" in err
    assert not out.exists() and not (tmp_path / "out.partial").exists()


def test_candidate_distillation_runs_torchrun_when_the_plan_needs_more_devices(pair, tmp_path, monkeypatch):
    from minipuzzle.candidates import distill_candidates
    from minipuzzle.distill import launch
    from minipuzzle.settings import PruneSettings
    from minipuzzle.surgery import Plan

    ran = []

    def fake_run(cmd, check):  # torchrun with GPUs cannot run here: record the command, report a failure
        ran.append(cmd)
        return subprocess.CompletedProcess(cmd, 3)

    monkeypatch.setattr(launch.subprocess, "run", fake_run)
    teacher = pair[0]
    ckpt = Checkpoint(teacher)
    settings = PruneSettings(target="0.8", seq_len=SEQ, device="cuda", candidate_distill_steps=3,
                             candidate_distill_batch=4)  # fmt: skip
    hw = Hardware(gpu_memory="80GiB", gpus_per_node=4)
    work = tmp_path / "work"
    with pytest.raises(UserError, match="torchrun exited with code 3"):
        distill_candidates(teacher, ckpt, [Plan(layers=[0, 1, 2, 4, 5])], None, str(pair[2]), settings, False,
                           streaming=False, work_dir=work, hardware=hw, log=lambda _: None)  # fmt: skip
    (cmd,) = ran
    assert cmd[:6] == ["torchrun", "--nnodes=1", "--nproc_per_node=4", "-m", "minipuzzle.cli", "distill"]
    args = dict(zip(cmd[6::2], cmd[7::2]))
    assert args["--student"] == str(work / "cand0") and Checkpoint(work / "cand0").layout.num_layers == 5
    assert (args["--max-steps"], args["--batch-size"], args["--grad-accum"]) == ("3", "4", "1")
    assert "--no-streaming" in cmd and "--no-activation-checkpointing" in cmd
    # Over two nodes the same command goes into a script for every node.
    with pytest.raises(UserError, match="needs 2 nodes: launch .*candidates_torchrun.sh on each node"):
        distill_candidates(teacher, ckpt, [Plan(layers=[0, 1, 2, 4, 5])], None, str(pair[2]),
                           settings.model_copy(update={"candidate_distill_batch": 8}), False, work_dir=work,
                           hardware=hw.model_copy(update={"nodes": 2}), log=lambda _: None)  # fmt: skip
    script = Path(work / "candidates_torchrun.sh").read_text()
    assert "torchrun --nnodes=2 --nproc_per_node=4 --rdzv_backend=c10d" in script and "--streaming" in script
