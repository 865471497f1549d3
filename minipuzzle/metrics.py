"""Token-level quality of a model, alone or against a teacher: loss, perplexity, KL, accuracy, agreement.

Shared by candidate ranking (search), distillation validation and evaluation reports, so that the numbers in
every report mean the same thing.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


class TokenStats:
    """Running sums of next-token statistics, fed one batch of logits at a time.

    `add(logits [B, T, V], ids [B, T], teacher_logits [B, T, V] | None)` scores every position but the last
    against the next token; `result()` gives the means (see `token_stats`).
    """

    def __init__(self) -> None:
        self.loss = self.accuracy = self.kl = self.agreement = 0.0
        self.count = 0
        self.with_teacher = False

    def add(self, logits: torch.Tensor, ids: torch.Tensor, teacher_logits: torch.Tensor | None = None) -> None:
        logits, target = logits[:, :-1].float(), ids[:, 1:]
        logp = F.log_softmax(logits, dim=-1)
        self.loss += -logp.gather(-1, target.unsqueeze(-1)).sum().item()
        pred = logits.argmax(-1)
        self.accuracy += (pred == target).sum().item()
        if teacher_logits is not None:
            self.with_teacher = True
            tlogp = F.log_softmax(teacher_logits[:, :-1].float(), dim=-1)
            self.kl += (tlogp.exp() * (tlogp - logp)).sum().clamp_min(0).item()
            self.agreement += (pred == tlogp.argmax(-1)).sum().item()
        self.count += target.numel()

    def result(self) -> dict[str, float]:
        n = max(self.count, 1)
        out = {"loss": self.loss / n, "accuracy": self.accuracy / n}
        if self.with_teacher:
            out["kl_to_teacher"] = self.kl / n
            out["agreement"] = self.agreement / n
        out["perplexity"] = math.exp(min(out["loss"], 700.0))
        out["tokens"] = self.count
        return out


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
    stats = TokenStats()
    for start in range(0, len(windows), batch_size):
        ids = windows[start : start + batch_size].to(device)
        t_logits = teacher(ids, use_cache=False).logits if teacher is not None else None
        stats.add(model(ids, use_cache=False).logits, ids, t_logits)
    return stats.result()
