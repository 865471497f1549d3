"""`minipuzzle cut`: apply a plan (from `minipuzzle search`, or written by hand) to a checkpoint."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from minipuzzle.checkpoint.resolve import resolve_checkpoint
from minipuzzle.cli_options import settings_command
from minipuzzle.errors import UserError
from minipuzzle.hardware import LINK_OPTIONS, HardwareOptions, resolve
from minipuzzle.search.plan import read_plan
from minipuzzle.units import parse_bytes

# Imports inside functions here keep torch and transformers unloaded until a function needs them, so `--help`
# and the offline commands (dry runs, info, search) start fast.


@settings_command(HardwareOptions, into="hardware", exclude=("gpu_memory", "gpus", "mamba_kernels", *LINK_OPTIONS))  # cut runs on the host
def _cut_command(
    model: Annotated[str, typer.Argument(help="Source checkpoint folder (or cached hub id / preset).")],
    plan: Annotated[Path, typer.Option("--plan", "-p", help="Plan file (JSON or YAML; `search` writes one).")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Folder for the pruned checkpoint.")],
    model_path: Annotated[str | None, typer.Option(help="Local weights for a preset or hub id.")] = None,
    max_shard_size: Annotated[
        str | None,
        typer.Option(help="Largest safetensors shard, e.g. 5GB (default: the memory plan's, a quarter of the "
                     "memory the cut may use, at most 5GB; a shard is buffered whole before it is written)."),
    ] = None,  # fmt: skip
    hardware: dict | None = None,
    overwrite: Annotated[bool, typer.Option(help="Replace OUTPUT if it exists.")] = False,
    norm_compensation: Annotated[
        bool | None,
        typer.Option(
            "--norm-compensation/--no-norm-compensation",
            help="Scale RMSNorm weights by sqrt(old/new width) where a norm loses input channels "
            "(default: as the plan says, on when it says nothing).",
        ),
    ] = None,
) -> None:
    """Cut a checkpoint to a plan, streaming tensor by tensor (peak memory ~ one output shard and one tensor).

    Refused before it starts when its memory plan does not fit (this machine's RAM, or --host-memory).

    Example: minipuzzle cut ./nemotron-h-8b --plan layout.yaml -o ./pruned
    """
    from minipuzzle.checkpoint.read import Checkpoint
    from minipuzzle.checkpoint.write import check_output_dir
    from minipuzzle.cut import cut_checkpoint
    from minipuzzle.memory import cut_memory

    check_output_dir(output, overwrite)
    src = Checkpoint(resolve_checkpoint(model, model_path))
    p = read_plan(plan)
    if norm_compensation is not None:
        p.norm_compensation = norm_compensation
    dst = p.target_layout(src.layout)
    part = cut_memory(src.layout, resolve(None, hardware), stored_bytes=src.dtype().itemsize,
                      copies=p.copies_tensors(src.layout))  # fmt: skip
    shard = parse_bytes(max_shard_size, "--max-shard-size") if max_shard_size else part.geometry.shard_bytes
    if max_shard_size is None and not part.fits:
        raise UserError(f"cut does not fit: {part.problem}")
    out = cut_checkpoint(src, p, output, overwrite=overwrite, max_shard_bytes=shard)
    for note in p.serving_notes(src.layout):
        print(f"note: {note}", file=sys.stderr)
    print(
        f"wrote {out}: {dst.num_layers} layers ({dst.pattern}), "
        f"{dst.num_params():,} parameters (from {src.layout.num_params():,})"
    )


def register(app: typer.Typer) -> None:
    app.command(name="cut")(_cut_command)
