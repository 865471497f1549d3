"""Short distillation of each ranked prune candidate before the final choice (MiniPuzzle distils every
candidate briefly; ranks changed after it). Lives outside `search` so that the search does not depend on
distillation."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch


def distill_candidates(path, ckpt, plans, held: torch.Tensor, data: str, settings, progress: bool,
                       skip: int = 0, split: str = "train", column: str = "text") -> list[dict]:  # fmt: skip
    """Cut each plan from `ckpt`, distil it for `settings.candidate_distill_steps` on `data`, and return its
    `metrics.token_stats` against the parent on `held` [H, T].

    `skip`: held-out windows at the head of `data` (see `data.head_split`); distillation takes them as its
    evaluation windows, which it never trains on, and evaluates on them once, at the last step. The winner is
    still written undistilled: the final distillation stage starts from the cut weights.
    """
    from minipuzzle.checkpoint import load_model
    from minipuzzle.distill import distill
    from minipuzzle.metrics import token_stats
    from minipuzzle.settings import DistillSettings
    from minipuzzle.surgery import prune_checkpoint

    steps = settings.candidate_distill_steps
    out = []
    with tempfile.TemporaryDirectory(prefix="minipuzzle-candidates-") as work:
        teacher = load_model(ckpt, dtype=torch.float32, device=settings.device)
        for i, plan in enumerate(plans):
            cut = prune_checkpoint(ckpt, plan, Path(work) / f"cand{i}", progress=False)
            cfg = DistillSettings(
                teacher=str(path), student=str(cut), data=str(data), output=str(Path(work) / f"cand{i}-distilled"),
                max_steps=steps, seq_len=settings.seq_len, batch_size=settings.candidate_distill_batch,
                lr=settings.candidate_distill_lr, warmup=max(1, steps // 10), save_every=0,
                eval_every=steps if skip else 0, eval_windows=skip, split=split, text_column=column,
                seed=settings.seed, device=settings.device, progress=progress,
            )  # fmt: skip
            student = load_model(distill(cfg), dtype=torch.float32, device=settings.device)
            out.append(token_stats(student, held, teacher=teacher, batch_size=settings.batch_size))
            del student
    return out
