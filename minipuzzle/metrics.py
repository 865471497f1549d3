"""Token-level quality of a model, alone or against a teacher: loss, perplexity, KL, accuracy, agreement.

Shared by candidate ranking (search), distillation validation and evaluation reports, so that the numbers in
every report mean the same thing.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


@torch.no_grad()
def token_stats(
    model,
    windows: torch.Tensor,
    teacher=None,
    batch_size: int = 8,
    device: str | torch.device | None = None,
) -> dict[str, float]:
    """Mean next-token statistics over `windows` [N, T] (int64); every position but the last is scored.

    Returns loss (mean NLL, nats), perplexity (exp of loss), accuracy (argmax == next token) and, with a teacher,
    kl_to_teacher (mean over tokens of KL(teacher || model), nats) and agreement (argmax equal to the teacher's).
    Logits are compared in float32 one batch at a time.
    """
    device = device or next(model.parameters()).device
    sums = {"loss": 0.0, "accuracy": 0.0, "kl_to_teacher": 0.0, "agreement": 0.0}
    count = 0
    for start in range(0, len(windows), batch_size):
        ids = windows[start : start + batch_size].to(device)
        logits = model(ids).logits[:, :-1].float()
        target = ids[:, 1:]
        logp = F.log_softmax(logits, dim=-1)
        sums["loss"] += -logp.gather(-1, target.unsqueeze(-1)).sum().item()
        pred = logits.argmax(-1)
        sums["accuracy"] += (pred == target).sum().item()
        if teacher is not None:
            tlogits = teacher(ids).logits[:, :-1].float()
            tlogp = F.log_softmax(tlogits, dim=-1)
            sums["kl_to_teacher"] += (tlogp.exp() * (tlogp - logp)).sum().clamp_min(0).item()
            sums["agreement"] += (pred == tlogits.argmax(-1)).sum().item()
        count += target.numel()
    out = {k: v / max(count, 1) for k, v in sums.items()}
    if teacher is None:
        out.pop("kl_to_teacher")
        out.pop("agreement")
    out["perplexity"] = math.exp(min(out["loss"], 700.0))
    out["tokens"] = count
    return out
