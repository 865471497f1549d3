"""Rank candidate layouts for real: cut each one and measure it on held-out tokens against the parent.

MiniPuzzle ranked its candidates by next-token accuracy and agreement with the parent's greedy token. Here every
candidate gets KL(parent || candidate), accuracy, agreement and loss (the shared `metrics` definitions); the
ranking key is the KL (lowest first), ties broken by agreement. In memory the parent is a loaded model; streamed,
the parent and each candidate run one layer at a time from the shards, so peak memory is about one layer plus
the residual stream of the held-out windows.

A candidate is a `cut.Plan` (cut from the parent as it is measured) or the folder of a checkpoint of its own
(a distilled candidate), measured the same way.
"""

from __future__ import annotations

from pathlib import Path

import torch

from minipuzzle.artifacts import CandidateRow
from minipuzzle.checkpoint.build import load_model
from minipuzzle.checkpoint.dtypes import parse_dtype
from minipuzzle.cut import Cutter, cut_model
from minipuzzle.metrics import TokenStats, final_states
from minipuzzle.progress import progress_bar
from minipuzzle.prune.context import PruneContext
from minipuzzle.score.layerwise import StreamedStack, iter_layerwise
from minipuzzle.search.solver import Candidate


def rank_key(stats: dict) -> tuple:
    return (stats["kl_to_teacher"], -stats["agreement"], stats["loss"])


def rank(ctx: PruneContext, plans: list, held: torch.Tensor) -> list[dict]:
    """Measured statistics of each candidate (a plan, or a distilled candidate's folder) against the parent on the
    held-out windows held [H, T], as the stage plan's ranking part says: streamed or with the model loaded, in its
    dtype, its forward batch and row chunks, the parent's final states kept on the host for the planned groups of
    windows."""
    g, device = ctx.parts["ranking"].geometry, ctx.settings.device
    dtype = parse_dtype(g.dtype)
    with progress_bar("ranking candidates", len(plans), ctx.request.progress) as advance:
        if g.streaming:
            host_bytes = g.host_group * held.shape[1] * ctx.ckpt.layout.hidden_size * dtype.itemsize
            return measure_streamed(ctx.ckpt, plans, held, g.micro_batch, device, advance, host_bytes=host_bytes,
                                    dtype=dtype, chunk_rows=g.rows_per_chunk)  # fmt: skip
        model = load_model(ctx.ckpt, dtype=dtype, device=device)
        return measure_in_memory(model, plans, held, g.micro_batch, advance)


def ranked_rows(cands: list[Candidate], stats: list[dict]) -> list[CandidateRow]:
    """Candidates best measured first; `predicted_rank` is the search's order (1-based index into `cands`)."""
    order = sorted(range(len(cands)), key=lambda i: (rank_key(stats[i]), i))
    return [
        CandidateRow(**cands[i].to_dict(), predicted_rank=i + 1, measured_rank=r + 1, **stats[i])
        for r, i in enumerate(order)
    ]


@torch.no_grad()
def measure_in_memory(model, plans: list, windows: torch.Tensor, batch_size: int = 8, progress=None) -> list[dict]:
    """token_stats of each candidate (a plan's pruned model, or a checkpoint folder loaded like `model`) against
    `model` on `windows` [N, T].

    The parent runs once: its final hidden states [N, T, h] are kept (on the host) and turned into logits with its
    LM head `metrics.LOGIT_CHUNK` positions at a time, so k candidates cost k + 1 forward passes, not 2k, and no
    batch holds full-vocabulary logits for all its tokens.
    """
    device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
    batches = [windows[s : s + batch_size].to(device) for s in range(0, len(windows), batch_size)]
    parent_h = [model.model(ids, use_cache=False).last_hidden_state.cpu() for ids in batches]
    out = []
    for plan in plans:
        pruned = load_model(plan, dtype, device) if isinstance(plan, (str, Path)) else cut_model(model, plan)
        stats = TokenStats()
        for ids, h in zip(batches, parent_h):
            stats.add_states(final_states(pruned, ids), pruned.lm_head, ids, h.to(device), model.lm_head)
        out.append(stats.result())
        del pruned
        if progress:
            progress(1)
    return out


class PrunedStack(StreamedStack):
    """A checkpoint cut to `plan` on the fly: block j is the source's kept layer plan.layers[j], sliced by the
    cutting code as it is read, so no pruned checkpoint is written to rank a candidate."""

    def __init__(self, source: StreamedStack, plan):
        self.plan, self.cutter = plan, Cutter(source.ckpt.layout, plan)
        self.dst = self.cutter.dst
        cut = self.cutter.cut
        super().__init__(source.ckpt, self.dst, cut("model.embeddings.weight", source.embed_weight),
                         cut("model.norm_f.weight", source.norm_f_weight), cut("lm_head.weight", source.head_weight),
                         source.device, source.dtype, source.config._attn_implementation)  # fmt: skip

    def layer_tensors(self, j: int) -> dict[str, torch.Tensor]:
        i = self.plan.layers[j]
        pre = f"model.layers.{i}."
        return {k: self.cutter.cut(pre + k, t) for k, t in self.ckpt.layer_state(i).items()}


@torch.no_grad()
def measure_streamed(
    checkpoint,
    plans: list,
    windows: torch.Tensor,
    batch_size: int = 8,
    device="cpu",
    progress=None,
    host_bytes: int = 8 * 2**30,
    dtype: torch.dtype = torch.float32,
    chunk_rows: int | None = None,
) -> list[dict]:
    """Like `measure_in_memory`, one layer at a time from the checkpoints' shards, computing in `dtype`.

    The parent's final hidden states of a group of windows are kept in host memory (in `dtype`) while every
    candidate is run on the same group; groups are as large as `host_bytes` allows (all windows at once for small
    models; for 56B in bf16, 128 windows x 8192 tokens x 8192 wide would be 17 GB), at the price of one more read of
    the shards per group. Within a group, `chunk_rows` rows of residual stream are on the device at once
    (default: `layerwise.rows_per_chunk`'s share of the free memory).
    """
    parent = StreamedStack.open(checkpoint, device=device, dtype=dtype)
    _, T = windows.shape
    per_row = T * parent.ckpt.layout.hidden_size * parent.dtype.itemsize
    group = max(1, min(len(windows), host_bytes // per_row))
    stats = [TokenStats() for _ in plans]
    for g in range(0, len(windows), group):
        part = windows[g : g + group]
        teacher_h = torch.cat([hn.cpu() for _, hn in iter_layerwise(parent, part, batch_size=batch_size, chunk_rows=chunk_rows)])
        for plan, st in zip(plans, stats):
            stack = _stack(parent, plan)
            for rows, hn in iter_layerwise(stack, part, batch_size=batch_size, chunk_rows=chunk_rows):
                for s in range(0, hn.shape[0], batch_size):
                    ids = part[rows][s : s + batch_size].to(device)
                    t = teacher_h[rows.start + s : rows.start + s + len(ids)].to(device)
                    st.add_states(hn[s : s + batch_size], stack.logits, ids, t, parent.logits)
            del stack
            if progress and g + group >= len(windows):
                progress(1)
        del teacher_h
    return [st.result() for st in stats]


def _stack(parent: StreamedStack, candidate) -> StreamedStack:
    """A candidate's layers as a stream: cut from `parent` by its plan, or read from its own checkpoint folder."""
    if isinstance(candidate, (str, Path)):
        return StreamedStack.open(candidate, device=parent.device, dtype=parent.dtype)
    return PrunedStack(parent, candidate)
