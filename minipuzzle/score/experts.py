"""Importance of routed experts and of expert channels in mixture-of-experts layers (Nemotron 3).

Forward hooks on an MoE mixer's router (`mixer.gate`: its logits) and routed experts (`mixer.experts`: the tokens'
input to the experts, the chosen experts and weights, the routed output) see exactly what the forward computed,
so nothing is routed a second time. From them come per-token contributions c[t, e] of every expert, aggregated
over the calibration tokens by the width statistic like every other axis (`--width-agg`). Estimators:

- `removal` (the default): ||change of the layer's output at token t|| when expert e is removed and the router
  chooses again among the others (its group choice, its top-k and its renormalisation, as the pruned model will).
  This is the quantity pruning changes, re-routing included, hence the default. It costs the most: each token
  runs its re-routed experts once for each of its chosen experts (about top-k + 1 times the routed experts'
  work of a plain forward pass in MoE layers). Tokens whose set of chosen experts does not change count 0.
- `router_load`: the routing weight w[t, e] (0 when e is not chosen): how much the router leans on e. Nearly free.
- `output_norm`: ||w[t, e] f_e(x_t)||, the size of what e adds to the layer's output (0 when not chosen); one
  pass of the chosen experts.

An expert the router never chooses, and whose removal never changes a group's two best experts, scores exactly 0
under `router_load` and `removal` (and under `output_norm`, which is 0 whenever the expert does not run).

`expert_ffn` channel c at token t: sum over the token's chosen experts of w[t, e] relu(up_e x_t)[c]^2, the routed
hidden units weighted as the layer weights the experts' outputs: one score vector per layer, for the shared choice
(the same channels cut in every expert). A channel whose up_proj row is zero in every expert scores exactly 0.
`expert_channels` scores each expert's own channels ([E, width] per layer, for the per-expert choice): the same
unit w[t, e] relu(up_e x_t)[c]^2 of expert e alone (0 at tokens that do not choose e), aggregated alike; a channel
whose up_proj row is zero in that expert scores exactly 0.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from minipuzzle.errors import UserError

EXPERT_ESTIMATORS = {
    "removal": "change of the layer's output when the expert is removed and tokens are re-routed (default)",
    "router_load": "routing weight the router gives the expert, 0 where it is not chosen",
    "output_norm": "norm of the expert's weighted output, 0 where it is not chosen",
}
DEFAULT_EXPERT_ESTIMATOR = "removal"


def check_estimator(name: str) -> str:
    if name not in EXPERT_ESTIMATORS:
        raise UserError(f"unknown expert estimator {name!r}: choose one of {', '.join(EXPERT_ESTIMATORS)}")
    return name


def route(gate: nn.Module, scores: torch.Tensor, masked: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The router's choice from its sigmoid scores [N, E], with expert `masked` removed: (indices [N, k], weights
    [N, k]). Unmasked it is transformers' `NemotronHTopkRouter` choice: correction bias added for choosing only,
    groups ranked by the sum of their two best experts, the top-k from the best `topk_group` groups, weights the
    unbiased scores, renormalised when `norm_topk_prob`, times `routed_scaling_factor`."""
    experts, groups = gate.num_experts, gate.num_group
    choice = scores + gate.e_score_correction_bias
    if masked is not None:
        choice[:, masked] = float("-inf")
    group_scores = choice.view(-1, groups, experts // groups).topk(2, dim=-1)[0].sum(dim=-1)
    group_idx = torch.topk(group_scores, k=gate.topk_group, dim=-1, sorted=False)[1]
    group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1)
    allowed = group_mask.unsqueeze(-1).expand(-1, groups, experts // groups).reshape(-1, experts).bool()
    idx = torch.topk(choice.masked_fill(~allowed, float("-inf")), k=gate.top_k, dim=-1, sorted=False)[1]
    weights = scores.gather(1, idx)
    if gate.norm_topk_prob:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return idx, weights * gate.routed_scaling_factor


def _chosen(idx: torch.Tensor):
    """(expert, tokens, slots) for every expert that tokens chose; idx [N, k]."""
    for e in torch.unique(idx).tolist():
        tokens, slots = torch.where(idx == e)
        yield e, tokens, slots


def _to_hidden(mixer: nn.Module, routed: torch.Tensor) -> torch.Tensor:
    """A change of the routed experts' output [N, in] as the change of the layer's output [N, h]: through the
    latent projection's weight when the experts work in a latent space (its bias cancels in a difference)."""
    fc2 = mixer.fc2_latent_proj
    return F.linear(routed, fc2.weight) if isinstance(fc2, nn.Linear) else routed


def expert_channels(mixer: nn.Module, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """[N, width]: each token's routed hidden units, sum over its chosen experts e of w[t, e] relu(up_e x_t)^2.
    x [N, in] is the experts' input, idx / w [N, k] the choice."""
    experts = mixer.experts
    out = torch.zeros(x.shape[0], experts.up_proj.shape[1], dtype=torch.float32, device=x.device)
    for e, tokens, slots in _chosen(idx):
        act = experts.act_fn(F.linear(x[tokens], experts.up_proj[e]))
        out.index_add_(0, tokens, act.float() * w[tokens, slots, None].float())
    return out


def per_expert_channel_rows(
    mixer: nn.Module, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor, shape: tuple[int, int], seq: str
) -> torch.Tensor:
    """[B, E, width] float32: the width statistic over each row's T tokens (`seq`, as `width.Aggregate` takes
    it) of each expert's weighted hidden units w[t, e] relu(up_e x_t), 0 at tokens not routed to e. x [N, in]
    with N = B * T (`shape` = (B, T)); idx / w [N, k]. Built from the routed tokens only: the [N, E, width]
    activation never exists (at Nano 3's 128 experts of 1856 it would be ~1 MB per token)."""
    experts = mixer.experts
    rows, t = shape
    num, width = mixer.gate.num_experts, experts.up_proj.shape[1]
    out = torch.zeros(rows, num, width, dtype=torch.float32, device=x.device)
    for e, tokens, slots in _chosen(idx):
        act = experts.act_fn(F.linear(x[tokens], experts.up_proj[e])).float() * w[tokens, slots, None].float()
        row = tokens // t
        if seq == "max":
            out[:, e].scatter_reduce_(0, row[:, None].expand_as(act), act.abs(), "amax")  # from 0: |.| >= 0
        elif seq == "l2":
            out[:, e].index_add_(0, row, act.pow(2))
        else:
            out[:, e].index_add_(0, row, act if seq == "signed_mean" else act.abs())
    if seq == "l2":
        return (out / t).sqrt()
    return out if seq == "max" else out / t


def expert_contributions(
    mixer: nn.Module, estimator: str, logits: torch.Tensor, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor,
    routed: torch.Tensor,
) -> torch.Tensor:  # fmt: skip
    """Per-token contributions [N, E] (float32) of every routed expert under `estimator`. logits [N, E]: the
    router's; x [N, in]: the experts' input; idx / w [N, k]: the choice; routed [N, in]: the experts' output."""
    n, num = x.shape[0], mixer.gate.num_experts
    out = torch.zeros(n, num, dtype=torch.float32, device=x.device)
    if estimator == "router_load":
        return out.scatter_(1, idx, w.float())
    if estimator == "output_norm":
        experts = mixer.experts
        for e, tokens, slots in _chosen(idx):
            y = F.linear(experts.act_fn(F.linear(x[tokens], experts.up_proj[e])), experts.down_proj[e])
            out[tokens, e] = _to_hidden(mixer, y * w[tokens, slots, None]).float().norm(dim=-1)
        return out
    return _removal(mixer, logits, x, idx, routed, out)


def _removal(mixer, logits, x, idx, routed, out: torch.Tensor) -> torch.Tensor:
    """`out` [N, E] filled with ||output change|| of each token when each expert is removed and tokens re-routed."""
    gate, scores = mixer.gate, logits.float().sigmoid()
    before = idx.sort(-1).values
    if not torch.equal(route(gate, scores)[0].sort(-1).values, before):
        raise RuntimeError("transformers' NemotronH router no longer chooses as score.experts.route does")
    for e in range(gate.num_experts):
        new_idx, new_w = route(gate, scores, masked=e)
        changed = torch.where((new_idx.sort(-1).values != before).any(-1))[0]
        if changed.numel() == 0:
            continue
        # `forward`, not the module call: the hooks that called this must not see the re-routed pass.
        after = mixer.experts.forward(x[changed], new_idx[changed], new_w[changed])
        out[changed, e] = _to_hidden(mixer, after - routed[changed]).float().norm(dim=-1)
    return out
