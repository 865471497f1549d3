"""Run folder, resumable checkpoints and metrics of a distillation run.

An unfinished run lives in `OUT.partial/`:
    run.json                 an `artifacts.DistillState`: the settings of the run (a resume must match its trajectory)
    metrics.jsonl            one JSON object per logged step / evaluation
    checkpoints/step-NNNNNNNN/   torch.distributed.checkpoint files (student + optimizer, sharded under FSDP2)
                             and extra-rankR.pt (step, scheduler, data position, RNG of each process)
A checkpoint is written under a temporary name and renamed when every process has finished, so the newest
`step-*` folder is always complete, whatever moment the run is killed at (SIGKILL included). The older one is
renamed away before it is deleted, so no half-deleted folder ever carries a valid name.
"""

from __future__ import annotations

import os
import random
import shutil
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from minipuzzle.artifacts import METRICS_ROW, DistillState, read_metrics
from minipuzzle.distill.parallel import Dist, barrier
from minipuzzle.errors import UserError
from minipuzzle.settings import DistillSettings

CKPT_PREFIX = "step-"


def checkpoints_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def clean_leftovers(run_dir: Path) -> None:
    """Remove temporary and half-deleted checkpoint folders left by a killed run."""
    ck = checkpoints_dir(run_dir)
    if ck.is_dir():
        for p in ck.iterdir():
            if p.name.startswith("."):
                shutil.rmtree(p, ignore_errors=True)


def latest_checkpoint(run_dir: Path) -> Path | None:
    ck = checkpoints_dir(run_dir)
    if not ck.is_dir():
        return None
    done = sorted(p for p in ck.iterdir() if p.name.startswith(CKPT_PREFIX) and p.is_dir())
    return done[-1] if done else None


def check_run(run_dir: Path, cfg: DistillSettings) -> None:
    """Refuse to continue a run that was started with different settings; record them for a new run."""
    f = Path(run_dir) / "run.json"
    if not f.is_file():
        tmp = f.with_suffix(".tmp")
        DistillState.of(cfg).write(tmp)
        os.replace(tmp, f)
        return
    old, new = DistillState.read(f).trajectory, cfg.trajectory()
    diff = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    if diff:
        k = diff[0]
        raise UserError(
            f"{run_dir} holds an unfinished run with {k}={old.get(k)!r}, not {new.get(k)!r}: rerun it with "
            f"the same settings, or delete {run_dir} to start over"
        )


def rng_state(device: torch.device) -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


@contextmanager
def _single_process_quiet():
    """DCP warns on every single-process save/load that it assumes one process, which is what we asked for."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def save_checkpoint(run_dir: Path, step: int, student, optimizer, extra: dict[str, Any], d: Dist) -> Path:
    """Write student + optimizer (DCP, each process its shards) and `extra` (per process) atomically."""

    ck = checkpoints_dir(run_dir)
    final = ck / f"{CKPT_PREFIX}{step:08d}"
    tmp = ck / f".{final.name}.tmp"
    if d.main:
        ck.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    barrier(d)
    model_sd, optim_sd = get_state_dict(student, optimizer)
    with _single_process_quiet():
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp), no_dist=not d.enabled)
    torch.save(extra, tmp / f"extra-rank{d.rank}.pt")
    barrier(d)
    if d.main:
        old = [p for p in ck.iterdir() if p.name.startswith(CKPT_PREFIX) and p != final]
        if final.exists():  # a rerun that reached the same step again: replace it
            os.replace(final, ck / f".{final.name}.old")
        os.replace(tmp, final)
        for p in old:
            trash = ck / f".{p.name}.old"
            os.replace(p, trash)
            shutil.rmtree(trash, ignore_errors=True)
        shutil.rmtree(ck / f".{final.name}.old", ignore_errors=True)
    barrier(d)
    return final


def load_checkpoint(path: Path, student, optimizer, d: Dist) -> dict[str, Any]:
    """Restore student + optimizer in place from `path`; return this process's `extra` dict."""

    model_sd, optim_sd = get_state_dict(student, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    with _single_process_quiet():
        dcp.load(state, checkpoint_id=str(path), no_dist=not d.enabled)
    set_state_dict(student, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    f = path / f"extra-rank{d.rank}.pt"
    if not f.is_file():  # resumed on more processes than wrote it: step, schedule and data position are shared
        f = path / "extra-rank0.pt"
    return torch.load(f, weights_only=False)


class MetricsLog:
    """Append-only metrics.jsonl on the main process; on resume, entries after the checkpoint are dropped
    (they will be logged again)."""

    def __init__(self, path: Path, d: Dist, resume_step: int | None):
        self.path = Path(path)
        self.enabled = d.main
        if not self.enabled:
            return
        keep = []
        if resume_step is not None and self.path.is_file():  # read_metrics skips a last line cut by SIGKILL
            keep = [row for row in read_metrics(self.path) if row.step <= resume_step]
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(row.model_dump_json() + "\n" for row in keep))
        os.replace(tmp, self.path)

    def write(self, record: dict[str, Any]) -> None:
        """Append one `artifacts.TrainRow` / `EvalRow` (given as a dict; a key no row type has fails here)."""
        if self.enabled:
            with open(self.path, "a") as fh:
                fh.write(METRICS_ROW.validate_python(record).model_dump_json() + "\n")

    def text(self) -> str:
        return self.path.read_text() if self.path.is_file() else ""
