"""Building native `NemotronHForCausalLM` modules: on the meta device for a layout, or filled from a checkpoint
tensor by tensor in the dtypes `dtypes.weight_dtype` picks."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from transformers import NemotronHForCausalLM

from minipuzzle.arch import Layout
from minipuzzle.checkpoint.dtypes import weight_dtype
from minipuzzle.checkpoint.read import Checkpoint
from minipuzzle.errors import UserError


class _KernelNotice(logging.Filter):
    """transformers warns once per Mamba kernel (four of them) that mamba_ssm / causal_conv1d are missing.

    Those are CUDA kernels: without a GPU there is nothing to install, so nothing is said. With one, the four
    warnings become one plain line.
    """

    said = False

    def filter(self, record: logging.LogRecord) -> bool:
        if "falling back to its reference PyTorch implementation" not in record.getMessage():
            return True
        if _KernelNotice.said or not torch.cuda.is_available():
            return False
        _KernelNotice.said = True
        record.msg, record.args = (
            "mamba_ssm and causal_conv1d are not installed, so Mamba layers run transformers' PyTorch code: "
            "correct, but slower on GPU (pip install 'minipuzzle[gpu]')"
        ), ()
        return True


def plain_kernel_notice() -> None:
    """Replace transformers' per-kernel fallback warnings by `_KernelNotice` (idempotent); call before building
    NemotronH modules."""
    log = logging.getLogger("transformers.integrations.hub_kernels")
    if not any(isinstance(f, _KernelNotice) for f in log.filters):
        log.addFilter(_KernelNotice())


def build_model(layout: Layout, base_config: dict[str, Any] | Any | None = None, device: str | torch.device = "meta"):
    """An uninitialised `NemotronHForCausalLM` for `layout` (on the meta device by default: no memory)."""

    plain_kernel_notice()
    cfg = layout.to_hf_config(base_config)
    with torch.device(device):
        return NemotronHForCausalLM(cfg)


def load_model(
    source: str | Path | Checkpoint,
    dtype: torch.dtype | None = torch.float32,
    device: str | torch.device = "cpu",
):
    """Load a checkpoint (either weight-name style) as a native `NemotronHForCausalLM` in eval mode.

    Built on the meta device and filled tensor by tensor (`fill_weights`), so no random initialisation is paid for.
    """
    ckpt = source if isinstance(source, Checkpoint) else Checkpoint(source)
    model = build_model(ckpt.layout, ckpt.config)
    fill_weights(model, ckpt, dtype, lambda name: device)
    return model.eval()


def fill_weights(model, ckpt: Checkpoint, dtype: torch.dtype | None, place) -> None:
    """Assign every weight of `model` (built on the meta device) from `ckpt`, each read once and put straight on
    `place(name)`: in `dtype`, except those transformers keeps in float32 (`weight_dtype`: the MoE routers).
    A tied checkpoint may omit the LM head: transformers' NemotronH keeps a separate one, filled from the
    embeddings."""
    sources = {k: ckpt.source_of(k) for k in model.state_dict()}
    missing = sorted(k for k, v in sources.items() if v is None)
    if missing:
        raise UserError(f"checkpoint {ckpt.path} lacks {len(missing)} weights, e.g. {missing[0]}")
    state = {}
    for k, src in sources.items():
        t = ckpt.get(src)
        state[k] = t.to(device=place(k), dtype=weight_dtype(k, t.dtype, dtype))
    model.load_state_dict(state, strict=True, assign=True)


def model_state_dict(model) -> dict[str, torch.Tensor]:
    """State dict of a `NemotronHForCausalLM` (native names, every tensor including the LM head)."""
    return model.state_dict()
