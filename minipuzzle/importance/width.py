"""Width importance from activations, every axis in one forward pass (Minitron, Minitron-SSM).

Each unit gets a per-row statistic of its activation over the sequence, aggregated over rows. The default is
Minitron's (and ModelOpt's): the mean of |activation| over the sequence, then L2 over rows ("abs_mean,l2"). A signed
mean would score a channel's DC offset rather than its magnitude: a zero-mean channel with std 5 would rank below a
constant 0.1 channel, so it is available only by its explicit name, "signed_mean". The activations read, by
forward hooks on the block's submodules:

- FFN channel: the input of down_proj, i.e. relu(up_proj x)^2 (non-negative, so abs_mean == signed_mean here).
- Mamba heads and head channels: the x block of in_proj's output (`anatomy.mamba_in_proj_slices`; before the
  conv, whose bias would make a dead channel look alive). Channel scores c[head, p] give `mamba_heads` scores by
  L2 over p and `mamba_head_dim` scores by L2 over heads, which is what group-aware pruning keeps (whole heads
  within a group; the same channels in every head).
- Attention query head: the size of what the head writes into the residual stream, |W_o[:, head] a_head| per
  token, computed through the head's Gram matrix W_o,h^T W_o,h so the [heads x hidden] outputs never exist. The
  per-token norm is already non-negative, so every sequence statistic sees the head's output magnitude.
- Hidden channel: every RMSNorm output (each block's pre-norm and norm_f), aggregated per norm, summed over norms.
- Mixture-of-experts layers (`importance/experts.py`): routed experts by per-token contributions under an
  estimator (`removal` by default, `router_load`, `output_norm`), expert channels by the routed relu^2 hidden
  units summed over each token's experts, shared-expert channels by the input of its down_proj (like FFN).

A unit whose weights in and out are zero produces exact zeros in the activation read, so it scores exactly 0.
"""

from __future__ import annotations

import contextlib
from collections.abc import Collection

import torch
from torch import nn

from minipuzzle.anatomy import ATTENTION, LAYER_AXES, MAMBA, MLP, MOE, WIDTH_AXES, mamba_in_proj_slices
from minipuzzle.arch import Layout
from minipuzzle.errors import UserError
from minipuzzle.importance.experts import (
    DEFAULT_EXPERT_ESTIMATOR,
    check_estimator,
    expert_channels,
    expert_contributions,
    per_expert_channel_rows,
)
from minipuzzle.importance.layerwise import LayerStack, iter_layerwise, rows_per_chunk
from minipuzzle.progress import progress_bar

SEQ_AGGS = {
    "abs_mean": "mean of |activation| over the tokens of a row (Minitron, default)",
    "signed_mean": "signed mean over the tokens (scores a channel's offset, not its size)",
    "l2": "root mean square over the tokens",
    "max": "largest |activation| over the tokens",
}
ROW_AGGS = {
    "l2": "L2 norm over rows of the per-row statistic (Minitron, default)",
    "mean": "mean over rows",
    "max": "largest |value| over rows",
}
DEFAULT_AGG = "abs_mean,l2"


def describe_aggs() -> str:
    """One line per statistic, as --help paragraphs."""
    lines = [f"SEQ {k}: {v}" for k, v in SEQ_AGGS.items()] + [f"ROWS {k}: {v}" for k, v in ROW_AGGS.items()]
    return "\n\n".join(lines)  # typer keeps a line break only between paragraphs


def parse_agg(text: str) -> tuple[str, str]:
    """'abs_mean,l2' -> ('abs_mean', 'l2'): the statistic over the sequence, then over rows."""
    parts = [p.strip() for p in str(text).split(",")]
    if parts[0] == "mean":
        # The old default spelled the signed mean 'mean'; Minitron's 'mean' is of |activation|. Say which is which.
        raise UserError(
            f"invalid width aggregation {text!r}: 'mean' over the sequence is ambiguous; use abs_mean (mean of "
            f"|activation|, Minitron, the default {DEFAULT_AGG}) or signed_mean"
        )
    if len(parts) != 2 or parts[0] not in SEQ_AGGS or parts[1] not in ROW_AGGS:
        raise UserError(
            f"invalid width aggregation {text!r}: use SEQ,ROWS with SEQ in {'/'.join(SEQ_AGGS)} "
            f"and ROWS in {'/'.join(ROW_AGGS)} (Minitron's: {DEFAULT_AGG})"
        )
    return parts[0], parts[1]


class Aggregate:
    """Running aggregate of per-row statistics of a [B, T, C] activation, per channel C (float64)."""

    def __init__(self, seq: str, rows: str):
        self.seq, self.rows = seq, rows
        self.total: torch.Tensor | None = None
        self.count = 0

    def add(self, act: torch.Tensor) -> None:
        a = act.float()
        if self.seq == "signed_mean":
            s = a.mean(1)
        elif self.seq == "abs_mean":
            s = a.abs().mean(1)
        elif self.seq == "l2":
            s = a.pow(2).mean(1).sqrt()
        else:
            s = a.abs().amax(1)
        self.add_rows(s)

    def add_rows(self, s: torch.Tensor) -> None:
        """Add rows [B, C] whose statistic over the sequence is already taken (`add` takes it from [B, T, C])."""
        s = s.double()
        if self.rows == "l2":
            part = s.pow(2).sum(0)
        elif self.rows == "mean":
            part = s.sum(0)
        else:
            part = s.abs().amax(0)
        part = part.cpu()
        if self.total is None:
            self.total = part
        elif self.rows == "max":
            self.total = torch.maximum(self.total, part)
        else:
            self.total += part
        self.count += s.shape[0]

    def result(self) -> torch.Tensor:
        if self.total is None:
            raise RuntimeError("no activations were recorded")
        if self.rows == "l2":
            return self.total.sqrt()
        if self.rows == "mean":
            return self.total / max(self.count, 1)
        return self.total


class WidthCollector:
    """Forward hooks that feed `Aggregate`s; `hooks(i, block)` is an `on_block` for `iter_layerwise`.

    Aggregates are keyed (axis, source layer), except the Mamba x block, which both Mamba axes read ("mamba_x").
    `expert_estimator` names how routed experts are scored (`importance.experts.EXPERT_ESTIMATORS`).
    """

    def __init__(
        self, layout: Layout, axes: Collection[str], seq: str = "abs_mean", rows: str = "l2",
        expert_estimator: str = DEFAULT_EXPERT_ESTIMATOR,
    ):  # fmt: skip
        self.layout, self.axes = layout, set(axes)
        self.seq, self.rows = seq, rows
        self.expert_estimator = check_estimator(expert_estimator)
        self.acc: dict[tuple[str, int], Aggregate] = {}

    def _agg(self, key: tuple[str, int]) -> Aggregate:
        if key not in self.acc:
            self.acc[key] = Aggregate(self.seq, self.rows)
        return self.acc[key]

    @contextlib.contextmanager
    def hooks(self, i: int, block: nn.Module):
        handles = []
        mixer, kind = block.mixer, self.layout.pattern[i]
        if "hidden" in self.axes:
            handles.append(block.norm.register_forward_hook(lambda m, a, out: self._agg(("hidden", i)).add(out)))
        if kind == MLP and "ffn" in self.axes:
            handles.append(mixer.down_proj.register_forward_pre_hook(lambda m, a: self._agg(("ffn", i)).add(a[0])))
        if kind == MAMBA and self.axes & {"mamba_heads", "mamba_head_dim"}:
            x = mamba_in_proj_slices(self.layout)["x"]
            handles.append(
                mixer.in_proj.register_forward_hook(lambda m, a, out: self._agg(("mamba_x", i)).add(out[..., x]))
            )
        if kind == ATTENTION and "attn_heads" in self.axes:
            handles.append(mixer.o_proj.register_forward_pre_hook(self._attention_hook(i, mixer)))
        if kind == MOE:
            handles += self._moe_hooks(i, mixer)
        try:
            yield
        finally:
            for hd in handles:
                hd.remove()

    def _attention_hook(self, i: int, mixer: nn.Module):
        """A pre-hook on o_proj recording |W_o,h a_h| per token and query head h."""
        heads, d = self.layout.num_attention_heads, self.layout.head_dim
        w = mixer.o_proj.weight.float().view(-1, heads, d)
        gram = torch.einsum("ohd,ohe->hde", w, w)  # [heads, d, d]: |W_o,h a|^2 = a^T G_h a

        def record(m, a):
            x = a[0].float().unflatten(-1, (heads, d))
            sq = torch.einsum("bthd,hde,bthe->bth", x, gram, x)
            self._agg(("attn_heads", i)).add(sq.clamp_min(0).sqrt())

        return record

    def _moe_hooks(self, i: int, mixer: nn.Module) -> list:
        """Hooks on an MoE mixer: the shared expert's down_proj input; the router's logits and the routed experts'
        input, choice and output, which feed `experts` and `expert_ffn`."""
        handles = []
        if "shared_ffn" in self.axes:
            handles.append(
                mixer.shared_experts.down_proj.register_forward_pre_hook(
                    lambda m, a: self._agg(("shared_ffn", i)).add(a[0])
                )
            )
        if not self.axes & {"experts", "expert_ffn"}:
            return handles
        seen: dict[str, object] = {}

        def on_gate(m, args, out):  # the router sees [B, T, h]; the experts get its tokens flattened
            seen["shape"], seen["logits"] = args[0].shape[:-1], out[0]

        def on_experts(m, args, routed):
            x, idx, w = args
            if "experts" in self.axes:
                c = expert_contributions(mixer, self.expert_estimator, seen["logits"], x, idx, w, routed)
                self._agg(("experts", i)).add(c.view(*seen["shape"], -1))
            if "expert_ffn" in self.axes:
                self._agg(("expert_ffn", i)).add(expert_channels(mixer, x, idx, w).view(*seen["shape"], -1))
                rows = per_expert_channel_rows(mixer, x, idx, w, seen["shape"], self.seq)
                self._agg(("expert_channels", i)).add_rows(rows.flatten(1))

        handles.append(mixer.gate.register_forward_hook(on_gate))
        handles.append(mixer.experts.register_forward_hook(on_experts))
        return handles

    def add_final_norm(self, hn: torch.Tensor) -> None:
        if "hidden" in self.axes:
            self._agg(("hidden", -1)).add(hn)

    def results(self) -> dict[str, object]:
        """{'ffn': {i: [I]}, 'mamba_heads': {i: [H]}, 'mamba_head_dim': {i: [P]}, 'attn_heads': {i: [Hq]},
        'experts': {i: [E]}, 'expert_ffn': {i: [moe width]}, 'shared_ffn': {i: [shared width]}, 'hidden': [h],
        'expert_channels': {i: [E, moe width]} (each routed expert's own channels, with expert_ffn)} as float32."""
        out: dict[str, object] = {a: {} for a in (*LAYER_AXES, "expert_channels")}
        hidden = None
        for (name, i), agg in sorted(self.acc.items(), key=lambda kv: (kv[0][0], kv[0][1])):
            r = agg.result()
            if name == "hidden":
                hidden = r if hidden is None else hidden + r
            elif name == "mamba_x":
                c = r.view(self.layout.mamba_num_heads, self.layout.mamba_head_dim)
                if "mamba_heads" in self.axes:
                    out["mamba_heads"][i] = c.norm(dim=1).float()
                if "mamba_head_dim" in self.axes:
                    out["mamba_head_dim"][i] = c.norm(dim=0).float()
            elif name == "expert_channels":
                out[name][i] = r.view(self.layout.n_routed_experts, -1).float()
            else:
                out[name][i] = r.float()
        out["hidden"] = hidden.float() if hidden is not None else None
        return out


@torch.no_grad()
def width_scores(
    stack: LayerStack,
    windows: torch.Tensor,
    axes: Collection[str] = WIDTH_AXES,
    agg: str = DEFAULT_AGG,
    *,
    expert_estimator: str = DEFAULT_EXPERT_ESTIMATOR,
    batch_size: int = 8,
    chunk_rows: int | None = None,
    budget_bytes: int | None = None,
    progress: bool = False,
) -> dict[str, object]:
    """Width scores of every axis in `axes` from one pass over `windows` [N, T]; see `WidthCollector.results`."""
    seq, rows = parse_agg(agg)
    collector = WidthCollector(Layout.from_config(stack.config), axes, seq, rows, expert_estimator)
    n, t = windows.shape
    r = chunk_rows or rows_per_chunk(n, t, stack.hidden_size, 2, stack.dtype, budget_bytes, stack.device)
    chunks = -(-n // r)
    with progress_bar("width", chunks * stack.num_layers, progress) as advance:
        for _, hn in iter_layerwise(
            stack, windows, batch_size=batch_size, chunk_rows=r, on_block=collector.hooks, progress=advance
        ):
            for s in range(0, hn.shape[0], batch_size):
                collector.add_final_norm(hn[s : s + batch_size])
    return collector.results()
