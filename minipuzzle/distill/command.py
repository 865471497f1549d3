"""CLI: `minipuzzle distill` (teacher logits -> student), one process or under torchrun.

Its options are the fields of `minipuzzle.settings.DistillSettings`, generated (see `minipuzzle.cli_options`).
"""

from __future__ import annotations

import os
import sys
from typing import Any

import typer

from minipuzzle.cli_options import settings_command
from minipuzzle.hardware import HardwareOptions, resolve
from minipuzzle.settings import DistillSettings

# Imports inside functions here keep torch and transformers unloaded until a function needs them, so `--help`
# and the offline commands (dry runs, info, search) start fast.

# What the command line adds to the model: the four paths are required and a token budget is typed as 63B.
CLI = dict(
    required=("teacher", "student", "data", "output"),
    types_={"tokens": str | None},
    aliases={"output": ["-o"]},
)


@settings_command(HardwareOptions, into="hardware")
@settings_command(DistillSettings, **CLI)
def distill(settings: dict[str, Any], hardware: dict[str, Any] | None = None) -> None:
    """Distil a teacher into a (pruned) student on the teacher's logits: forward KL at T=1 by default.

    Checkpoints go to OUTPUT.partial/ every --save-every steps and on SIGTERM; rerunning the same command
    resumes. The result is a standard checkpoint at OUTPUT with metrics.jsonl. Multi-GPU: launch with
    torchrun (FSDP2), e.g. `torchrun --nproc_per_node 8 -m minipuzzle.cli distill ...`.

    Runs in its memory plan's geometry (this machine, or --gpu-memory / --gpus; under torchrun, the launch's
    processes): --grad-accum, --activation-checkpointing, --sharding and --accumulation default to the plan's
    choice; a run whose plan does not fit, the choices given included, is refused before it starts.

    Example: minipuzzle distill --teacher 56b-dir --student 47b-pruned --data corpus.jsonl -o 47b-distilled
    --tokens 7B --seq-len 8192 --batch-size 768
    """
    from minipuzzle.distill.loop import Preempted
    from minipuzzle.distill.loop import distill as run

    cfg = DistillSettings(**settings)
    try:
        out = run(cfg, _hardware(hardware))
    except Preempted as e:
        print(str(e), file=sys.stderr)
        raise typer.Exit(code=143) from None
    if os.environ.get("RANK", "0") == "0":  # under torchrun, one line, not one per process
        print(f"distilled student written to {out}")


def _hardware(hardware: dict[str, Any] | None):
    """The hardware this run plans for: this machine (or --gpu-memory / --gpus); under torchrun on GPUs the
    launch's nodes and GPUs per node unless --gpus says so."""
    from minipuzzle.distill.launch import launch_hardware

    return launch_hardware(resolve(None, hardware), explicit_gpus=bool((hardware or {}).get("gpus")))


def register(app: typer.Typer) -> None:
    app.command("distill")(distill)
