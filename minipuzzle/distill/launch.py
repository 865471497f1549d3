"""How a distillation is launched: the memory plan's geometry filled into its settings, and the torchrun command
that runs it on more devices than one process has (the distill stage of a run and prune's candidate distillation
both go through here).

    planned(settings, hardware, processes) -> (settings with grad_accum / checkpointing / sharding, Part)
    launch(settings, nnodes, nproc_per_node, script_dir, log)  # torchrun, or a script for every node
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from minipuzzle.errors import UserError
from minipuzzle.hardware import Hardware
from minipuzzle.settings import DistillSettings


def launch_hardware(hw: Hardware, explicit_gpus: bool = False) -> Hardware:
    """Under torchrun on GPUs, the launch says how many nodes and GPUs per node there are (WORLD_SIZE,
    LOCAL_WORLD_SIZE), unless --gpus said so; elsewhere `hw`."""
    procs = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_WORLD_SIZE", str(procs)))
    if procs > 1 and hw.device == "cuda" and not explicit_gpus:
        return hw.model_copy(update={"gpus_per_node": local, "nodes": max(1, procs // local)})
    return hw


def plan_for(cfg: DistillSettings, hw: Hardware, processes: int | None):
    """The memory plan's part for `cfg` (its teacher and student read from their configs) on `processes` ranks
    (None: as many as the plan chooses)."""
    from minipuzzle.memory_plan import model_facts, plan_distill

    teacher, stored = model_facts(str(cfg.teacher))
    student = model_facts(str(cfg.student))[0] if cfg.student and Path(cfg.student, "config.json").is_file() else teacher
    return plan_distill(teacher, student, hw, cfg, processes=processes, stored_bytes=stored)


def planned(cfg: DistillSettings, hw: Hardware, processes: int | None = 1) -> tuple[DistillSettings, object]:
    """(`cfg` with the plan's grad_accum, activation_checkpointing and sharding where `cfg` leaves them None, the
    plan's `Part`). Raises `UserError` (one line) when the plan does not fit, the user's own choices included."""
    if processes and cfg.grad_accum and cfg.batch_size % (processes * cfg.grad_accum):
        raise UserError(f"--batch-size {cfg.batch_size} must be a multiple of processes ({processes}) x "
                        f"--grad-accum ({cfg.grad_accum})")  # fmt: skip
    part = plan_for(cfg, hw, processes)
    if not part.fits:
        given = [f"{k} {v}" for k, v in (("--grad-accum", cfg.grad_accum), ("--sharding", cfg.sharding),
                 ("--activation-checkpointing", cfg.activation_checkpointing)) if v is not None]  # fmt: skip
        how = f" with {', '.join(given)} as given" if given else ""
        raise UserError(f"distill does not fit{how}: {part.problem} ({part.geometry.describe()})")
    g = part.geometry
    fill = {"grad_accum": g.grad_accum, "activation_checkpointing": bool(g.activation_checkpointing),
            "sharding": "per_node" if g.sharding == "per_node" else "full"}  # fmt: skip
    return cfg.model_copy(update={k: v for k, v in fill.items() if getattr(cfg, k) is None}), part


def torchrun_command(settings: DistillSettings, nnodes: int, nproc_per_node: int) -> list[str]:
    """The `torchrun ... minipuzzle distill ...` command line that runs `settings` on every process."""
    from minipuzzle.cli_options import settings_flags

    cmd = ["torchrun", f"--nnodes={nnodes}", f"--nproc_per_node={nproc_per_node}"]
    if nnodes > 1:
        cmd += ["--rdzv_backend=c10d", "--rdzv_endpoint=$MASTER_ADDR:$MASTER_PORT"]
    # max_steps already holds what a token budget asked for.
    return cmd + ["-m", "minipuzzle.cli", "distill", *settings_flags(settings, exclude=("tokens",))]


def nodes_and_procs(part, hw: Hardware) -> tuple[int, int]:
    """(nnodes, nproc_per_node) of a plan's part: its devices, whole nodes beyond one."""
    devices = part.geometry.devices
    return max(1, -(-devices // hw.gpus_per_node)), min(devices, hw.gpus_per_node)


def child_command(settings: DistillSettings) -> list[str]:
    """The `python -m minipuzzle.cli distill ...` command line that runs `settings` in one child process."""
    from minipuzzle.cli_options import settings_flags

    return [sys.executable, "-m", "minipuzzle.cli", "distill", *settings_flags(settings, exclude=("tokens",))]


def launch(cfg: DistillSettings, nnodes: int, nproc_per_node: int, script: Path, log: Callable[[str], None],
           then: str = "rerun this command to continue") -> None:  # fmt: skip
    """Run `cfg` in a child process (one process), under torchrun on this node, or, over several nodes, write
    `script` (to run on every node) and raise `UserError` saying so. A failed run raises `UserError`; its
    checkpoints let a rerun resume."""
    cmd = torchrun_command(cfg, nnodes, nproc_per_node)
    if nnodes == 1:
        single = nproc_per_node == 1
        cmd = child_command(cfg) if single else cmd
        log("[distill] " + shlex.join(cmd))
        done = subprocess.run(cmd, check=False)
        if done.returncode != 0:
            how = "in its own process" if single else "under torchrun"
            raise UserError(f"distillation {how} exited with code {done.returncode}; rerun to resume")
        return
    write_script(script, [cmd])
    raise UserError(f"distillation needs {nnodes} nodes: launch {script} on each node (it resumes from its "
                    f"checkpoints), then {then}")  # fmt: skip


def write_script(script: Path, commands: list[list[str]]) -> None:
    """A bash script running `commands` one after the other (each a torchrun line to run on every node)."""
    lines = ["#!/usr/bin/env bash", "# Run on every node (MASTER_ADDR / MASTER_PORT set), then rerun minipuzzle.",
             "set -e", *(" ".join(c) for c in commands)]  # fmt: skip
    script.parent.mkdir(parents=True, exist_ok=True)
    script.write_text("\n".join(lines) + "\n")
    script.chmod(0o755)
