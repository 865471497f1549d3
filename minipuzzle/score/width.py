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
- Mixture-of-experts layers (`score/experts.py`): routed experts by per-token contributions under an
  estimator (`removal` by default, `router_load`, `output_norm`), expert channels by the routed relu^2 hidden
  units summed over each token's experts, shared-expert channels by the input of its down_proj (like FFN).

A unit whose weights in and out are zero produces exact zeros in the activation read, so it scores exactly 0.
"""

from __future__ import annotations

import contextlib
from collections.abc import Collection

import torch
from torch import nn

from minipuzzle.anatomy import AXES, LAYER_AXES, PER_EXPERT_CHANNELS, WIDTH_AXES, mamba_in_proj_slices
from minipuzzle.arch import Layout
from minipuzzle.errors import UserError
from minipuzzle.progress import progress_bar
from minipuzzle.score.experts import (
    DEFAULT_EXPERT_ESTIMATOR,
    check_estimator,
    expert_channels,
    expert_contributions,
    per_expert_channel_rows,
)
from minipuzzle.score.layerwise import LayerStack, iter_layerwise, rows_per_chunk

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

    Hooks come from `SCORERS` (one installer per axis); aggregates are keyed (axis, source layer), except the
    Mamba x block, which both Mamba axes read ("mamba_x"). `expert_estimator` names how routed experts are scored
    (`score.experts.EXPERT_ESTIMATORS`).
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
        """Install the scoring hooks of every requested axis that shapes layer i (each installer once: both
        Mamba axes read one activation, experts and expert_ffn one routed pass)."""
        kind = self.layout.pattern[i]
        wanted = (name for name in WIDTH_AXES if name in self.axes and AXES[name].kind in (None, kind))
        handles = [h for install in dict.fromkeys(SCORERS[name] for name in wanted) for h in install(self, i, block)]
        try:
            yield
        finally:
            for hd in handles:
                hd.remove()

    def add_final_norm(self, hn: torch.Tensor) -> None:
        if "hidden" in self.axes:
            self._agg(("hidden", -1)).add(hn)

    def results(self) -> dict[str, object]:
        """{'ffn': {i: [I]}, 'mamba_heads': {i: [H]}, 'mamba_head_dim': {i: [P]}, 'attn_heads': {i: [Hq]},
        'experts': {i: [E]}, 'expert_ffn': {i: [moe width]}, 'shared_ffn': {i: [shared width]}, 'hidden': [h],
        'expert_channels': {i: [E, moe width]} (each routed expert's own channels, with expert_ffn)} as float32:
        layer axes per source layer, axes of every layer (hidden) summed over the layers' aggregates."""
        out: dict[str, object] = {a: {} for a in (*LAYER_AXES, PER_EXPERT_CHANNELS)}
        whole: dict[str, torch.Tensor | None] = {a: None for a in WIDTH_AXES if AXES[a].kind is None}
        for (name, i), agg in sorted(self.acc.items(), key=lambda kv: (kv[0][0], kv[0][1])):
            r = agg.result()
            if name in whole:
                whole[name] = r if whole[name] is None else whole[name] + r
            elif name in _FINISH:
                _FINISH[name](self, i, r, out)
            else:
                out[name][i] = r.float()
        out |= {name: t.float() if t is not None else None for name, t in whole.items()}
        return out


# ---- scoring hooks, one installer per axis: (collector, source layer i, block) -> hook handles ------------------
# Each records `Aggregate`s keyed (axis, i), or under a key of its own that `_FINISH` turns into axis scores.


def _hidden_hooks(c: WidthCollector, i: int, block: nn.Module) -> list:
    """Every block's pre-norm output (norm_f's comes through `add_final_norm`), summed over norms in `results`."""
    return [block.norm.register_forward_hook(lambda m, a, out: c._agg(("hidden", i)).add(out))]


def _ffn_hooks(c: WidthCollector, i: int, block: nn.Module) -> list:
    """The input of down_proj, relu(up_proj x)^2."""
    return [block.mixer.down_proj.register_forward_pre_hook(lambda m, a: c._agg(("ffn", i)).add(a[0]))]


def _mamba_hooks(c: WidthCollector, i: int, block: nn.Module) -> list:
    """The x block of in_proj's output [.., heads * head_dim], which both Mamba axes read (`_split_mamba`)."""
    x = mamba_in_proj_slices(c.layout)["x"]
    return [block.mixer.in_proj.register_forward_hook(lambda m, a, out: c._agg(("mamba_x", i)).add(out[..., x]))]


def _attention_hooks(c: WidthCollector, i: int, block: nn.Module) -> list:
    """A pre-hook on o_proj recording |W_o,h a_h| per token and query head h."""
    mixer = block.mixer
    heads, d = c.layout.num_attention_heads, c.layout.head_dim
    w = mixer.o_proj.weight.float().view(-1, heads, d)
    gram = torch.einsum("ohd,ohe->hde", w, w)  # [heads, d, d]: |W_o,h a|^2 = a^T G_h a

    def record(m, a):
        x = a[0].float().unflatten(-1, (heads, d))
        sq = torch.einsum("bthd,hde,bthe->bth", x, gram, x)
        c._agg(("attn_heads", i)).add(sq.clamp_min(0).sqrt())

    return [mixer.o_proj.register_forward_pre_hook(record)]


def _shared_ffn_hooks(c: WidthCollector, i: int, block: nn.Module) -> list:
    """The input of the shared expert's down_proj, like an MLP's."""
    down = block.mixer.shared_experts.down_proj
    return [down.register_forward_pre_hook(lambda m, a: c._agg(("shared_ffn", i)).add(a[0]))]


def _routed_hooks(c: WidthCollector, i: int, block: nn.Module) -> list:
    """The router's logits and the routed experts' input, choice and output, which feed `experts`, `expert_ffn`
    and the per-expert channel table."""
    mixer, seen = block.mixer, {}

    def on_gate(m, args, out):  # the router sees [B, T, h]; the experts get its tokens flattened
        seen["shape"], seen["logits"] = args[0].shape[:-1], out[0]

    def on_experts(m, args, routed):
        x, idx, w = args
        if "experts" in c.axes:
            contrib = expert_contributions(mixer, c.expert_estimator, seen["logits"], x, idx, w, routed)
            c._agg(("experts", i)).add(contrib.view(*seen["shape"], -1))
        if "expert_ffn" in c.axes:
            c._agg(("expert_ffn", i)).add(expert_channels(mixer, x, idx, w).view(*seen["shape"], -1))
            rows = per_expert_channel_rows(mixer, x, idx, w, seen["shape"], c.seq)
            c._agg((PER_EXPERT_CHANNELS, i)).add_rows(rows.flatten(1))

    return [mixer.gate.register_forward_hook(on_gate), mixer.experts.register_forward_hook(on_experts)]


# The scoring function of every width axis of `anatomy.AXES` (an installer shared by two axes runs once a layer).
SCORERS = {
    "ffn": _ffn_hooks,
    "mamba_heads": _mamba_hooks,
    "mamba_head_dim": _mamba_hooks,
    "attn_heads": _attention_hooks,
    "hidden": _hidden_hooks,
    "experts": _routed_hooks,
    "expert_ffn": _routed_hooks,
    "shared_ffn": _shared_ffn_hooks,
}


def _split_mamba(c: WidthCollector, i: int, r: torch.Tensor, out: dict) -> None:
    """Channel scores [heads, head_dim] -> `mamba_heads` by L2 over p, `mamba_head_dim` by L2 over heads."""
    per = r.view(c.layout.mamba_num_heads, c.layout.mamba_head_dim)
    if "mamba_heads" in c.axes:
        out["mamba_heads"][i] = per.norm(dim=1).float()
    if "mamba_head_dim" in c.axes:
        out["mamba_head_dim"][i] = per.norm(dim=0).float()


def _per_expert(c: WidthCollector, i: int, r: torch.Tensor, out: dict) -> None:
    out[PER_EXPERT_CHANNELS][i] = r.view(c.layout.n_routed_experts, -1).float()


# Aggregates that are not one axis's scores as they stand.
_FINISH = {"mamba_x": _split_mamba, PER_EXPERT_CHANNELS: _per_expert}


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
