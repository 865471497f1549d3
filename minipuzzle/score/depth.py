"""Depth importance: how much the model changes when one layer is dropped, for every layer.

Prefix reuse: dropping layer i leaves everything before i untouched, so the full model's state at the input of
layer i *is* the dropped model's state after layer i. One walk over the layers carries the full model's state plus
one state per already-dropped layer ("wavefront"): at layer j the block is applied to the full state and to the
j states of models that dropped an earlier layer, and the full state at j's input becomes the state of the model
that drops j. That is 1 + 2 + ... + L = L(L+1)/2 block applications per row, about L/2 + 1/2 full forward passes,
the floor for exact drop-one scores, and every layer is read only once per row chunk, which is what makes
streaming from disk cheap. The price is memory: L + 1 residual-stream copies per row, so rows are processed in
chunks sized to a memory budget. Scores are sums over rows, accumulated in float64 after each chunk; after each
chunk the partial sums are saved, so an interrupted run resumes from the last finished chunk.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from minipuzzle.errors import UserError
from minipuzzle.metrics import kl_from_log_probs
from minipuzzle.progress import progress_bar
from minipuzzle.score.layerwise import LayerStack, block_forward, rows_per_chunk, run_block

DEPTH_METRICS = {
    "mse_hidden": "MSE of the final hidden state (norm_f output, before the LM head) vs the full model (MiniPuzzle)",
    "nmse_logits": "squared logit error normalised by the full model's squared logits (Nemotron Elastic)",
    "kl_logits": "KL(full model || dropped model) of next-token distributions, mean per token (Minitron-SSM)",
    "lm_loss": "increase of the mean next-token loss (nats) when the layer is dropped",
    "block_influence": "1 - cos(layer input, layer output) of the full model, mean per token (ShortGPT, ModelOpt)",
}
LOGIT_METRICS = {"nmse_logits", "kl_logits", "lm_loss"}
STATE_FILE = "depth_state.safetensors"


def check_metric(metric: str) -> str:
    if metric not in DEPTH_METRICS:
        raise UserError(f"unknown depth metric {metric!r}: choose one of {', '.join(DEPTH_METRICS)}")
    return metric


def windows_digest(windows: torch.Tensor) -> str:
    return hashlib.sha1(windows.cpu().contiguous().numpy().tobytes()).hexdigest()[:16]


@torch.no_grad()
def depth_scores(
    stack: LayerStack,
    windows: torch.Tensor,
    metric: str = "mse_hidden",
    *,
    batch_size: int = 8,
    chunk_rows: int | None = None,
    budget_bytes: int | None = None,
    resume_dir: str | Path | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Drop-one-layer score of every layer, [L] float32, higher = more important.

    windows [N, T] int64. Rows are processed in chunks of `chunk_rows` (default: as many as fit `budget_bytes`
    with L + 1 states per row); with `resume_dir`, partial sums are saved after each chunk and picked up again.
    """
    check_metric(metric)
    n, t = windows.shape
    nl = stack.num_layers
    states = 1 if metric == "block_influence" else nl + 1
    r = chunk_rows or rows_per_chunk(n, t, stack.hidden_size, states, stack.dtype, budget_bytes, stack.device)
    fingerprint = {"metric": metric, "pattern": stack.pattern, "windows": windows_digest(windows), "shape": [n, t]}
    acc = _load_state(resume_dir, fingerprint) or _empty(nl)
    done = int(acc["rows"].item())
    chunks = [slice(s, min(n, s + r)) for s in range(done, n, r)]
    with progress_bar(f"depth ({metric})", len(chunks) * nl, progress) as advance:
        for rows in chunks:
            part = _chunk(stack, windows[rows], metric, batch_size, advance)
            for k in part:
                acc[k] += part[k]
            acc["rows"] += rows.stop - rows.start
            _save_state(resume_dir, fingerprint, acc)
    return _finish(metric, acc)


def _empty(num_layers: int) -> dict[str, torch.Tensor]:
    z = torch.zeros((), dtype=torch.float64)
    return {"num": torch.zeros(num_layers, dtype=torch.float64), "den": z.clone(), "base": z.clone(), "rows": z}


def _finish(metric: str, acc: dict[str, torch.Tensor]) -> torch.Tensor:
    num, den = acc["num"], acc["den"].clamp_min(1e-300)
    if metric == "lm_loss":
        return ((num - acc["base"]) / den).float()
    return (num / den).float()


def _chunk(stack: LayerStack, ids: torch.Tensor, metric: str, bs: int, advance) -> dict[str, torch.Tensor]:
    """Sums of one row chunk: num [L], den, base (float64)."""
    nl = stack.num_layers
    acc = _empty(nl)
    del acc["rows"]
    h = torch.cat([stack.embed(ids[s : s + bs]) for s in range(0, len(ids), bs)])
    dropped: list[torch.Tensor] = []  # dropped[i]: state of the model without layer i, at the current layer
    for j in range(nl):
        with stack.block(j) as block:
            if metric == "block_influence":
                for s in range(0, len(h), bs):
                    x = h[s : s + bs]
                    y = block_forward(block, x).to(h.device)
                    acc["num"][j] += (1 - F.cosine_similarity(x.float(), y.float(), dim=-1)).double().sum().cpu()
                    h[s : s + bs] = y
            else:
                for state in dropped:
                    run_block(block, state, bs)
                dropped.append(h.clone())
                run_block(block, h, bs)
        advance(1)
    if metric == "block_influence":
        acc["den"] += h.shape[0] * h.shape[1]
        return acc
    for s in range(0, len(h), bs):
        full = stack.final_norm(h[s : s + bs])
        target = ids[s : s + bs].to(full.device)
        if metric == "mse_hidden":
            for i, state in enumerate(dropped):
                diff = stack.final_norm(state[s : s + bs]).float() - full.float()
                acc["num"][i] += diff.double().pow(2).sum().cpu()
            acc["den"] += full.numel()
        else:
            _logit_sums(stack, full, [st[s : s + bs] for st in dropped], target, metric, acc)
    return acc


# Values of each [B, positions, V] logits slice of the logit metrics (256 MiB in float32); the memory plan counts
# depth scoring's logits with it.
DEPTH_LOGITS_SLICE = 2**26


def _logit_sums(stack, full_hn, dropped_h, ids, metric, acc) -> None:
    """Accumulate logit-metric sums, a slice of positions at a time so [B, T, V] float32 logits never all exist."""
    b, t, _ = full_hn.shape
    vocab = getattr(stack.config, "vocab_size", 1)
    step = max(1, DEPTH_LOGITS_SLICE // max(1, b * vocab))
    dropped_hn = [stack.final_norm(x) for x in dropped_h]
    last = t - 1 if metric == "lm_loss" else t  # the last position has no next token to score
    for p in range(0, last, step):
        q = min(last, p + step)
        ref = stack.logits(full_hn[:, p:q])
        ref_lp = F.log_softmax(ref, dim=-1)
        if metric == "lm_loss":
            tgt = ids[:, p + 1 : q + 1].to(ref.device).unsqueeze(-1)
            acc["base"] += -ref_lp.gather(-1, tgt).double().sum().cpu()
            acc["den"] += tgt.numel()
        elif metric == "nmse_logits":
            acc["den"] += ref.double().pow(2).sum().cpu()
        else:
            acc["den"] += ref.shape[0] * ref.shape[1]
        for i, hn in enumerate(dropped_hn):
            lg = stack.logits(hn[:, p:q].to(full_hn.device))
            if metric == "nmse_logits":
                acc["num"][i] += (lg - ref).double().pow(2).sum().cpu()
            elif metric == "kl_logits":
                acc["num"][i] += kl_from_log_probs(ref_lp, F.log_softmax(lg, dim=-1)).double().clamp_min(0).cpu()
            else:
                acc["num"][i] += -F.log_softmax(lg, dim=-1).gather(-1, tgt).double().sum().cpu()


def _load_state(resume_dir, fingerprint) -> dict[str, torch.Tensor] | None:
    if resume_dir is None:
        return None
    f = Path(resume_dir) / STATE_FILE
    if not f.is_file():
        return None

    try:
        with safe_open(str(f), framework="pt") as h:
            saved = json.loads((h.metadata() or {}).get("fingerprint", "{}"))
        state = load_file(str(f))
    except Exception:
        return None  # an unreadable partial state is not worth failing over: start again
    if saved != fingerprint or set(state) != {"num", "den", "base", "rows"}:
        return None
    return state


def _save_state(resume_dir, fingerprint, acc) -> None:
    if resume_dir is None:
        return

    folder = Path(resume_dir)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / (STATE_FILE + ".tmp")
    save_file({k: v.contiguous() for k, v in acc.items()}, str(tmp), metadata={"fingerprint": json.dumps(fingerprint)})
    os.replace(tmp, folder / STATE_FILE)
