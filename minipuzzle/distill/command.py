"""CLI: `minipuzzle distill` (teacher logits -> student), one process or under torchrun.

Its options are the fields of `minipuzzle.settings.DistillSettings`, generated (see `minipuzzle.cli_options`).
"""

from __future__ import annotations

import os
import sys
from typing import Any

import typer

from minipuzzle.cli_options import settings_command
from minipuzzle.hardware import HardwareOptions
from minipuzzle.settings import DistillSettings

# What the command line adds to the model: the four paths are required, a token budget is typed as 63B, and the
# progress bar is on at the terminal.
CLI = dict(
    required=("teacher", "student", "data", "output"),
    types_={"tokens": str | None},
    defaults={"progress": True},
    aliases={"output": ["-o"]},
)


@settings_command(HardwareOptions, into="hardware")
@settings_command(DistillSettings, **CLI)
def distill(settings: dict[str, Any], hardware: dict[str, Any] | None = None) -> None:
    """Distil a teacher into a (pruned) student on the teacher's logits: forward KL at T=1 by default.

    Checkpoints go to OUTPUT.partial/ every --save-every steps and on SIGTERM; rerunning the same command
    resumes. The result is a standard checkpoint at OUTPUT with metrics.jsonl. Multi-GPU: launch with
    torchrun (FSDP2), e.g. `torchrun --nproc_per_node 8 -m minipuzzle.cli distill ...`.

    Refused before it starts when its memory plan does not fit (this machine, or --gpu-memory / --gpus).

    Example: minipuzzle distill --teacher 56b-dir --student 47b-pruned --data corpus.jsonl -o 47b-distilled
    --tokens 7B --seq-len 8192 --batch-size 768 --grad-accum 12
    """
    from minipuzzle.distill.loop import Preempted
    from minipuzzle.distill.loop import distill as run

    cfg = DistillSettings(**settings)
    _check_memory(cfg, hardware)
    try:
        out = run(cfg)
    except Preempted as e:
        print(str(e), file=sys.stderr)
        raise typer.Exit(code=143) from None
    if os.environ.get("RANK", "0") == "0":  # under torchrun, one line, not one per process
        print(f"distilled student written to {out}")


def _check_memory(cfg: DistillSettings, hardware: dict[str, Any] | None) -> None:
    """Refuse (one line, on every process) a distillation whose memory plan does not fit: the plan's geometry,
    and this launch's (WORLD_SIZE processes, --grad-accum, --activation-checkpointing). Under torchrun on GPUs the
    launch says how many nodes and GPUs per node there are (unless --gpus does)."""
    from minipuzzle.hardware import resolve
    from minipuzzle.memory_plan import TodayLaunch, check, distill_stage, model_facts

    cfg.check_paths()
    hw = resolve(None, hardware)
    procs = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_WORLD_SIZE", str(procs)))
    if procs > 1 and hw.device == "cuda" and not (hardware or {}).get("gpus"):
        hw = hw.model_copy(update={"gpus_per_node": local, "nodes": max(1, procs // local)})
    teacher, stored = model_facts(cfg.teacher)
    student, _ = model_facts(cfg.student)
    launch = TodayLaunch(processes=procs, grad_accum=cfg.grad_accum, checkpointing=cfg.activation_checkpointing,
                         on_host=cfg.device == "cpu", note=f"{procs} process(es), --grad-accum {cfg.grad_accum}")  # fmt: skip
    check(hw, distill_stage(teacher, student, hw, cfg, launch, stored_bytes=stored))


def register(app: typer.Typer) -> None:
    app.command("distill")(distill)
