"""Where eval puts a model: whole on one device, or spread over several GPUs by accelerate's device map.

The memory plan (`memory_plan.plan_eval`) decides how many of a node's GPUs eval uses and how many bytes of
weights each may hold; `load_placed` builds the model on the meta device, lets accelerate place whole blocks
within those bytes, fills each weight straight onto its device (no host copy of the whole model) and dispatches
it, so activations move from GPU to GPU as the layers run.
"""

from __future__ import annotations

from pathlib import Path

import torch


def block_class(model) -> str:
    """The class name of the model's blocks (accelerate never splits one across devices)."""
    return type(model.model.layers[0]).__name__


def _device_of(name: str, device_map: dict[str, str | int]):
    """The device `device_map` gives the weight `name` (the longest module prefix that names it)."""
    best = max((k for k in device_map if k == "" or name == k or name.startswith(k + ".")), key=len)
    return device_map[best]


def load_mapped(path: str | Path, dtype: torch.dtype, device_map: dict[str, str | int] | None = None,
                max_memory: dict | None = None, force_hooks: bool = False):  # fmt: skip
    """A `NemotronHForCausalLM` of checkpoint `path` in `dtype`, placed by `device_map` (module name -> device),
    or, without one, by accelerate's `infer_auto_device_map` within `max_memory` (device -> bytes), blocks whole.
    `force_hooks` adds accelerate's hooks even when every module is on one device (to test the dispatched path
    on the CPU)."""
    from accelerate import dispatch_model, infer_auto_device_map

    from minipuzzle.checkpoint import Checkpoint, build_model, fill_weights

    ckpt = Checkpoint(path)
    model = build_model(ckpt.layout, ckpt.config)
    if device_map is None:
        device_map = infer_auto_device_map(model, max_memory=max_memory, dtype=dtype,
                                           no_split_module_classes=[block_class(model)])  # fmt: skip
    fill_weights(model, ckpt, dtype, lambda name: _torch_device(_device_of(name, device_map)))
    return dispatch_model(model.eval(), device_map, force_hooks=force_hooks)


def _torch_device(dev: str | int) -> str:
    """A device map's entry as a torch device name (accelerate writes GPUs as their index)."""
    return f"cuda:{dev}" if isinstance(dev, int) else dev


def load_placed(path: str | Path, dtype: torch.dtype, device: torch.device, devices: int = 1,
                per_device_bytes: int | None = None):  # fmt: skip
    """The model of `path` whole on `device` (one device, the CPU included), or spread over `devices` GPUs
    (cuda:0 ..) holding at most `per_device_bytes` of its weights each."""
    from minipuzzle.checkpoint import load_model

    if devices <= 1 or device.type != "cuda":
        return load_model(path, dtype, device)
    return load_mapped(path, dtype, max_memory={i: per_device_bytes for i in range(devices)})


def execution_device(module) -> torch.device:
    """Where `module` computes: accelerate's execution device for a dispatched module (whose weights may wait on
    the host or on disk), else the device of its first parameter."""
    dev = getattr(getattr(module, "_hf_hook", None), "execution_device", None)
    if dev is None:
        return next(module.parameters()).device
    return torch.device(_torch_device(dev))


def input_device(model) -> torch.device:
    """Where a model's token ids go: its embeddings' execution device."""
    return execution_device(model.get_input_embeddings())


def head_copy(model) -> torch.nn.Linear:
    """A host copy of the model's LM head [V, h] (onloaded first when accelerate keeps it elsewhere)."""
    from accelerate.utils import align_module_device

    with align_module_device(model.lm_head):
        w = model.lm_head.weight.detach().cpu().clone()
    head = torch.nn.Linear(w.shape[1], w.shape[0], bias=False, device="meta")
    head.weight = torch.nn.Parameter(w, requires_grad=False)
    return head


def compute_devices(model) -> list[torch.device]:
    """Every device `model` computes on (its modules' execution devices), in order."""
    return list(dict.fromkeys(execution_device(m) for m in model.modules() if next(m.parameters(False), None) is not None))
