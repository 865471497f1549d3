"""The score stage's memory: one part per scoring pass (depth, width), streamed or whole, its batch and rows."""

from __future__ import annotations

from minipuzzle.anatomy import ATTENTION, MAMBA, MLP
from minipuzzle.arch import Layout
from minipuzzle.checkpoint.dtypes import dtype_bytes
from minipuzzle.hardware import Hardware
from minipuzzle.memory.fitting import _fit_rows, _part, _problem, default_dtype
from minipuzzle.memory.parts import Geometry, Part, StageMemory
from minipuzzle.memory.terms import _layerwise, _read_host
from minipuzzle.metrics import EVAL_LOGIT_BUFFERS
from minipuzzle.score.depth import DEPTH_LOGITS_SLICE


def _score_passes(layout: Layout, axes, metric: str, depth_samples: int, width_samples: int, b: int):
    """(name, rows, residual states per row, hook bytes per token by kind, bytes per token after the walk,
    logits bytes) of each scoring pass.

    Depth (`score.depth`): the full state plus one per dropped layer (L + 1; block_influence keeps one).
    mse_hidden compares final norms: the full model's (b h), a float32 difference (4 h), its float64 copy and
    square (16 h); block_influence compares each block's input and output in float32; the logit metrics keep the
    final norms of every dropped state of a batch (L x h) and 2**26-value logits slices (`EVAL_LOGIT_BUFFERS`).
    Width (`score.width`): the state and its final norm (2); each hook copies the tensor it reads to float32
    and takes its absolute value (two float32 copies): the norm output (hidden), down_proj's input (ffn), the x
    block of in_proj's output (Mamba axes), o_proj's input (attention heads).
    """
    h, n = layout.hidden_size, layout.num_layers
    out = []
    if "depth" in axes:
        after = {"mse_hidden": (b + 20) * h, "block_influence": (b + 8) * h}.get(metric, n * h * b)
        logits = 0 if metric in ("mse_hidden", "block_influence") else EVAL_LOGIT_BUFFERS * DEPTH_LOGITS_SLICE * 4
        out.append(("depth pass", depth_samples, 1 if metric == "block_influence" else n + 1, {}, after, logits))
    width = [a for a in axes if a != "depth"]
    if width:
        hidden = 8 * h if "hidden" in width else 0
        read = {MLP: ("ffn", layout.intermediate_size), MAMBA: ("mamba_heads", layout.mamba_intermediate),
                ATTENTION: ("attn_heads", layout.num_attention_heads * layout.head_dim)}  # fmt: skip
        if "mamba_head_dim" in width:  # reads the same x block as mamba_heads
            width.append("mamba_heads")
        hooks = {kind: hidden + (8 * c if axis in width else 0) for kind, (axis, c) in read.items()}
        out.append(("width pass", width_samples, 2, hooks, hidden, 0))
    return out


def score_memory(layout: Layout, hw: Hardware, *, seq_len: int, depth_samples: int, width_samples: int,
                 batch_size: int = 8, depth_metric: str = "mse_hidden", axes=("depth", "ffn"),
                 stream: bool | None = None, dtype: str | None = None, stored_bytes: int = 2,
                 stage: str = "score") -> list[Part]:  # fmt: skip
    """Importance scoring on one device (`score_to_folder` runs one process): streamed from the shards when the
    whole model and one window's residual states would not fit (`stream` forces either), the largest forward batch
    <= `batch_size` that fits, and as many rows per chunk as the rest of the memory holds. One part per pass; the
    scoring code runs what `score_launch` reads from them."""
    dt = default_dtype(hw, dtype)
    b = dtype_bytes(dt)
    windows = max(depth_samples if "depth" in axes else 0, width_samples) * seq_len * 8

    def maker(streamed: bool, pas):
        _, _, states, hooks, after, logits = pas
        host = _read_host(layout, stored_bytes, streamed, compute=b, hw=hw) + windows
        return lambda micro, rows: _layerwise(layout, hw, b=b, streamed=streamed, rows=rows, micro=micro,
                                              seq_len=seq_len, states=states, hooks=hooks, after=after, logits=logits,
                                              host=host)  # fmt: skip

    passes = _score_passes(layout, axes, depth_metric, depth_samples, width_samples, b)
    whole_fits = all(_problem(maker(False, pas)(1, 1), hw) is None for pas in passes)
    streamed = stream if stream is not None else not whole_fits
    parts = []
    for pas in passes:
        mem, micro, rows = _fit_rows(maker(streamed, pas), hw, batch_size, pas[1])
        geo = Geometry(dtype=dt, streaming=streamed, micro_batch=micro, rows_per_chunk=rows)
        parts.append(_part(stage, pas[0], geo, mem, hw))
    return parts


def score_launch(layout: Layout, parts: list[Part], *, seq_len: int, depth_metric: str = "mse_hidden") -> dict:
    """What scoring takes from its plan's passes: {"stream", "batch_size", "budget_bytes", "dtype"}. The budget is
    the residual-stream bytes of each pass's planned rows (`layerwise.rows_per_chunk` divides it by a row's
    states again), the smallest over the passes, so no pass holds more rows than planned."""
    dt = parts[0].geometry.dtype
    states = {name: n for name, _, n, *_ in _score_passes(layout, ("depth", "ffn"), depth_metric, 1, 1, 2)}
    row = seq_len * layout.hidden_size * dtype_bytes(dt)
    budget = min(p.geometry.rows_per_chunk * states[p.name] * row for p in parts)
    return {"stream": parts[0].geometry.streaming, "batch_size": min(p.geometry.micro_batch for p in parts),
            "budget_bytes": budget, "dtype": dt}  # fmt: skip


def score_stage(
    layout: Layout, hw: Hardware, st, *, axes, dtype: str | None = None, stored_bytes: int = 2
) -> StageMemory:
    """The score stage for `st` (a `settings.ScoreSettings`) over `axes`."""
    return StageMemory(stage="score", parts=score_memory(
        layout, hw, seq_len=st.seq_len, depth_samples=st.depth_samples, width_samples=st.width_samples,
        batch_size=st.batch_size, depth_metric=st.depth_metric, axes=tuple(axes), stream=st.stream, dtype=dtype,
        stored_bytes=stored_bytes))  # fmt: skip
