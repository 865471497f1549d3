"""MoE routers choose experts in float32 during distillation, as they do at inference.

transformers' NemotronH router (`NemotronHTopkRouter`) keeps its weight and correction bias in float32 and casts
its input to float32 before its linear, but a bf16 autocast region recasts the operands of `F.linear` to bf16: the
router logits come out bf16, and teacher and student would pick experts on rounded scores that the shipped model
never sees. `route_in_float32` makes each router run its forward with autocast off (its own casts then hold).

Under FSDP2 a router also needs its own unit (`parallel.shard`): the student's blocks are gathered in bf16, which
would round the router's weight before the router ever sees it.
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from transformers.models.nemotron_h.modeling_nemotron_h import NemotronHTopkRouter


def is_router(module: nn.Module) -> bool:

    return isinstance(module, NemotronHTopkRouter)


def routers(model: nn.Module) -> list[nn.Module]:
    """Every MoE router of `model`, in module order."""
    return [m for m in model.modules() if is_router(m)]


class _AutocastOff:
    """Mixin: the module's forward runs with autocast disabled on its input's device."""

    def forward(self, hidden_states, *args, **kwargs):
        with torch.autocast(hidden_states.device.type, enabled=False):
            return super().forward(hidden_states, *args, **kwargs)


@functools.cache
def _float32_class(cls: type) -> type:
    return type(f"Float32{cls.__name__}", (_AutocastOff, cls), {})


def route_in_float32(model: nn.Module) -> int:
    """Make every MoE router of `model` compute with autocast off; returns how many there are. Idempotent.

    Each router's class becomes a subclass of its own (as FSDP2's `fully_shard` does), so weights, hooks, state
    dicts and copies are untouched, and sharding before or after this call composes."""
    found = routers(model)
    for m in found:
        if not isinstance(m, _AutocastOff):
            m.__class__ = _float32_class(type(m))
    return len(found)
