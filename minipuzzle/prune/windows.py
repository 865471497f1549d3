"""The token windows of a prune: the held-out windows candidates are ranked on, and the calibration windows
scoring reads, never one of them."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from minipuzzle.data import head_split, load_tokenizer, token_windows
from minipuzzle.errors import UserError
from minipuzzle.prune.context import PruneContext


@dataclass(frozen=True)
class Windows:
    """held: [H, T] token ids candidates are ranked on; calib: [C, T] the scoring windows (C = 0 when nothing is
    scored here)."""

    held: torch.Tensor
    calib: torch.Tensor


def read_windows(ctx: PruneContext) -> Windows:
    """The held-out windows: `held_out_data`'s, or, without it, the head of `data` in document order; the
    calibration windows: `data`'s, after that head."""
    req, st = ctx.request, ctx.settings
    tok = load_tokenizer(ctx.ckpt.path)
    n_score = max(st.depth_samples, st.width_samples) if req.scoring else 0
    T, seed, kw = st.seq_len, st.seed, {"column": req.column, "streaming": req.streaming}
    if req.held_out_data is None:
        return Windows(*head_split(req.data, tok, T, st.held_out_windows, n_score, seed, split=req.split, **kw))
    held_split = req.held_out_split or req.split
    if str(Path(req.held_out_data).resolve()) == str(Path(req.data).resolve()) and held_split == req.split:
        raise UserError(f"--held-out-data {req.held_out_data} is the same text as --data: rank on text not scored on")
    held = token_windows(req.held_out_data, tok, T, st.held_out_windows, seed, split=held_split, **kw)
    if not req.scoring:
        return Windows(held, torch.zeros(0, T, dtype=torch.long))
    return Windows(held, token_windows(req.data, tok, T, n_score, seed, split=req.split, **kw))
