"""The eval stage's memory: held-out statistics, lm-eval tasks and speed, both models resident or one at a time,
spread over a node's GPUs, or read from disk block by block when nothing holds a model."""

from __future__ import annotations

from pydantic import BaseModel

from minipuzzle.arch import Layout
from minipuzzle.checkpoint.dtypes import dtype_bytes, short_name
from minipuzzle.hardware import Hardware
from minipuzzle.memory.fitting import _fit_micro, _part, _problem, default_dtype, host_baseline, process_baseline
from minipuzzle.memory.parts import Geometry, Memory, Part, StageMemory
from minipuzzle.memory.terms import _max_kind, _read_host, forward_bytes_per_token, largest_block
from minipuzzle.metrics import EVAL_LOGIT_BUFFERS, LOGIT_CHUNK


class EvalShape(BaseModel):
    """The eval settings a plan needs (`settings.EvalSettings` plus whether there are lm-eval tasks)."""

    seq_len: int
    held_out_windows: int
    batch_size: int
    held_out: bool = True
    tasks: bool = False
    speed: bool = True
    speed_batch: int = 1
    speed_len: int | None = None
    decode_tokens: int = 32


# Why an offloaded eval refuses its speed part: timing a model that reads its blocks from disk times the disk.
OFFLOAD_SPEED = ("speed cannot be measured on a model whose blocks are read from disk every forward (it does not "
                 "fit the device): turn speed off (--no-speed, or eval.speed: false in a recipe) or give eval more "
                 "memory")  # fmt: skip


def eval_weight_share(layout: Layout, k: int, dtype: str, offload: bool = False) -> int:
    """Bytes of `layout`'s weights one of `k` devices holds under a device map: its share, plus one block (a device
    map places whole blocks, so a device may hold one more than its share); the whole model when k = 1.
    Offloaded (`evaluate.placement.load_offloaded`), the largest unit read at once: a block, or the embeddings or
    LM head [V, h]."""
    b = dtype_bytes(dtype)
    if offload:
        return max(largest_block(layout), layout.vocab_size * layout.hidden_size) * b
    return layout.num_params() * b if k == 1 else -(-layout.num_params() * b // k) + largest_block(layout) * b


def _eval_parts(models: list[Layout], hw: Hardware, ev: EvalShape, dt: str, k: int, sequential: bool,
                host: int, offload: bool = False) -> list[tuple[str, Memory, int]]:  # fmt: skip
    """(name, memory, batch) of each eval part over `k` devices: both models resident (each spread by
    `eval_weight_share`) or, `sequential`, one at a time (the teacher's final states [N, T, h] kept on the host and
    its LM head [V, h] next to the student for the KL); `offload`: one unit of a model read from disk at a time
    (the speed part is left to the caller). The largest batch <= eval.batch_size that fits. Held-out statistics
    come from final hidden states, logits `LOGIT_CHUNK` positions at a time (`metrics.TokenStats.add_states`).
    lm-eval (HFLM) builds [batch, T, V] logits and their float32 log-softmax;
    requests are counted at eval.seq_len tokens, an upper bound (most tasks are far shorter)."""
    b, kernels = dtype_bytes(dt), hw.fused_mamba
    shares = [eval_weight_share(m, k, dt, offload) for m in models]
    v, h, t = models[0].vocab_size, models[0].hidden_size, ev.seq_len
    weights = max(shares) if sequential else sum(shares)
    fwd = max(_max_kind(m, forward_bytes_per_token, b, kernels) for m in models)
    kl_host = ev.held_out_windows * t * h * b if sequential and len(models) > 1 else 0
    base = {"baseline": process_baseline(hw), "host_baseline": host_baseline(hw)}  # one process, on every GPU it uses

    def held_out(micro: int) -> Memory:  # the student's states and the teacher's (computed or read back)
        n = min(LOGIT_CHUNK, micro * t)
        return Memory(weights=weights + (v * h * b if kl_host else 0), host_buffers=host + kl_host,
                      activations=micro * t * (len(models) * h * b + fwd), logits=n * v * (EVAL_LOGIT_BUFFERS * 4 + b),
                      **base)  # fmt: skip

    def tasks(micro: int) -> Memory:
        return Memory(weights=weights, activations=micro * t * fwd, logits=micro * t * v * (b + 8), host_buffers=host,
                      **base)  # fmt: skip

    out = [("held-out", *_fit_micro(held_out, hw, min(ev.batch_size, ev.held_out_windows)))] if ev.held_out else []
    if ev.tasks:
        out.append(("tasks", *_fit_micro(tasks, hw, ev.batch_size)))
    if ev.speed and not offload:
        sl, sb = ev.speed_len or t, ev.speed_batch
        mems = [m.memory(short_name(dt), sl + ev.decode_tokens, sb) for m in models]
        cache = max(m["kv_cache"] + m["ssm_state"] + m["conv_state"] for m in mems)
        out.append(("speed", Memory(weights=weights, activations=sb * sl * fwd + cache, host_buffers=host, **base,
                                    logits=sb * sl * v * (b + 4)), sb))  # fmt: skip
    return out


def eval_memory(model: Layout, teacher: Layout | None, hw: Hardware, ev: EvalShape, *, dtype: str | None = None,
                stored_bytes: int = 2) -> StageMemory:  # fmt: skip
    """Evaluation of `model` against `teacher` (`evaluate.runner.evaluate` runs this plan): both resident and
    spread over as few of one node's GPUs as hold every part (accelerate's device map), else one model at a time
    over as few as hold it (`Geometry.sequential`); the largest batch that fits, held-out logits in chunks. When
    nothing holds a whole model, one model at a time on one device with its blocks read from the checkpoint every
    forward (`Geometry.streaming`), whose speed part is refused (`OFFLOAD_SPEED`)."""
    dt = default_dtype(hw, dtype)
    models = [model] + ([teacher] if teacher is not None else [])
    host = _read_host(model, stored_bytes, False, compute=dtype_bytes(dt), hw=hw) + ev.held_out_windows * ev.seq_len * 8
    most = hw.gpus_per_node if hw.device == "cuda" else 1
    options = [(k, seq) for seq in ((False, True) if teacher is not None else (False,)) for k in range(1, most + 1)]
    offload = False
    for k, sequential in options:
        parts = _eval_parts(models, hw, ev, dt, k, sequential, host)
        if all(_problem(mem, hw) is None for _, mem, _ in parts):
            break
    else:
        k, sequential, offload = 1, teacher is not None, True
        parts = _eval_parts(models, hw, ev, dt, 1, sequential, host, offload=True)
    note = "blocks are read from the checkpoint on disk every forward: nothing else fits" if offload else None
    out = []
    for name, mem, micro in parts:
        geo = Geometry(devices=k, sharding="device_map" if k > 1 else "none", dtype=dt, micro_batch=micro,
                       sequential=sequential, streaming=offload,
                       logits_chunk=min(LOGIT_CHUNK, ev.seq_len) if name == "held-out" else None)  # fmt: skip
        out.append(_part("eval", name, geo, mem, hw, note=note))
    if offload and ev.speed:
        geo = Geometry(dtype=dt, micro_batch=ev.speed_batch, sequential=sequential, streaming=True)
        out.append(Part(stage="eval", name="speed", geometry=geo, memory=Memory(), device_total=0, fits=False,
                        problem=OFFLOAD_SPEED, note=note))  # fmt: skip
    return StageMemory(stage="eval", parts=out)


def eval_stage(model: Layout, teacher: Layout | None, hw: Hardware, es, *, held_out: bool = True,
               dtype: str | None = None, stored_bytes: int = 2) -> StageMemory:  # fmt: skip
    """The eval stage for `es` (a `settings.EvalSettings`); `held_out`: there is held-out text."""
    ev = EvalShape(seq_len=es.seq_len, held_out_windows=es.held_out_windows, batch_size=es.batch_size,
                   held_out=held_out, tasks=bool(es.tasks), speed=es.speed, speed_batch=es.speed_batch,
                   speed_len=es.speed_len, decode_tokens=es.decode_tokens)  # fmt: skip
    return eval_memory(model, teacher, hw, ev, dtype=dtype, stored_bytes=stored_bytes)
