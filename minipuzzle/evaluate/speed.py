"""Measured speed and memory of a model: prefill and decode tokens/s at a batch and prompt length, peak memory.

Prefill is a forward pass over [batch, prompt_len] random tokens. Decode is a greedy loop of one-token forward
passes on the model's cache (KV for attention, conv and SSM state for Mamba) after an untimed prefill, so only the
cached steps are timed. Each figure is the median of `repeats` runs after a warm-up, with the range over the runs.
Peak memory is `torch.cuda.max_memory_allocated` on a GPU; on CPU it is the process's resident set size sampled
every few milliseconds during the measurement (so it includes everything else the process holds).
"""

from __future__ import annotations

import inspect
import os
import resource
import statistics
import threading
import time
from contextlib import contextmanager

import torch

from minipuzzle.evaluate.placement import compute_devices, input_device


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@contextmanager
def _peak_memory(device: torch.device, devices: list[torch.device] | None = None):
    """Yields a dict that holds {"peak_bytes", "baseline_bytes", "kind"} once the block ends; on GPUs summed over
    `devices` (those a device-mapped model spans; default `device`)."""
    out: dict = {}
    if device.type == "cuda":
        gpus = [d for d in devices or [device] if d.type == "cuda"]
        for d in gpus:
            torch.cuda.synchronize(d)
            torch.cuda.reset_peak_memory_stats(d)
        out["baseline_bytes"] = sum(torch.cuda.memory_allocated(d) for d in gpus)
        yield out
        for d in gpus:
            torch.cuda.synchronize(d)
        out["peak_bytes"] = sum(torch.cuda.max_memory_allocated(d) for d in gpus)
        out["kind"] = "cuda_max_allocated" + (f" (sum over {len(gpus)} GPUs)" if len(gpus) > 1 else "")
        return
    base = _rss_bytes()
    peak = [base]
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], _rss_bytes())
            stop.wait(0.002)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    try:
        yield out
    finally:
        stop.set()
        t.join()
        peak[0] = max(peak[0], _rss_bytes())
        out.update(peak_bytes=peak[0], baseline_bytes=base, kind="process_rss_sampled")


def _sync(device: torch.device) -> None:
    # Every GPU: a device-mapped model's last layers and logits run on others than its input's.
    if device.type == "cuda":
        for i in range(torch.cuda.device_count()):
            torch.cuda.synchronize(i)


def _timed(fn, device: torch.device, repeats: int) -> list[float]:
    """Seconds of each of `repeats` timed calls of `fn`, after one untimed warm-up call."""
    fn()  # warm-up: kernel selection, allocator growth, lazy imports
    times = []
    for _ in range(repeats):
        _sync(device)
        t = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t)
    return times


def _cache_kwarg(model) -> str:
    """transformers renamed `past_key_values` to `cache` for NemotronH; use whichever this version takes."""

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _cache_of(out):
    return out["cache"] if "cache" in out else out.get("past_key_values")


@torch.no_grad()
def greedy_decode(model, ids: torch.Tensor, steps: int) -> tuple[torch.Tensor, float]:
    """Prefill `ids` [B, T] (untimed), then `steps` greedy one-token steps on the cache (timed).

    Returns (new tokens [B, steps], seconds spent in the steps).
    """
    device = ids.device
    key = _cache_kwarg(model)
    out = model(input_ids=ids, use_cache=True)
    cache = _cache_of(out)
    nxt = out.logits[:, -1:].argmax(-1)
    tokens = []
    _sync(device)
    t = time.perf_counter()
    for _ in range(steps):
        tokens.append(nxt)
        out = model(input_ids=nxt, use_cache=True, **{key: cache})
        cache = _cache_of(out)
        nxt = out.logits[:, -1:].argmax(-1)
    _sync(device)
    return torch.cat(tokens, 1) if tokens else ids[:, :0], time.perf_counter() - t


@torch.no_grad()
def measure_speed(
    model,
    batch: int = 1,
    prompt_len: int = 128,
    decode_tokens: int = 32,
    repeats: int = 3,
    seed: int = 0,
) -> dict:
    """Prefill and decode throughput of `model` on random token ids [batch, prompt_len].

    Returns prefill_tokens_per_s (batch * prompt_len / prefill time), decode_tokens_per_s (batch * decode_tokens
    / time of the decode steps), the times in seconds, peak_memory_bytes (see module doc), weights_bytes (bytes
    of the parameters as held) and the settings.
    """

    if min(batch, prompt_len, decode_tokens, repeats) < 1:
        raise ValueError("batch, prompt_len, decode_tokens and repeats must be at least 1")
    device = input_device(model)
    vocab = int(model.config.vocab_size)
    gen = torch.Generator().manual_seed(seed)
    # Token ids above the special tokens: random text.
    ids = torch.randint(min(3, vocab - 1), vocab, (batch, prompt_len), generator=gen).to(device)

    def prefill():
        model(input_ids=ids, use_cache=True)

    with _peak_memory(device, compute_devices(model)) as mem:
        prefills = _timed(prefill, device, repeats)
        greedy_decode(model, ids, min(decode_tokens, 2))  # warm-up of the cached path
        decodes = [greedy_decode(model, ids, decode_tokens)[1] for _ in range(repeats)]
    t_prefill, t_decode = statistics.median(prefills), statistics.median(decodes)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    return {
        "device": str(device),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "batch": batch,
        "prompt_len": prompt_len,
        "decode_tokens": decode_tokens,
        "repeats": repeats,
        "prefill_s": t_prefill,
        "decode_s": t_decode,
        "prefill_tokens_per_s": batch * prompt_len / t_prefill,
        "decode_tokens_per_s": batch * decode_tokens / t_decode,
        # The spread of the repeats (slowest, fastest): one figure from a busy machine can mislead by 2x.
        "prefill_tokens_per_s_range": [batch * prompt_len / max(prefills), batch * prompt_len / min(prefills)],
        "decode_tokens_per_s_range": [batch * decode_tokens / max(decodes), batch * decode_tokens / min(decodes)],
        "peak_memory_bytes": int(mem["peak_bytes"]),
        "baseline_memory_bytes": int(mem["baseline_bytes"]),
        "peak_memory_kind": mem["kind"],
        "weights_bytes": int(weights),
    }
