"""Calibration text -> a scores folder (scores.safetensors, scores.json, plots): what `minipuzzle score` and the
recipe runner both do. Resumable: partial sums live next to the output until it is written."""

from __future__ import annotations

import shutil
from collections.abc import Collection
from pathlib import Path

import torch

from minipuzzle.checkpoint.dtypes import parse_dtype, resolve_device
from minipuzzle.checkpoint.read import Checkpoint
from minipuzzle.checkpoint.write import atomic_dir, check_output_dir
from minipuzzle.data import load_tokenizer, token_windows
from minipuzzle.hardware import resolve
from minipuzzle.memory import compute_hardware, score_launch, score_stage
from minipuzzle.score.plots import plot_scores
from minipuzzle.score.scores import Scores
from minipuzzle.score.scoring import check_axes, score_checkpoint
from minipuzzle.settings import ScoreSettings


def resume_dir_for(out: Path) -> Path:
    """Where an unfinished run keeps its partial sums: next to the output, hidden, removed on success."""
    return out.parent / f".{out.name}.resume"


def score_to_folder(
    checkpoint: str | Path,
    data: str,
    output: str | Path,
    settings: ScoreSettings,
    *,
    axes: Collection[str],
    split: str = "train",
    text_column: str = "text",
    streaming: bool | None = None,
    device: str | None = "auto",
    dtype: str | None = "auto",
    overwrite: bool = False,
    plots: bool = True,
    progress: bool = True,
    hardware=None,
) -> Scores:
    """Score `checkpoint` on windows of `data` (`split` and `text_column` of a table or hub dataset; `streaming`: see
    `data.iter_documents`) and write the scores folder at `output` atomically. Only the text the windows need is
    read.

    The first `settings.depth_samples` windows [N, seq_len] feed the drop-one-layer pass and the first
    `settings.width_samples` the width pass (the same seeded choice of windows). Rerunning after an interruption
    resumes from the saved partial sums.

    The passes run as the memory plan on `hardware` (a `hardware.Hardware`, default: this machine) says
    (`memory.score_launch`): streamed or loaded, in its dtype, at its forward batch and row chunks.
    """
    axis_list = check_axes(list(axes))
    dev, _ = resolve_device(device, dtype)
    go = _launch(checkpoint, settings, axis_list, dev, dtype, hardware)
    output = Path(output)
    check_output_dir(output, overwrite)
    tokenizer = load_tokenizer(checkpoint)
    n_depth = settings.depth_samples if "depth" in axis_list else 0
    n_width = settings.width_samples if any(a != "depth" for a in axis_list) else 0
    windows = token_windows(data, tokenizer, settings.seq_len, max(n_depth, n_width), settings.seed, split=split,
                            column=text_column, streaming=streaming)  # fmt: skip
    w_depth, w_width = windows[:n_depth], windows[:n_width]
    resume = resume_dir_for(output)
    scores = score_checkpoint(
        checkpoint, w_depth if n_depth else None, w_width if n_width else None, axis_list, settings.depth_metric,
        go["stream"], dev, parse_dtype(go["dtype"]), resume, progress=progress, width_agg=settings.width_agg,
        expert_estimator=settings.expert_estimator, batch_size=go["batch_size"], budget_bytes=go["budget_bytes"],
    )  # fmt: skip
    scores.meta.data = {
        "source": str(data),
        "split": split,
        "text_column": text_column,
        "seed": settings.seed,
        "seq_len": settings.seq_len,
        **_rows_used(windows, w_depth, w_width),
    }
    with atomic_dir(output, overwrite) as tmp:
        scores.save(tmp)
        if plots:
            plot_scores(scores, tmp)
    shutil.rmtree(resume, ignore_errors=True)
    return scores


def _launch(checkpoint, settings: ScoreSettings, axes, dev: torch.device, dtype, hardware) -> dict:
    """`memory.score_launch` of the score stage on `hardware` (default: this machine) computing on `dev`."""
    ckpt = Checkpoint(checkpoint)
    hw = compute_hardware(hardware or resolve(), str(dev))
    name = dtype if isinstance(dtype, str) or dtype is None else str(dtype).removeprefix("torch.")
    stage = score_stage(ckpt.layout, hw, settings, axes=axes, dtype=name, stored_bytes=ckpt.dtype().itemsize)
    return score_launch(ckpt.layout, stage.parts, seq_len=settings.seq_len, depth_metric=settings.depth_metric)


def _rows_used(windows: torch.Tensor, depth: torch.Tensor, width: torch.Tensor) -> dict[str, int]:
    """How many windows [N, T] were read, and how many rows of them each pass used."""
    return {
        "windows_available_or_requested": len(windows),
        "depth_rows": len(depth),
        "width_rows": len(width),
        "tokens": int(windows.numel()),
    }
