"""`minipuzzle score`: calibration data -> importance scores of every layer and unit."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from minipuzzle.anatomy import SEARCH_AXES
from minipuzzle.arch import KIND_NAMES
from minipuzzle.checkpoint.dtypes import resolve_device
from minipuzzle.checkpoint.resolve import resolve_checkpoint
from minipuzzle.cli_options import settings_command
from minipuzzle.hardware import LINK_OPTIONS, HardwareOptions, resolve
from minipuzzle.memory import check, for_device, model_facts, score_stage
from minipuzzle.score.folder import score_to_folder
from minipuzzle.score.width import describe_aggs
from minipuzzle.settings import DataOptions, DeviceOptions, ScoreSettings


def register(app: typer.Typer) -> None:
    app.command("score")(score)


# --width-agg lists the statistics, which live with the width scores.
@settings_command(
    DataOptions,
    into="text",
    required=("data",),
    helps={"data": "Calibration text: .txt/.jsonl/.parquet, a folder, or a hub dataset."},
)
@settings_command(DeviceOptions, into="compute")
@settings_command(HardwareOptions, into="hardware", exclude=LINK_OPTIONS)
@settings_command(ScoreSettings, helps={
    "width_agg": f"Width statistic SEQ,ROWS: over each row's tokens, then over rows.\n\n{describe_aggs()}",
})  # fmt: skip
def score(
    model: Annotated[str, typer.Argument(help="Checkpoint folder, preset or cached hub id.")],
    text: dict,
    output: Annotated[Path, typer.Option("--output", "-o", help="Folder for scores.safetensors, scores.json, plots.")],
    samples: Annotated[int | None, typer.Option(help="Rows for both passes (overrides the two below).")] = None,
    axes: Annotated[
        str, typer.Option(help=f"Comma-separated, from {','.join(SEARCH_AXES)}; those the model lacks score nothing.")
    ] = ",".join(SEARCH_AXES),
    compute: dict | None = None,
    hardware: dict | None = None,
    model_path: Annotated[str | None, typer.Option(help="Local folder holding MODEL's weights.")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output folder.")] = False,
    plots: Annotated[bool, typer.Option("--plots/--no-plots", help="Write depth.png and width.png.")] = True,
    settings: dict | None = None,
) -> None:
    """Score the importance of every layer, FFN channel, Mamba head and head channel, attention head and hidden
    channel of a Nemotron-H checkpoint. Rerunning an interrupted run resumes it.

    Mixture-of-experts checkpoints (Nemotron 3) also score every routed expert (--expert-estimator), expert
    channel and shared-expert channel. Refused before it starts when its memory plan does not fit the device (this
    machine's, or --gpu-memory).

    Example: minipuzzle score nvidia/Nemotron-H-8B-Base-8K --data calib.jsonl -o scores/8b --seq-len 4096
    """

    if samples is not None:
        settings |= {"depth_samples": samples, "width_samples": samples}
    st, src, dev = ScoreSettings(**settings), DataOptions(**text), DeviceOptions(**compute)
    resolve_device(dev.device, dev.dtype)  # a bad device is reported before the checkpoint is looked at
    path = resolve_checkpoint(model, model_path)
    _check_memory(str(path), st, axes.split(","), dev, hardware)
    scores = score_to_folder(path, src.data, output, st, axes=axes.split(","), split=src.split,
                             text_column=src.text_column, streaming=src.streaming, device=dev.device, dtype=dev.dtype,
                             overwrite=overwrite, plots=plots, progress=True,
                             hardware=resolve(None, hardware))  # fmt: skip
    _print_summary(scores, output)


def _check_memory(path: str, st: ScoreSettings, axes: list[str], dev: DeviceOptions, hardware: dict) -> None:
    """Refuse (one line) a scoring run whose memory plan does not fit the device it would run on."""

    hw = for_device(resolve(None, hardware), dev.device)
    if hw is not None:  # None: told --device cpu on a GPU machine whose RAM is unknown
        layout, stored = model_facts(path)
        check(hw, score_stage(layout, hw, st, axes=axes, dtype=dev.dtype, stored_bytes=stored))


def _print_summary(scores, output: Path) -> None:


    con = Console()
    if "depth" in scores:
        t = Table(title=f"least important layers by kind ({scores.meta.settings.depth_metric})")
        t.add_column("kind")
        t.add_column("layers, least important first")
        depth = scores["depth"]
        for ch, name in KIND_NAMES.items():
            ranked = scores.layer_ranking(ch)[::-1]
            if ranked:
                t.add_row(name, ", ".join(f"{i} ({depth[i]:.3g})" for i in ranked[:8]))
        con.print(t)
    con.print(f"scores written to {output}")
