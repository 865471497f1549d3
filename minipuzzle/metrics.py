"""Token-level quality of a model, alone or against a teacher: loss, perplexity, KL, accuracy, agreement.

The one family of KL divergences and next-token statistics: distillation losses and validation, depth scores,
candidate ranking and evaluation reports all call these, so that the numbers in every report mean the same thing.
Callers that cannot hold all logits at once (distillation, depth scoring) call them a chunk of tokens at a time;
every function returns sums over tokens, so chunk results add up.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

# Positions whose full-vocabulary logits exist at once when statistics are made from hidden states: 4096 x
# 131072 float32 is 2 GiB per model, where a batch of 8 x 8192 tokens at once would be 34 GiB.
LOGIT_CHUNK = 4096


def kl_from_log_probs(p_logp: torch.Tensor, q_logp: torch.Tensor, p: torch.Tensor | None = None) -> torch.Tensor:
    """Sum over tokens of KL(P || Q) from log-probabilities [..., V] -> 0-d tensor (differentiable).

    `p` may pass P's probabilities (`p_logp.exp()`) when the caller already has them.
    """
    p = p_logp.exp() if p is None else p
    return (p * (p_logp - q_logp)).sum()


def forward_kl(t_logits: torch.Tensor, s_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Sum over tokens of KL(teacher || student); logits [N, V] float32 -> scalar."""
    t = F.log_softmax(t_logits / temperature, dim=-1)
    s = F.log_softmax(s_logits / temperature, dim=-1)
    return kl_from_log_probs(t, s)


def reverse_kl(t_logits: torch.Tensor, s_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Sum over tokens of KL(student || teacher) (mode seeking); logits [N, V] -> scalar."""
    t = F.log_softmax(t_logits / temperature, dim=-1)
    s = F.log_softmax(s_logits / temperature, dim=-1)
    return kl_from_log_probs(s, t)


def topk_kl(t_logits: torch.Tensor, s_logits: torch.Tensor, temperature: float = 1.0, k: int = 64) -> torch.Tensor:
    """Sum over tokens of KL from the teacher's top-k distribution (renormalised over its k most likely tokens) to
    the student's full-vocabulary distribution, read at those k tokens; logits [N, V] -> scalar.

    Non-negative, and zero only when the student puts all its mass on the teacher's top k in the teacher's
    proportions. This is the loss for teachers whose logits were stored sparsely.
    """
    k = min(k, t_logits.shape[-1])
    top, idx = (t_logits / temperature).topk(k, dim=-1)
    t = F.log_softmax(top, dim=-1)
    s = F.log_softmax(s_logits / temperature, dim=-1).gather(-1, idx)
    return kl_from_log_probs(t, s)


# Float32 [N, V] buffers of `next_token_sums` with a teacher that the memory plan counts beside the head's output
# (in the compute dtype) for eval's, ranking's and depth scoring's logits: both logits, both log-softmaxes and the
# two temporaries of `kl_from_log_probs`. tests/test_memory_terms.py measures 7 float32 buffers at the peak of
# `TokenStats.add_states` in float32, which this count and the head's float32 output make.
EVAL_LOGIT_BUFFERS = 6


def next_token_sums(
    logits: torch.Tensor, targets: torch.Tensor, teacher_logits: torch.Tensor | None = None
) -> torch.Tensor:
    """Sums over positions of logits [..., V] float32 against targets [...] (the next tokens), float64 [5]:
    [NLL, KL(teacher || model), argmax == target, argmax == teacher's argmax, positions].

    Without a teacher the KL and agreement entries are 0. The KL sum is clamped at 0 (rounding can make a
    near-zero sum negative).
    """
    logp = F.log_softmax(logits, dim=-1)
    pred = logits.argmax(-1)
    out = torch.zeros(5, dtype=torch.float64, device=logits.device)
    out[0] = -logp.gather(-1, targets.unsqueeze(-1)).sum().double()
    out[2] = (pred == targets).sum().double()
    out[4] = targets.numel()
    if teacher_logits is not None:
        t_logp = F.log_softmax(teacher_logits, dim=-1)
        out[1] = kl_from_log_probs(t_logp, logp).clamp_min(0).double()
        out[3] = (pred == teacher_logits.argmax(-1)).sum().double()
    return out


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
        t_logits = None if teacher_logits is None else teacher_logits[:, :-1].float()
        self._add_sums(next_token_sums(logits[:, :-1].float(), ids[:, 1:], t_logits), teacher_logits is not None)

    def add_states(
        self,
        states: torch.Tensor,
        head: Callable[[torch.Tensor], torch.Tensor],
        ids: torch.Tensor,
        teacher_states: torch.Tensor | None = None,
        teacher_head: Callable[[torch.Tensor], torch.Tensor] | None = None,
        chunk: int = LOGIT_CHUNK,
    ) -> None:
        """Like `add`, from final (normed) hidden states [B, T, h] and the LM head that turns [n, h] into logits
        [n, V]: logits are made `chunk` positions at a time, so a batch never holds [B, T, V]."""
        h = states[:, :-1].reshape(-1, states.shape[-1])
        th = None if teacher_states is None else teacher_states[:, :-1].reshape(-1, teacher_states.shape[-1])
        targets = ids[:, 1:].reshape(-1).to(h.device)
        for s in range(0, len(h), chunk):
            t_logits = None if th is None else teacher_head(th[s : s + chunk]).float()
            logits = head(h[s : s + chunk]).float()
            self._add_sums(next_token_sums(logits, targets[s : s + chunk], t_logits.to(logits.device)
                                           if t_logits is not None else None), th is not None)  # fmt: skip

    def _add_sums(self, sums_t: torch.Tensor, with_teacher: bool) -> None:
        sums = sums_t.tolist()
        self.loss += sums[0]
        self.accuracy += sums[2]
        if with_teacher:
            self.with_teacher = True
            self.kl += sums[1]
            self.agreement += sums[3]
        self.count += int(sums[4])

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
    Logits are compared in float32, `LOGIT_CHUNK` positions at a time.
    """
    device = device or next(model.parameters()).device
    stats = TokenStats()
    for start in range(0, len(windows), batch_size):
        ids = windows[start : start + batch_size].to(device)
        t_states = final_states(teacher, ids) if teacher is not None else None
        stats.add_states(final_states(model, ids), model.lm_head, ids, t_states, getattr(teacher, "lm_head", None))
    return stats.result()


def final_states(model, ids: torch.Tensor) -> torch.Tensor:
    """The final normed hidden states [B, T, h] of a causal LM (what its `lm_head` turns into logits), without
    the logits."""
    return model.model(ids, use_cache=False).last_hidden_state
