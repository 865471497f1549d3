"""Where eval puts a model: whole on one device, spread over several GPUs by accelerate's device map, or offloaded
to its checkpoint (every block read from disk just before it runs and dropped after it).

The memory plan (`memory.eval_memory`) decides how many of a node's GPUs eval uses and how many bytes of
weights each may hold; `load_placed` builds the model on the meta device, lets accelerate place whole blocks
within those bytes, fills each weight straight onto its device (no host copy of the whole model) and dispatches
it, so activations move from GPU to GPU as the layers run. When not even that fits (the CPU, or a model larger
than a node's GPUs), `load_offloaded` leaves the model on the meta device and gives each block accelerate's
offloading hook, reading its weights through `CheckpointWeights`.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import torch
from accelerate import dispatch_model, infer_auto_device_map
from accelerate.hooks import AlignDevicesHook, add_hook_to_module
from accelerate.utils import align_module_device, has_offloaded_params

from minipuzzle.checkpoint.build import build_model, fill_weights, load_model
from minipuzzle.checkpoint.dtypes import weight_dtype
from minipuzzle.checkpoint.read import Checkpoint
from minipuzzle.errors import UserError


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
                per_device_bytes: int | None = None, offload: bool = False):  # fmt: skip
    """The model of `path` whole on `device` (one device, the CPU included), spread over `devices` GPUs
    (cuda:0 ..) holding at most `per_device_bytes` of its weights each, or, `offload`, computing on `device` with
    its blocks read from the checkpoint every forward (`load_offloaded`)."""

    if offload:
        return load_offloaded(path, dtype, device)
    if devices <= 1 or device.type != "cuda":
        return load_model(path, dtype, device)
    return load_mapped(path, dtype, max_memory={i: per_device_bytes for i in range(devices)})


class CheckpointWeights(Mapping):
    """The weights of one module of a checkpoint's model, read when asked: `weights[name]` is the tensor
    `prefix + name` read from its shard by `Checkpoint.get` (either name style, routed experts merged into the
    model's 3-D tensors), in `dtypes[prefix + name]`. Nothing is cached, so a tensor's memory goes when the module
    that asked for it drops it."""

    def __init__(self, ckpt, prefix: str, sources: dict[str, str], dtypes: dict[str, torch.dtype]):
        self.ckpt, self.prefix, self.sources, self.dtypes = ckpt, prefix, sources, dtypes
        self.names = [k[len(prefix) :] for k in sources if k.startswith(prefix)]

    def __getitem__(self, name: str) -> torch.Tensor:
        full = self.prefix + name
        if full not in self.sources:
            raise KeyError(name)
        return self.ckpt.get(self.sources[full]).to(self.dtypes[full])

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)


def _sources(model, ckpt) -> dict[str, str]:
    """The checkpoint tensor behind each of `model`'s weights (`Checkpoint.source_of`). A missing weight fails as
    in `fill_weights`."""

    out = {k: ckpt.source_of(k) for k in model.state_dict()}
    missing = sorted(k for k, v in out.items() if v is None)
    if missing:
        raise UserError(f"checkpoint {ckpt.path} lacks {len(missing)} weights, e.g. {missing[0]}")
    return out


def offload_units(model) -> dict[str, torch.nn.Module]:
    """Prefix -> module of each unit an offloaded model reads at once: the embeddings, every block, the final
    norm and the LM head (together they hold every weight)."""
    blocks = {f"model.layers.{i}.": layer for i, layer in enumerate(model.model.layers)}
    return {"model.embeddings.": model.model.embeddings, **blocks, "model.norm_f.": model.model.norm_f,
            "lm_head.": model.lm_head}  # fmt: skip


def load_offloaded(path: str | Path, dtype: torch.dtype, device: torch.device):
    """A `NemotronHForCausalLM` of checkpoint `path` that holds no weights: it stays on the meta device, and each
    unit (`offload_units`) gets accelerate's offloading hook, which reads the unit's weights from the checkpoint
    onto `device` just before its forward and puts them back on the meta device after it. Weights are cast as
    `build.fill_weights` casts them: `dtype`, except the float32 routers (`dtypes.weight_dtype`)."""


    ckpt = Checkpoint(path)
    model = build_model(ckpt.layout, ckpt.config).eval().requires_grad_(False)
    sources = _sources(model, ckpt)
    dtypes = {k: weight_dtype(k, t.dtype, dtype) for k, t in model.state_dict().items()}
    # accelerate casts what the map returns to the meta tensor's dtype: give each meta tensor its loaded dtype.
    model.load_state_dict({k: torch.empty(t.shape, dtype=dtypes[k], device="meta") for k, t in
                           model.state_dict().items()}, assign=True)  # fmt: skip
    for prefix, unit in offload_units(model).items():
        weights = CheckpointWeights(ckpt, prefix, sources, dtypes)
        add_hook_to_module(unit, AlignDevicesHook(execution_device=device, offload=True, weights_map=weights,
                                                  offload_buffers=True, place_submodules=True))  # fmt: skip
    return model


def is_offloaded(model) -> bool:
    """True for a model whose weights are read from its checkpoint every forward (`load_offloaded`)."""

    return has_offloaded_params(model.lm_head)


@contextmanager
def resident_head(model):
    """The model's LM head as a callable [n, h] -> [n, V] whose weight stays on its device for the block: an
    offloaded head is read once for all the chunks of logits a batch makes, not once per chunk."""
    if not is_offloaded(model):
        yield model.lm_head
        return

    head = model.lm_head
    with align_module_device(head):
        yield lambda h: torch.nn.functional.linear(h, head.weight)


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

    with align_module_device(model.lm_head):
        w = model.lm_head.weight.detach().cpu().clone()
    head = torch.nn.Linear(w.shape[1], w.shape[0], bias=False, device="meta")
    head.weight = torch.nn.Parameter(w, requires_grad=False)
    return head


def compute_devices(model) -> list[torch.device]:
    """Every device `model` computes on (its modules' execution devices), in order."""
    devs = (execution_device(m) for m in model.modules() if next(m.parameters(False), None) is not None)
    # The blocks of an offloaded model compute where their hook says; their own weights wait on the meta device.
    return list(dict.fromkeys(d for d in devs if d.type != "meta"))
