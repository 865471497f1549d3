"""The prune stage's memory: its own scoring when it has no scores, candidate ranking, candidate distillation,
the cut."""

from __future__ import annotations

from minipuzzle.arch import Layout
from minipuzzle.checkpoint.dtypes import dtype_bytes
from minipuzzle.checkpoint.write import SHARD_BYTES
from minipuzzle.hardware import Hardware
from minipuzzle.memory.fitting import (
    TOOL_BYTES,
    _fit_micro,
    _fit_rows,
    _part,
    _problem,
    compute_hardware,
    default_dtype,
    for_device,
    host_device,
    usable,
)
from minipuzzle.memory.parts import Geometry, Memory, Part, StageMemory
from minipuzzle.memory.score import score_memory
from minipuzzle.memory.terms import _layerwise, _read_host, largest_tensor
from minipuzzle.memory.train import candidate_distill_memory
from minipuzzle.metrics import EVAL_LOGIT_BUFFERS, LOGIT_CHUNK
from minipuzzle.units import gib

# Host bytes a streamed ranking keeps of the parent's final states per group of windows: the plan's choice, which
# `search.pipeline` passes to `ranking.measure_streamed` as the group it planned (`Geometry.host_group`).
RANK_HOST_BYTES = 8 * 2**30
# Of the memory a cut may use, the share its output shard takes (the rest: the tensor read and its cut copy).
CUT_SHARD_SHARE = 0.25


def ranking_memory(layout: Layout, hw: Hardware, *, seq_len: int, held_out_windows: int, batch_size: int = 8,
                   dtype: str | None = None, stored_bytes: int = 2, stream: bool | None = None) -> Part:  # fmt: skip
    """Candidate ranking (`search.pipeline.rank`) on one device in the compute dtype, logits `LOGIT_CHUNK` tokens
    at a time. In memory (`ranking.measure_in_memory`: the parent whole plus each cut candidate, the parent's final
    states of every window on the host) when that fits, else streamed layer by layer (`ranking.measure_streamed`:
    each candidate cuts its own embeddings and head, so two sets are resident; the parent's final states
    [group, T, h] kept on the host for groups of windows within `RANK_HOST_BYTES`, fewer when that does not fit);
    `stream` forces either. The
    largest forward batch <= `batch_size` that fits, and as many rows per chunk as the rest holds."""
    dt = default_dtype(hw, dtype)
    b = dtype_bytes(dt)
    t, v, h, windows = seq_len, layout.vocab_size, layout.hidden_size, held_out_windows * seq_len * 8

    def make_for(streamed: bool, group: int):
        host = group * t * h * b + _read_host(layout, stored_bytes, streamed) + windows
        return lambda micro, rows: _layerwise(
            layout, hw, b=b, streamed=streamed, rows=rows, micro=micro, seq_len=t, states=2, copies=2, host=host,
            logits=min(LOGIT_CHUNK, micro * t) * v * (EVAL_LOGIT_BUFFERS * 4 + b))  # fmt: skip

    in_memory = make_for(False, held_out_windows)
    streamed = stream if stream is not None else _problem(in_memory(1, 1), hw) is not None
    if not streamed:
        mem, micro = _fit_micro(lambda m: in_memory(m, m), hw, min(batch_size, held_out_windows))
        geo = Geometry(dtype=dt, micro_batch=micro, logits_chunk=min(LOGIT_CHUNK, t))
        return _part("prune", "ranking", geo, mem, hw)
    group = max(1, min(held_out_windows, RANK_HOST_BYTES // (t * h * b)))
    while True:  # on the CPU the host's share competes with the rows: halve the group until both fit
        mem, micro, rows = _fit_rows(make_for(True, group), hw, batch_size, group)
        if group == 1 or _problem(mem, hw) is None:
            break
        group //= 2
    geo = Geometry(dtype=dt, streaming=True, micro_batch=micro, rows_per_chunk=rows, host_group=group,
                   logits_chunk=min(LOGIT_CHUNK, t))  # fmt: skip
    return _part("prune", "ranking", geo, mem, hw)


def _cut_room(hw: Hardware) -> int | None:
    """Bytes a cut may use beside its interpreter: it runs on the host (the device itself on a CPU-only machine);
    None when unknown."""
    host = host_device(hw)
    return max(0, usable(host) - TOOL_BYTES) if host is not None else None


def cut_shard_bytes(layout: Layout, hw: Hardware, stored_bytes: int = 2) -> int:
    """The output shard size a cut on `hw` writes: `CUT_SHARD_SHARE` of the memory it may use, at least the largest
    tensor (a shard holds whole tensors), at most `SHARD_BYTES` and the model."""
    room = _cut_room(hw)
    share = SHARD_BYTES if room is None else int(CUT_SHARD_SHARE * room)
    # No shard is larger than the whole model (a cut of a small model buffers all of it, not a 5 GB shard).
    return min(SHARD_BYTES, layout.num_params() * stored_bytes, max(largest_tensor(layout) * stored_bytes, share))


def cut_memory(layout: Layout, hw: Hardware, *, stored_bytes: int = 2, copies: bool = True) -> Part:
    """Cutting `layout` to the chosen layout (`cut.cut_checkpoint`) on the host: the output shard being filled
    (`cut_shard_bytes`), plus, when the cut narrows widths (`copies`, `cut.Plan.copies_tensors`), the tensor read
    and its cut copy (at most the largest tensor each). A tensor read is a view of its file's mapping, resident
    only while it is used: a cut that only drops layers buffers such views, whose pages are read when their shard
    is written, so it holds one shard (measured: benchmarks/scale_rehearsal.py)."""
    shard = cut_shard_bytes(layout, hw, stored_bytes)
    host = shard + (2 * largest_tensor(layout) * stored_bytes if copies else 0)
    geo = Geometry(devices=0 if hw.device == "cuda" else 1, dtype=_stored_name(stored_bytes), streaming=True,
                   shard_bytes=shard)  # fmt: skip
    # The cut runs on the host and builds no model: its interpreter is the CPU's device baseline, a host one on GPUs.
    mem = Memory(host_buffers=host, baseline=TOOL_BYTES if hw.device == "cpu" else 0,
                 host_baseline=0 if hw.device == "cpu" else TOOL_BYTES)  # fmt: skip
    return _part("prune", "cut", geo, mem, hw, note=f"output shards of {gib(shard)}")


def _stored_name(stored_bytes: int) -> str:
    return "float32" if stored_bytes == 4 else "bfloat16"


def prune_stage(layout: Layout, hw: Hardware, ps, *, student: Layout | None = None, dtype: str | None = None,
                stored_bytes: int = 2, scoring: bool = False) -> StageMemory:  # fmt: skip
    """The prune stage for `ps` (a `settings.PruneSettings`): its own scoring when it has no scores folder
    (`scoring`), candidate ranking, candidate distillation when it has steps, the cut. Scoring and ranking
    compute on `ps.device` (`compute_hardware`: the host when told cpu on a GPU machine) in `dtype` (default
    `ps.dtype`; auto: bf16 on GPUs, float32 on the CPU), as `search.pipeline.prune` runs them from this plan.
    `student` bounds the candidates (default: the source itself); when it is the pruned layout, the cut is
    planned for it (a layout with every width of the source's cuts without copying tensors)."""

    chw = compute_hardware(hw, ps.device)
    kw = {"dtype": dtype or ps.dtype, "stored_bytes": stored_bytes, "stream": ps.stream}
    parts = []
    if scoring:
        parts += score_memory(layout, chw, seq_len=ps.seq_len, depth_samples=ps.depth_samples,
                              width_samples=ps.width_samples, batch_size=ps.batch_size, axes=tuple(ps.axes),
                              stage="prune", **kw)  # fmt: skip
    parts.append(ranking_memory(layout, chw, seq_len=ps.seq_len, held_out_windows=ps.held_out_windows,
                                batch_size=ps.batch_size, **kw))  # fmt: skip
    if ps.candidate_distill_steps:
        train_hw = for_device(hw, ps.device)
        if train_hw is not None:
            parts.append(candidate_distill_memory(layout, student or layout, train_hw, ps, dtype=kw["dtype"],
                                                  stored_bytes=stored_bytes))  # fmt: skip
    copies = student is None or student.replace(pattern=layout.pattern) != layout
    parts.append(cut_memory(layout, hw, stored_bytes=stored_bytes, copies=copies))
    return StageMemory(stage="prune", parts=parts)
