"""The score stage as library calls: a model or checkpoint plus calibration windows -> `Scores`."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Collection
from pathlib import Path
from typing import Any

import torch

from minipuzzle.anatomy import AXES, PER_EXPERT_CHANNELS, SEARCH_AXES, WIDTH_AXES
from minipuzzle.arch import Layout
from minipuzzle.artifacts import ScoresMeta, ScoringInfo
from minipuzzle.checkpoint.read import Checkpoint
from minipuzzle.errors import UserError
from minipuzzle.score.depth import check_metric, depth_scores, windows_digest
from minipuzzle.score.experts import DEFAULT_EXPERT_ESTIMATOR, check_estimator
from minipuzzle.score.layerwise import LayerStack, open_stack
from minipuzzle.score.scores import Scores
from minipuzzle.score.width import DEFAULT_AGG, parse_agg, width_scores

WIDTH_FILE = "width_scores"


def check_axes(axes: Collection[str]) -> tuple[str, ...]:
    axes = tuple(dict.fromkeys(a.strip() for a in axes if a.strip()))
    bad = [a for a in axes if a not in SEARCH_AXES]
    if bad or not axes:
        raise UserError(f"unknown axis {bad[0] if bad else '(none)'!r}: choose from {', '.join(SEARCH_AXES)}")
    return axes


def _check_windows(name: str, w: torch.Tensor | None, needed: bool, vocab: int) -> None:
    if not needed:
        return
    if w is None or w.ndim != 2 or w.numel() == 0:
        raise UserError(f"{name} must be a non-empty [rows, seq_len] tensor of token ids")
    if int(w.max()) >= vocab or int(w.min()) < 0:
        raise UserError(f"{name} holds token id {int(w.max())} outside the model's vocabulary of {vocab}")


def score_stack(
    stack: LayerStack,
    windows_depth: torch.Tensor | None,
    windows_width: torch.Tensor | None,
    axes: Collection[str] = SEARCH_AXES,
    depth_metric: str = "mse_hidden",
    *,
    streamed: bool = False,
    width_agg: str = DEFAULT_AGG,
    expert_estimator: str = DEFAULT_EXPERT_ESTIMATOR,
    batch_size: int = 8,
    budget_bytes: int | None = None,
    resume_dir: str | Path | None = None,
    progress: bool = True,
) -> Scores:
    """Score every requested axis of the model behind `stack`.

    windows_depth [N, T] feeds the drop-one-layer pass, windows_width [M, T] the hooked width pass, which scores
    routed experts with `expert_estimator` (`score.experts.EXPERT_ESTIMATORS`). With `resume_dir`, finished
    width scores and partial depth sums are kept there and reused by a rerun.
    """
    axes = check_axes(axes)
    check_metric(depth_metric)
    parse_agg(width_agg)
    check_estimator(expert_estimator)
    cfg = stack.config
    layout = Layout.from_config(cfg)
    width_axes = [a for a in axes if a != "depth"]
    _check_windows("windows_depth", windows_depth, "depth" in axes, cfg.vocab_size)
    _check_windows("windows_width", windows_width, bool(width_axes), cfg.vocab_size)
    scores = Scores(pattern=stack.pattern)
    timing: dict[str, float] = {}
    if width_axes:
        t0 = time.perf_counter()
        how = {"agg": width_agg, "expert_estimator": expert_estimator}
        got = _width_pass(stack, windows_width, width_axes, how, batch_size, budget_bytes, resume_dir, progress)
        for axis in width_axes:
            scores[axis] = got[axis]
        scores[PER_EXPERT_CHANNELS] = got.get(PER_EXPERT_CHANNELS) or {}
        timing["width_seconds"] = round(time.perf_counter() - t0, 3)
    if "depth" in axes:
        t0 = time.perf_counter()
        scores["depth"] = depth_scores(
            stack, windows_depth, depth_metric, batch_size=batch_size, budget_bytes=budget_bytes,
            resume_dir=resume_dir, progress=progress,
        )  # fmt: skip
        timing["depth_seconds"] = round(time.perf_counter() - t0, 3)
    scores.meta = ScoresMeta(
        settings=_settings_meta(
            stack, windows_depth, windows_width, axes, depth_metric, width_agg, streamed, expert_estimator
        ),
        groups={name: axis.unit(layout) for name, axis in AXES.items() if axis.group_field},
        timing=timing,
    )
    return scores


def _settings_meta(
    stack, windows_depth, windows_width, axes, depth_metric, width_agg, streamed, expert_estimator
) -> ScoringInfo:
    """scores.json's record of how the scores were made; windows [N, T] as `score_stack` got them."""
    depth, width = "depth" in axes, any(a != "depth" for a in axes)
    return ScoringInfo(
        axes=list(axes),
        depth_metric=depth_metric if depth else None,
        width_aggregation=width_agg if width else None,
        expert_estimator=expert_estimator if "experts" in axes and stack.pattern.count("E") else None,
        depth_samples=int(windows_depth.shape[0]) if depth else 0,
        width_samples=int(windows_width.shape[0]) if width else 0,
        seq_len=int((windows_depth if depth else windows_width).shape[1]),
        streamed=streamed,
        device=str(stack.device),
        dtype=str(stack.dtype).removeprefix("torch."),
    )


def _width_pass(stack, windows, axes, how, batch_size, budget_bytes, resume_dir, progress) -> dict[str, Any]:
    """`width_scores` of `axes` (`how`: agg and expert_estimator), reused from `resume_dir` when a finished pass
    with the same inputs is there."""
    fingerprint = {"axes": axes, **how, "windows": windows_digest(windows), "pattern": stack.pattern}
    got = _load_width(resume_dir, fingerprint)
    if got is None:
        got = width_scores(
            stack, windows, axes, how["agg"], expert_estimator=how["expert_estimator"], batch_size=batch_size,
            budget_bytes=budget_bytes, progress=progress,
        )  # fmt: skip
        _save_width(resume_dir, fingerprint, got, stack.pattern)
    return got


def score_model(
    model,
    windows_depth: torch.Tensor | None,
    windows_width: torch.Tensor | None,
    axes: Collection[str] = SEARCH_AXES,
    depth_metric: str = "mse_hidden",
    progress: bool = True,
    **kwargs: Any,
) -> Scores:
    """Scores of an in-memory `NemotronHForCausalLM` (its layers may sit on several devices); see `score_stack`."""
    stack, _ = open_stack(model)
    return score_stack(stack, windows_depth, windows_width, axes, depth_metric, progress=progress, **kwargs)


def score_checkpoint(
    path: str | Path | Checkpoint,
    windows_depth: torch.Tensor | None,
    windows_width: torch.Tensor | None,
    axes: Collection[str] = SEARCH_AXES,
    depth_metric: str = "mse_hidden",
    stream: bool | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    resume_dir: Path | None = None,
    progress: bool = True,
    **kwargs: Any,
) -> Scores:
    """Scores of a checkpoint folder (or a `Checkpoint` already opened), loaded whole or streamed layer by layer
    (stream=None: stream when it does not fit in the device's free memory). Streamed and in-memory runs give the
    same scores."""
    stack, streamed = open_stack(path, stream, device, dtype)
    scores = score_stack(
        stack, windows_depth, windows_width, axes, depth_metric, streamed=streamed, resume_dir=resume_dir,
        progress=progress, **kwargs,
    )  # fmt: skip
    scores.meta.checkpoint = str(path.path if isinstance(path, Checkpoint) else path)
    return scores


def _load_width(resume_dir, fp) -> dict[str, Any] | None:
    if resume_dir is None:
        return None
    folder = Path(resume_dir) / WIDTH_FILE
    try:
        if json.loads((folder / "fingerprint.json").read_text()) != fp:
            return None
        s = Scores.load(folder)
    except (OSError, ValueError, UserError):
        return None
    return {name: s[name] for name in (*WIDTH_AXES, PER_EXPERT_CHANNELS)}


def _save_width(resume_dir, fp, got, pattern) -> None:
    if resume_dir is None:
        return
    folder = Path(resume_dir) / WIDTH_FILE
    folder.mkdir(parents=True, exist_ok=True)
    Scores(pattern, {name: got.get(name) for name in (*WIDTH_AXES, PER_EXPERT_CHANNELS)}).save(folder)
    tmp = folder / "fingerprint.json.tmp"
    tmp.write_text(json.dumps(fp))
    os.replace(tmp, folder / "fingerprint.json")
