"""The scores a prune searches with: from `minipuzzle score`'s folder, or measured here as the stage's memory plan
says."""

from __future__ import annotations

import torch

import minipuzzle.score.scoring as scoring  # looked up at the call: tests watch `scoring.score_checkpoint`
from minipuzzle.checkpoint.dtypes import parse_dtype
from minipuzzle.memory import score_launch
from minipuzzle.prune.context import PruneContext
from minipuzzle.score.scores import Scores
from minipuzzle.settings import ScoreSettings


def load_or_score(ctx: PruneContext, calib: torch.Tensor) -> Scores:
    """The scores in the request's scores folder, or, without it, scores measured here on the calibration windows
    calib [C, T], as the plan's scoring parts say (stream, dtype, batch, row budget); the width statistic and
    expert estimator are `ScoreSettings`' defaults (PruneSettings has no field for them)."""
    if not ctx.request.scoring:
        return Scores.load(ctx.request.scores_dir)
    st = ctx.settings
    parts = [p for name, p in ctx.parts.items() if name in ("depth pass", "width pass")]
    go = score_launch(ctx.ckpt.layout, parts, seq_len=st.seq_len)
    defaults = ScoreSettings.model_fields
    return scoring.score_checkpoint(
        ctx.ckpt, calib[: st.depth_samples], calib[: st.width_samples], axes=list(st.axes),
        stream=go["stream"], device=st.device, dtype=parse_dtype(go["dtype"]), progress=ctx.request.progress,
        batch_size=go["batch_size"], budget_bytes=go["budget_bytes"], width_agg=defaults["width_agg"].default,
        expert_estimator=defaults["expert_estimator"].default,
    )  # fmt: skip
