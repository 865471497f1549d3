"""Distillation losses, computed chunk by chunk over the tokens.

At Nemotron-H scale the logits are the memory problem: 131072 vocab x 8192 tokens x 4 bytes is 4 GiB per sequence
for one model. So the models run only up to their final norm (hidden states [B, T, H], small), and the LM heads,
the float32 softmaxes and the KL run on `chunk` tokens at a time (`_HeadLoss`): each chunk's loss is
differentiated as soon as it is computed, keeping only the gradients w.r.t. the hidden states and the student's
head weight, so at most one chunk's logits are alive and none is recomputed in the backward.

`DistillObjective` holds both models so that, under FSDP2, one root module owns the embeddings and heads of both:
their weights are gathered once for the step, and the heads can be called once per chunk.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from minipuzzle.errors import UserError
from minipuzzle.metrics import forward_kl, kl_from_log_probs, next_token_sums, reverse_kl, topk_kl


def cosine_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of 1 - cos(a, b); hidden states [B, T, H] -> scalar (computed in float32)."""
    return (1 - F.cosine_similarity(a.float(), b.float(), dim=-1)).mean()


class DistillObjective(nn.Module):
    """Teacher (frozen) and student in one module whose forward returns the step's loss and statistics.

    forward(ids [B, T] int64) -> dict of 0-d tensors: `loss` (differentiable: the distillation term x T^2 +
    lm_weight x LM loss + hidden_weight x hidden cosine loss, each a mean over tokens) and detached `kl` (forward
    KL at T=1, mean per token), `lm`, `hidden`. Training scores every position; evaluation scores positions
    0..T-2 (the ones with a next token) to agree with `minipuzzle.metrics.token_stats`.
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        *,
        loss: str = "forward_kl",
        temperature: float = 1.0,
        top_k: int = 64,
        lm_weight: float = 0.0,
        hidden_weight: float = 0.0,
        layer_pairs: list[tuple[int, int]] | None = None,
        chunk: int = 4096,
    ):
        super().__init__()
        sh, th = student.config.hidden_size, teacher.config.hidden_size
        if hidden_weight > 0 and sh != th:
            raise UserError(
                f"--hidden-weight compares hidden states, but the student's hidden size {sh} differs from the "
                f"teacher's {th}: use logits only (--hidden-weight 0)"
            )
        self.student = student
        self.teacher = teacher
        self.loss_name = loss
        self.temperature = temperature
        self.top_k = top_k
        self.lm_weight = lm_weight
        self.hidden_weight = hidden_weight
        self.layer_pairs = list(layer_pairs or [])
        self.chunk = chunk
        teacher.requires_grad_(False)
        teacher.eval()

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.eval()  # the teacher never leaves eval mode
        return self

    def _distill_term(self, t_logits: torch.Tensor, s_logits: torch.Tensor) -> torch.Tensor:
        if self.loss_name == "forward_kl":
            return forward_kl(t_logits, s_logits, self.temperature)
        if self.loss_name == "reverse_kl":
            return reverse_kl(t_logits, s_logits, self.temperature)
        return topk_kl(t_logits, s_logits, self.temperature, self.top_k)

    def _chunk_terms(self, s_logits: torch.Tensor, t_logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """[distill sum, forward-KL sum, LM NLL sum] over one chunk (logits [N, V] float32, targets [N])."""
        distill = self._distill_term(t_logits, s_logits)
        if self.loss_name == "forward_kl" and self.temperature == 1.0:
            kl = distill
        else:
            with torch.no_grad():
                kl = forward_kl(t_logits, s_logits)
        with torch.set_grad_enabled(self.lm_weight > 0 and torch.is_grad_enabled()):
            lm = F.cross_entropy(s_logits, targets, ignore_index=-100, reduction="sum")
        return torch.stack([distill, kl, lm])

    def _hidden(self, ids: torch.Tensor):
        """Final-norm hidden states of both models [B, T, H] and the (1 - cos) loss over the layer map."""
        captured: dict[tuple[str, int], torch.Tensor] = {}
        hooks = []
        for name, model, idx in [("s", self.student, s) for s, _ in self.layer_pairs] + [
            ("t", self.teacher, t) for _, t in self.layer_pairs
        ]:

            def hook(_m, _inp, out, key=(name, idx)):
                captured[key] = out[0] if isinstance(out, tuple) else out

            hooks.append(model.model.layers[idx].register_forward_hook(hook))
        try:
            s_h = self.student.model(input_ids=ids, use_cache=False).last_hidden_state
            with torch.no_grad():
                t_h = self.teacher.model(input_ids=ids, use_cache=False).last_hidden_state
        finally:
            for h in hooks:
                h.remove()
        hidden = s_h.new_zeros((), dtype=torch.float32)
        if self.layer_pairs:
            terms = [cosine_distance(captured[("s", s)], captured[("t", t)]) for s, t in self.layer_pairs]
            hidden = torch.stack(terms).mean()
        return s_h, t_h, hidden

    def forward(self, ids: torch.Tensor, evaluate: bool = False):
        """Training terms for ids [B, T], or with evaluate=True the evaluation sums (see `evaluate_sums`).

        Both go through forward so that FSDP2's hooks on this root module gather the heads and embeddings.
        """
        if evaluate:
            return self.evaluate_sums(ids)
        s_h, t_h, hidden = self._hidden(ids)
        b, t, h = s_h.shape
        targets = torch.full_like(ids, -100)
        targets[:, :-1] = ids[:, 1:]
        n, n_lm = b * t, max(b * (t - 1), 1)
        # Weights of [distill, kl, lm] sums in the loss: means over tokens, KL scaled by T^2.
        scale = torch.tensor([self.temperature**2 / n, 0.0, self.lm_weight / n_lm])
        loss, sums = _HeadLoss.apply(
            s_h.reshape(n, h), self.student.lm_head.weight, t_h.reshape(n, -1), self.teacher.lm_head.weight,
            targets.reshape(-1), scale, self,
        )  # fmt: skip
        kl, lm = sums[1] / n, sums[2] / n_lm
        if self.hidden_weight > 0:
            loss = loss + self.hidden_weight * hidden
        return {"loss": loss, "kl": kl, "lm": lm, "hidden": hidden.detach()}

    @torch.no_grad()
    def evaluate_sums(self, ids: torch.Tensor) -> torch.Tensor:
        """Sums over positions 0..T-2 of ids [B, T]: [NLL, KL(teacher||student), accuracy, agreement, count]."""
        s_h = self.student.model(input_ids=ids, use_cache=False).last_hidden_state[:, :-1]
        t_h = self.teacher.model(input_ids=ids, use_cache=False).last_hidden_state[:, :-1]
        b, t, h = s_h.shape
        # The teacher's hidden size may differ (a hidden-pruned student): only the positions must match.
        s_flat, t_flat, y = s_h.reshape(b * t, h), t_h.reshape(b * t, -1), ids[:, 1:].reshape(-1)
        out = torch.zeros(5, dtype=torch.float64, device=ids.device)
        for start in range(0, b * t, self.chunk):  # one chunk's [chunk, V] float32 logits at a time
            sl = slice(start, start + self.chunk)
            s_logits = self.student.lm_head(s_flat[sl]).float()
            t_logits = self.teacher.lm_head(t_flat[sl]).float()
            out += next_token_sums(s_logits, y[sl], t_logits)
        return out


class _HeadLoss(torch.autograd.Function):
    """Both LM heads and the logit losses, chunk by chunk, with the student's gradient computed on the spot.

    forward(s_h [N, H], s_weight [V, H], t_h [N, H_t], t_weight [V, H_t], targets [N], scale [3], objective)
    -> (loss: sum of scale x [distill, kl, lm] sums, sums [3] detached). For each chunk the student logits are
    built, the loss terms computed and differentiated at once (autograd on the chunk), and only the gradients
    w.r.t. s_h ([N, H], small) and s_weight (one head-sized buffer) are kept; the chunk's logits are freed
    before the next chunk. The backward then only scales those gradients: no logits are ever recomputed.
    """

    @staticmethod
    def forward(ctx, s_h, s_weight, t_h, t_weight, targets, scale, objective):
        grad_h = torch.zeros_like(s_h)
        grad_w = torch.zeros_like(s_weight)
        sums = torch.zeros(3, dtype=torch.float32, device=s_h.device)
        scale = scale.to(s_h.device)
        analytic = objective.loss_name == "forward_kl" and objective.lm_weight == 0
        for start in range(0, s_h.shape[0], objective.chunk):
            sl = slice(start, start + objective.chunk)
            if analytic:
                terms = _forward_kl_chunk(s_h[sl], s_weight, t_h[sl], t_weight, targets[sl], objective.temperature,
                                          scale[0], grad_h[sl], grad_w)  # fmt: skip
                sums += terms
                continue
            with torch.enable_grad():
                h = s_h[sl].detach().requires_grad_(True)
                w = s_weight.detach().requires_grad_(True)
                s_logits = F.linear(h, w).float()
                with torch.no_grad():
                    t_logits = F.linear(t_h[sl], t_weight).float()
                terms = objective._chunk_terms(s_logits, t_logits, targets[sl])
                total = (terms * scale).sum()
                if total.requires_grad:
                    gh, gw = torch.autograd.grad(total, (h, w))
                    grad_h[sl] = gh
                    grad_w += gw
            sums += terms.detach()
        ctx.save_for_backward(grad_h, grad_w)
        loss = (sums * scale).sum()
        ctx.mark_non_differentiable(sums)
        return loss, sums

    @staticmethod
    def backward(ctx, g_loss, _g_sums):
        grad_h, grad_w = ctx.saved_tensors
        return grad_h * g_loss, grad_w * g_loss, None, None, None, None, None


# Float32 [N, V] buffers `_forward_kl_chunk` holds at once: student and teacher logits, both log-softmaxes, p, then
# exp(s_logp) - p and its scaled copy while the earlier ones are still referenced. The memory plan counts a training
# step's logits with it (tests/test_memory_terms.py measures it from the allocator).
KL_CHUNK_LOGIT_BUFFERS = 7


@torch.no_grad()
def _forward_kl_chunk(h, w, t_h, t_w, targets, temperature, scale, grad_h_out, grad_w_out) -> torch.Tensor:
    """The default loss with its gradient written out: d(scale x sum KL(p || q))/d logits = scale/T x (q - p).

    Saves the autograd passes over the [N, V] float32 tensors (the part of the step that grows with the
    vocabulary). Writes grad_h_out [N, H] and adds to grad_w_out [V, H]; returns [KL sum, KL sum, LM NLL sum].
    Holds `KL_CHUNK_LOGIT_BUFFERS` float32 [N, V] buffers at its peak.
    """
    s_logits = F.linear(h, w).float()
    t_logits = F.linear(t_h, t_w).float()
    t_logp = F.log_softmax(t_logits / temperature, dim=-1)
    s_logp = F.log_softmax(s_logits / temperature, dim=-1)
    p = t_logp.exp()
    kl = kl_from_log_probs(t_logp, s_logp, p)
    g = (s_logp.exp() - p) * (scale / temperature)
    # Under autocast these matmuls run in bf16 like the head's own backward would; the buffers keep their dtype.
    grad_h_out.copy_(g @ w)
    grad_w_out += g.t() @ h
    if temperature != 1.0:  # the reported KL is always at T = 1
        s_logp = F.log_softmax(s_logits, dim=-1)
        kl1 = kl_from_log_probs(F.log_softmax(t_logits, dim=-1), s_logp)
    else:
        kl1 = kl
    valid = targets >= 0
    lm = -s_logp[valid].gather(-1, targets[valid].unsqueeze(-1)).sum()
    return torch.stack([kl, kl1, lm])
