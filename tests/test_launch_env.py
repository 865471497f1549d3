"""Launches that work from any environment: `minipuzzle run`, started by absolute path with the environment's
bin directory (where the `torchrun` and `minipuzzle` console scripts live) off PATH, as a scheduler starts it,
launches its 2-process distillation with the running interpreter. A launch that cannot start, or whose rank dies
before its first step, is one line naming what failed and where its log is, exit 2 for the user's cause."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from minipuzzle.recipe import parse_recipe
from minipuzzle.testing import run_cli

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the environment's scripts sit beside its interpreter (venv or pyenv alike)

pytestmark = pytest.mark.usefixtures("one_thread")


def _bare_env() -> dict[str, str]:
    """The environment of a job a scheduler starts: no activated environment, nothing on PATH that finds the
    environment's console scripts (its bin directory, pyenv's shims)."""
    keep = [p for p in os.environ.get("PATH", "").split(os.pathsep)
            if p and not any(Path(p, s).exists() for s in ("torchrun", "minipuzzle"))]  # fmt: skip
    path = os.pathsep.join(keep or ["/usr/bin", "/bin"])
    assert shutil.which("torchrun", path=path) is None and shutil.which("minipuzzle", path=path) is None, path
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYENV_VERSION", "CONDA_PREFIX")}
    return env | {"PATH": path, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
                  "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}  # fmt: skip


def _resumed_run(pair, run_dir: Path, **distill) -> Path:
    """A recipe file, and RUN_DIR as a run that has scored and pruned (its student: the pair's), so that `run`
    goes straight to distillation under torchrun with 2 processes."""
    teacher, student, data = pair
    doc = {"name": "launch-env", "model": {"source": str(teacher), "dtype": "float32", "device": "cpu"},
           "data": {"source": str(data)}, "score": {"seq_len": 32}, "prune": {"target": "0.8", "held_out_windows": 2},
           "distill": {"max_steps": 2, "seq_len": 32, "batch_size": 2, "warmup": 0, "save_every": 0,
                       "eval_every": 0, "launcher": "torchrun", "nnodes": 1, "nproc_per_node": 2, **distill},
           "eval": {"held_out_windows": 2, "seq_len": 32, "speed": False}}  # fmt: skip
    recipe_file = run_dir.parent / "recipe.yaml"
    recipe_file.write_text(yaml.safe_dump(doc))
    run_dir.mkdir()
    shutil.copytree(student, run_dir / "prune")
    state = {"recipe": json.loads(parse_recipe(doc).model_dump_json()), "done": ["score", "prune"]}
    (run_dir / "run.json").write_text(json.dumps(state))
    return recipe_file


def test_run_by_absolute_path_without_the_environment_on_path_launches_two_processes(pair, tmp_path):
    run_dir = tmp_path / "run"
    recipe_file = _resumed_run(pair, run_dir)
    cmd = [str(BIN / "minipuzzle"), "run", str(recipe_file), "-o", str(run_dir)]
    done = subprocess.run(cmd, env=_bare_env(), cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (run_dir / "distill" / "config.json").is_file()
    assert json.loads((run_dir / "run.json").read_text())["done"] == ["score", "prune", "distill", "eval", "report"]
    # Both ranks ran, each with a log of its own.
    ranks = sorted(p.parent.name for p in (run_dir / "logs").glob("distill-*/ranks/*/attempt_0/*/stderr.log"))
    assert ranks == ["0", "1"], list((run_dir / "logs").rglob("*"))


def test_a_launch_that_cannot_start_is_one_line_exit_2(pair, tmp_path, monkeypatch):
    """No interpreter to run (the environment was removed under a running job), or a torch without
    torch.distributed: `run` stops with one line naming what is missing, exit 2, and launches nothing."""
    import torch.distributed

    run_dir = tmp_path / "run"
    recipe_file = _resumed_run(pair, run_dir)
    gone = tmp_path / "venv" / "bin" / "python"
    monkeypatch.setattr(sys, "executable", str(gone))
    code, _, err = run_cli(["run", str(recipe_file), "-o", str(run_dir)])
    assert code == 2, err
    assert err.splitlines()[-1] == f"error: cannot start the distillation: {gone}: No such file or directory (the " \
                                   "interpreter this minipuzzle runs in)"  # fmt: skip
    assert not (run_dir / "distill").exists() and not (run_dir / "distill.partial").exists()
    monkeypatch.undo()
    monkeypatch.setattr(torch.distributed, "is_available", lambda: False)
    code, _, err = run_cli(["run", str(recipe_file), "-o", str(run_dir)])
    assert code == 2 and err.splitlines()[-1].startswith(
        f"error: cannot launch torchrun: the torch of {sys.executable} is built without torch.distributed"
    ), err
    assert len(list((run_dir / "logs").iterdir())) == 1  # the first try's folder: the second launched nothing


def test_a_rank_that_dies_before_its_first_step_is_one_line_naming_its_log(pair, tmp_path):
    """The prune stage's student is gone: both ranks stop on it (the CLI's user error, in their logs), and `run`
    says so in one line with the rank and its log, exit 2. Nothing of the distillation is written."""
    run_dir = tmp_path / "run"
    recipe_file = _resumed_run(pair, run_dir)
    shutil.rmtree(run_dir / "prune")
    code, _, err = run_cli(["run", str(recipe_file), "-o", str(run_dir)])
    assert code == 2, err[-3000:]
    last = err.splitlines()[-1]
    assert last.startswith("error: distillation rank ") and " of 2 failed: " in last, last
    rank, log = last.split("error: distillation rank ")[1].split()[0], Path(last.split("(its log: ")[1][:-1])
    assert log == next((run_dir / "logs").glob(f"distill-*/ranks/*/attempt_0/{rank}/stderr.log")), log
    # the rank's own line is in its log; the message quotes it
    own = [ln for ln in log.read_text().splitlines() if ln.startswith("error: ")]
    assert own and last.endswith(f"failed: {own[-1].removeprefix('error: ')} (its log: {log})"), (own, last)
    assert str(run_dir / "prune") in own[-1]
    assert "Traceback" not in "\n".join(ln for ln in err.splitlines() if not ln.startswith("[default"))
    assert not (run_dir / "distill").exists()
