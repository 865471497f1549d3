"""Post-training quantization: Model Optimizer's `mtq.quantize` with a calibration loop over token windows.

Calibration runs the model over the windows once with every enabled quantizer recording the largest magnitude it
sees (Model Optimizer's "max" algorithm); the quantizers then hold their scales and the model computes in
simulated ("fake") quantization: each quantized weight and input rounded to the FP8 / NVFP4 grid and back.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from collections.abc import Iterable

import torch

from minipuzzle.evaluate.placement import execution_device, input_device
from minipuzzle.progress import track
from minipuzzle.quantize.configs import check_patterns, check_runnable, hybrid_config, mtq

# Positions whose LM-head logits exist at once when the LM head is calibrated ([chunk, V] values).
HEAD_CHUNK = 1024


def _head_quantized(model) -> bool:
    wq = getattr(model.lm_head, "weight_quantizer", None)
    return wq is not None and wq.is_enabled


@torch.no_grad()
def calibration_loop(windows: torch.Tensor, batch_size: int, progress: bool = False):
    """The forward loop `mtq.quantize` calls: windows [N, T] through the backbone `batch_size` at a time. The LM
    head only runs (on `HEAD_CHUNK` positions at a time) when it is quantized: its logits [B, T, V] are the
    largest activation of a forward and calibrate nothing otherwise."""

    def loop(model) -> None:
        device = input_device(model)
        for start in track(range(0, len(windows), batch_size), "calibration", progress):
            ids = windows[start : start + batch_size].to(device)
            h = model.model(input_ids=ids, use_cache=False).last_hidden_state
            if _head_quantized(model):
                flat = h.reshape(-1, h.shape[-1]).to(execution_device(model.lm_head))
                for i in range(0, len(flat), HEAD_CHUNK):
                    model.lm_head(flat[i : i + HEAD_CHUNK])

    return loop


def quantize_model(model, precision: str, windows: torch.Tensor, *, batch_size: int = 8, keep: Iterable[str] = (),
                   quantize: Iterable[str] = (), progress: bool = False):  # fmt: skip
    """`model` (a `NemotronHForCausalLM`, changed in place and returned) quantized to `precision` with the hybrid
    config (`configs.hybrid_config`), calibrated on windows [N, T] of token ids. Refuses (`UserError`) NVFP4 off
    CUDA and module patterns that name nothing, before anything is changed."""

    keep, quantize = list(keep), list(quantize)
    check_runnable(precision, next(model.parameters()).device)
    check_patterns(model, keep, quantize)
    cfg = hybrid_config(precision, keep, quantize)
    # Model Optimizer prints a line per registered module class and warns that it has not tested this
    # transformers release (its `hf` extra pins transformers<5.15; the core package has no pin).
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        return mtq().quantize(model, cfg, forward_loop=calibration_loop(windows, batch_size, progress))
