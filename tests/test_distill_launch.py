"""Distillation obeys its memory plan: the plan's geometry reaches DistillSettings (recipe and command), a user's
choice that does not fit is refused in one line, and candidate distillation goes through the same torchrun
launcher when its plan needs more devices than the prune process has. Launches run this interpreter, keep their
processes' logs, and a launch that fails or cannot start says in one line which process failed and where its log
is; a multi-node script names its interpreter and what each node needs."""

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from minipuzzle import runner
from minipuzzle.checkpoint.read import Checkpoint
from minipuzzle.distill import launch
from minipuzzle.errors import LaunchError, UserError
from minipuzzle.hardware import Hardware
from minipuzzle.recipe import RECIPES_DIR, parse_recipe
from minipuzzle.testing import run_cli

SEQ, BATCH = 32, 8


def _tight_gpu(pair, ranks: int) -> int:
    """The least GPU memory (bytes) in which `ranks` GPUs hold the pair's training, found by bisection over what
    the distill stage accepts (a refusal is a `UserError`), not from the plan's formulas. At that least memory the
    stage can only take its most frugal geometry: one sequence per micro-step (BATCH / ranks micro-steps) with
    activations recomputed."""
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "prune").symlink_to(pair[1])
        rd = runner.RunData(train=str(pair[2]), held_out=str(pair[2]))

        def fits(memory: int) -> bool:
            try:
                runner.distill_settings(_recipe(pair, memory, ranks), pair[0], rd, Path(tmp), progress=False)
            except UserError:
                return False
            return True

        lo, hi = 1, 80 * 2**30  # lo does not fit, hi does
        assert fits(hi) and not fits(lo)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if fits(mid) else (mid, hi)
        return hi


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
    assert cmd[:5] == [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2"]
    assert cmd[cmd.index("--grad-accum") + 1] == "4" and "--activation-checkpointing" in cmd
    # With room to spare: the whole share at once, nothing recomputed.
    roomy = _settings(_recipe(pair, 80 * 2**30, 2), pair, tmp_path / "roomy")
    assert (roomy.grad_accum, roomy.activation_checkpointing) == (1, False)


def test_a_grad_accum_that_does_not_fit_is_refused_in_one_line(pair, tmp_path):
    recipe = _recipe(pair, _tight_gpu(pair, 2), 2, grad_accum=1)
    with pytest.raises(UserError, match=r"^distill does not fit: needs .*, with --grad-accum 1 as given \("):
        _settings(recipe, pair, tmp_path)
    teacher, student, data = pair
    out = tmp_path / "out"
    code, _, err = run_cli(["distill", "--teacher", str(teacher), "--student", str(student), "--data", str(data),
                            "-o", str(out), "--max-steps", "1", "--seq-len", str(SEQ), "--batch-size", str(BATCH),
                            "--grad-accum", "1", "--no-activation-checkpointing",
                            "--gpu-memory", str(_tight_gpu(pair, 1)), "--gpus", "1"])  # fmt: skip
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert err.startswith("error: distill does not fit: needs ") and "1 GPU of" in err
    assert ", with --grad-accum 1, --activation-checkpointing False as given (" in err
    assert not out.exists() and not (tmp_path / "out.partial").exists()


# 56B -> 47B on its 8 x 8 H100-80GB with one choice changed: what the refusal must say.
BAD_CHOICES = [
    # 768 / 64 = 12 sequences per rank at once: the checkpointed block inputs alone outgrow a GPU.
    ({"grad_accum": 1}, r"needs (\d+) GiB per device, .*, with --grad-accum 1, --activation-checkpointing True as given$"),
    # 8 shards of the (bound) student's float32 weights, moments and gradients: 16 x 56.3e9 / 8 bytes = 105 GiB.
    ({"sharding": "per_node"}, r"needs (\d+) GiB per device, .*, with --sharding per_node, --activation-checkpointing "
                               r"True as given$"),
    ({"grad_accum": 24}, r"its batch of 768 sequences does not split evenly over 64 processes x --grad-accum 24$"),
]  # fmt: skip


@pytest.mark.parametrize("choice,expected", BAD_CHOICES)
def test_a_launch_choice_that_cannot_run_is_refused_before_any_process_starts(choice, expected, tmp_path):
    doc = yaml.safe_load((RECIPES_DIR / "nemotron-h-56b-to-47b.yaml").read_text())
    doc["distill"] |= choice
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(doc))
    out = tmp_path / "run"
    code, _, err = run_cli(["run", str(recipe), "-o", str(out)])
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    line = err.strip()
    assert line.startswith("error: distill does not fit: "), line
    found = re.search(expected, line)
    assert found, line
    assert ("the hardware has 8 nodes x 8 GPUs of 80 GiB, fused Mamba kernels" in line and "(72 GiB usable)" in line) or "split" in line
    if choice.get("sharding"):
        assert int(found.group(1)) >= 16 * 56.3e9 / 8 / 2**30
    assert not out.exists()


def _distill_candidates(teacher, plans, data, settings, hw, **kw):
    """`prune.candidates.distill_candidates` in a prune context of `teacher` whose candidates are ranked on other
    text (nothing to skip), planned and launched for `hw`."""
    from minipuzzle.prune.candidates import distill_candidates
    from minipuzzle.prune.context import PruneContext, PruneRequest, stage_memory

    ckpt = Checkpoint(teacher)
    streaming = kw.pop("streaming", None)
    req = PruneRequest(str(teacher), Path(teacher, "unused"), settings, data, held_out_data=data, streaming=streaming,
                       progress=False, hardware=hw)  # fmt: skip
    memory = stage_memory(ckpt, settings, hw, scoring=False)
    ctx = PruneContext(req, ckpt, settings, settings.budget_for(ckpt.layout), None, hw, memory)
    return distill_candidates(ctx, plans, None, **kw)


def test_candidate_distillation_runs_torchrun_when_the_plan_needs_more_devices(pair, tmp_path, monkeypatch):
    from minipuzzle.cut import Plan
    from minipuzzle.distill import launch
    from minipuzzle.settings import PruneSettings

    ran = []

    def fake_run(cmd, log_file, ranks):  # torchrun with GPUs cannot run here: record the command, report a failure
        ran.append(cmd)
        return 3

    monkeypatch.setattr(launch.launched, "run_logged", fake_run)
    teacher = pair[0]
    settings = PruneSettings(target="0.8", seq_len=SEQ, device="cuda", candidate_distill_steps=3,
                             candidate_distill_batch=4)  # fmt: skip
    hw = Hardware(gpu_memory="80GiB", gpus_per_node=4)
    work = tmp_path / "work"
    with pytest.raises(LaunchError, match="under torchrun exited with code 3 and logged no error"):
        _distill_candidates(teacher, [Plan(layers=[0, 1, 2, 4, 5])], str(pair[2]), settings, hw, streaming=False,
                            work_dir=work, log=lambda _: None)  # fmt: skip
    (cmd,) = ran
    assert cmd[:5] == [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=4"]
    assert cmd[5].startswith(f"--log-dir={work / 'logs' / 'cand0-distilled-'}") and cmd[6] == "--tee=3"
    assert cmd[7:10] == ["-m", "minipuzzle.cli", "distill"]
    args = dict(zip(cmd[10::2], cmd[11::2]))
    assert args["--student"] == str(work / "cand0") and Checkpoint(work / "cand0").layout.num_layers == 5
    assert (args["--max-steps"], args["--batch-size"], args["--grad-accum"]) == ("3", "4", "1")
    assert "--no-streaming" in cmd and "--no-activation-checkpointing" in cmd
    # Over two nodes the same command goes into a script for every node.
    with pytest.raises(UserError, match="needs 2 nodes: launch .*candidates_torchrun.sh on each node"):
        _distill_candidates(teacher, [Plan(layers=[0, 1, 2, 4, 5])], str(pair[2]),
                            settings.model_copy(update={"candidate_distill_batch": 8}),
                            hw.model_copy(update={"nodes": 2}), work_dir=work, log=lambda _: None)  # fmt: skip
    script = Path(work / "candidates_torchrun.sh").read_text()
    assert '"$PYTHON" -m torch.distributed.run --nnodes=2 --nproc_per_node=4 --rdzv_backend=c10d' in script
    assert "--streaming" in script
    # Without a work folder the cuts go to a temporary one; a failed launch's logs outlive it.
    with pytest.raises(LaunchError, match=r"logged no error \(logs: ") as failed:
        _distill_candidates(teacher, [Plan(layers=[0, 1, 2, 4, 5])], str(pair[2]), settings, hw,
                            log=lambda _: None)  # fmt: skip
    logs = Path(str(failed.value).split("(logs: ")[1].split(")")[0])
    cut = dict(zip(ran[-1][10::2], ran[-1][11::2]))["--student"]
    assert logs.is_dir() and logs.name.startswith("cand0-distilled-") and not Path(cut).exists()
    shutil.rmtree(logs.parent)


def _cfg(pair, out: Path):
    from minipuzzle.settings import DistillSettings

    teacher, student, data = pair
    return DistillSettings(teacher=str(teacher), student=str(student), data=str(data), output=str(out), max_steps=1,
                           seq_len=SEQ, batch_size=2, device="cpu", progress=False)  # fmt: skip


def _rank_log(folder: Path, rank: int, text: str, mtime: float) -> None:
    f = folder / "ranks" / "run_x" / "attempt_0" / str(rank) / "stderr.log"
    f.parent.mkdir(parents=True, exist_ok=True)
    f.write_text(text)
    os.utime(f, (mtime, mtime))


CRASH = "step 0\nTraceback (most recent call last):\n  File \"x.py\", line 1, in <module>\n    boom()\n" \
        "safetensors_rust.SafetensorError: Error while deserializing header: invalid JSON\n"  # fmt: skip
VICTIM = 'Traceback (most recent call last):\n  File "y.py", line 2\nRuntimeError: Connection closed by peer\n'


def test_the_failure_names_the_first_rank_to_die_and_a_user_error_first(tmp_path):
    """Hand-written rank logs: a crash in rank 2 that rank 0 and 1 then die of (their logs end later) is named
    as rank 2's, not the user's cause (exit 1); a user error in any rank wins (exit 2)."""
    from minipuzzle.distill.launched import failure

    now = time.time()
    a = tmp_path / "a"
    _rank_log(a, 0, "\x1b[2Kdistill 0/8\r" + VICTIM, now)
    _rank_log(a, 1, VICTIM, now - 1)
    _rank_log(a, 2, CRASH, now - 2)
    _rank_log(a, 3, "step 0\n", now - 3)  # killed by the launcher: no error of its own
    e = failure(1, a, 4)
    log2 = a / "ranks" / "run_x" / "attempt_0" / "2" / "stderr.log"
    assert isinstance(e, LaunchError) and str(e) == (
        "distillation rank 2 of 4 failed: safetensors_rust.SafetensorError: Error while deserializing header: "
        f"invalid JSON (its log: {log2})")  # fmt: skip
    b = tmp_path / "b"
    _rank_log(b, 0, CRASH, now - 5)
    _rank_log(b, 1, "error: --data: no such file or folder: corpus.jsonl\n", now)
    e = failure(1, b, 2)
    assert isinstance(e, UserError) and str(e).startswith(
        "distillation rank 1 of 2 failed: --data: no such file or folder: corpus.jsonl (its log: "
    )
    # No rank logged an error (killed from outside): the exit code and the folder of logs.
    c = tmp_path / "c"
    _rank_log(c, 0, "step 3\n", now)
    e = failure(-9, c, 2)
    assert isinstance(e, LaunchError) and str(e) == (
        f"distillation under torchrun exited with code -9 and logged no error (logs: {c}); rerun to resume"
    )
    # One process: its stderr is the launcher log; exit 2 with the CLI's line is the user's cause.
    d = tmp_path / "d"
    d.mkdir()
    (d / "launcher.log").write_text("error: student /x is not a checkpoint\n")
    assert isinstance(failure(2, d, 1), UserError) and isinstance(failure(1, d, 1), LaunchError)
    assert str(failure(2, d, 1)) == f"distillation in its own process failed: student /x is not a checkpoint " \
                                    f"(its log: {d / 'launcher.log'})"  # fmt: skip


def test_multi_node_script_names_its_interpreter_and_what_each_node_needs(pair, tmp_path):
    script, logs = tmp_path / "run" / "distill_torchrun.sh", tmp_path / "run" / "logs"
    with pytest.raises(UserError, match=f"distillation needs 2 nodes: launch {script} on each node"):
        launch.launch(_cfg(pair, tmp_path / "run" / "distill"), 2, 4, script, lambda _: None, logs)
    text = script.read_text()
    assert f"PYTHON={sys.executable}\n" in text and "MASTER_ADDR / MASTER_PORT" in text
    assert "a filesystem all nodes share" in text and f'LOGS={logs / "distill-nodes"}/"$(hostname)"' in text
    line = text.splitlines()[-1]
    assert line.startswith(
        '"$PYTHON" -m torch.distributed.run --nnodes=2 --nproc_per_node=4 --rdzv_backend=c10d '
        '--rdzv_endpoint="$MASTER_ADDR:$MASTER_PORT" --log-dir="$LOGS" --tee=3 -m minipuzzle.cli'
    )
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT")}
    done = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True)
    assert done.returncode != 0 and "set MASTER_ADDR and MASTER_PORT" in done.stderr
    # On a node without the interpreter it was written for, the script stops before launching anything.
    other = tmp_path / "other.sh"
    other.write_text(text.replace(f"PYTHON={sys.executable}\n", f"PYTHON={tmp_path}/nowhere/python\n"))
    done = subprocess.run(["bash", str(other)], env=env | {"MASTER_ADDR": "x", "MASTER_PORT": "1"},
                          capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 2 and f"has no {tmp_path}/nowhere/python" in done.stderr, done.stderr


TORCHRUN_STDERR = """[default1]:error: checkpoint not found: /run/prune
[default0]:distill 1/8
W1204 17:37:44 api.py:1028] Sending process 14326 closing signal SIGTERM
Traceback (most recent call last):
  File "run.py", line 1032, in <module>
torch.distributed.elastic.multiprocessing.errors.ChildFailedError:
[1]:
  rank      : 1 (local_rank: 1)
[0]:
[default0]:late line
"""


def test_torchrun_output_is_logged_whole_and_shown_without_its_own_traceback(tmp_path, capsys):
    """What torchrun writes on stderr: every byte goes to the launch log; the terminal gets the ranks' lines and
    torchrun's notes, not its traceback (it names no cause: the one-line error does)."""
    from minipuzzle.distill.launched import run_logged

    log = tmp_path / "launcher.log"
    code = run_logged([sys.executable, "-c", f"import sys; sys.stderr.write({TORCHRUN_STDERR!r}); sys.exit(1)"],
                      log, ranks=True)  # fmt: skip
    assert code == 1 and log.read_text() == TORCHRUN_STDERR
    lines = TORCHRUN_STDERR.splitlines(keepends=True)
    assert capsys.readouterr().err == "".join(lines[:3] + lines[-1:])
