"""Number formats in one table: their names, their sizes, and the rules that pick a tensor's dtype.

Every name a user or a file may give a format goes through `PRECISIONS` (and `STORED` for the codes of
safetensors headers): the compute dtypes of `--dtype`, the weight precisions of a memory budget, the bytes an
element takes in a memory plan. torch is imported inside the functions that return torch dtypes, and only there,
so that the CLI's tables and the settings models read this module without loading torch.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from minipuzzle.errors import UserError

# Imports inside functions here keep torch and transformers unloaded until a function needs them, so `--help`
# and the offline commands (dry runs, info, search) start fast.


@dataclass(frozen=True)
class Precision:
    """One number format: `name` as torch spells it ("" when torch has no such dtype), `short` the name budgets
    and summaries use, `bits` per stored value (NVFP4 keeps 4-bit values plus one 8-bit scale per 16 values:
    4 + 8/16 = 4.5), `compute` whether a model may run in it (`--dtype`)."""

    name: str
    short: str
    bits: float
    compute: bool


PRECISIONS = (
    Precision("float32", "fp32", 32.0, True),
    Precision("bfloat16", "bf16", 16.0, True),
    Precision("float16", "fp16", 16.0, True),
    Precision("float8_e4m3fn", "fp8", 8.0, False),
    Precision("", "fp4", 4.5, False),
)
_COMPUTE = [p for p in PRECISIONS if p.compute]

# Bits per stored value by short name, for memory budgets: fp32, bf16, fp16, fp8, fp4.
PRECISION_BITS = {p.short: p.bits for p in PRECISIONS}
# The compute dtypes `--dtype` takes, torch's name and the short one of each, and "auto".
DTYPE_NAMES = ("auto", *(n for p in _COMPUTE for n in (p.name, p.short)))

# safetensors header code -> torch's name of the dtype (the codes a checkpoint of ours or the hub's may hold).
STORED = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "F8_E4M3": "float8_e4m3fn",
          "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}  # fmt: skip
_ELEMENT_BYTES = {"float64": 8, "float32": 4, "float16": 2, "bfloat16": 2, "float8_e4m3fn": 1, "int64": 8,
                  "int32": 4, "int16": 2, "int8": 1, "uint8": 1, "bool": 1}  # fmt: skip


def _compute(name: str) -> Precision | None:
    key = name.lower()
    return next((p for p in _COMPUTE if key in (p.name, p.short)), None)


def long_name(name: str) -> str:
    """torch's name of a compute dtype: 'bf16' -> 'bfloat16'; any other name as given."""
    p = _compute(name)
    return p.name if p else name


def short_name(name: str) -> str:
    """The short name of a compute dtype: 'bfloat16' -> 'bf16', the names of memory budgets and summaries; any
    other name as given."""
    p = _compute(name)
    return p.short if p else name


def dtype_bytes(name: str) -> int:
    """Bytes per element of a dtype by torch's or the short name ('bfloat16', 'bf16', 'float32'); KeyError for
    another."""
    return _ELEMENT_BYTES[long_name(name)]


def stored_bytes(code: str) -> int:
    """Bytes per element of a safetensors dtype code ("BF16" -> 2); KeyError for an unknown code."""
    return _ELEMENT_BYTES[STORED[code]]


def code_dtype(code: str):
    """The torch dtype of a safetensors dtype code ("BF16" -> torch.bfloat16); None for a code not in `STORED`."""
    import torch

    return getattr(torch, STORED[code]) if code in STORED else None


def parse_dtype(dtype, device="cpu"):
    """A compute dtype (torch.dtype) by name or as itself; None or "auto" is float32 on the CPU and bfloat16 on a
    GPU. An unknown name is a `UserError`."""
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    p = _compute(dtype)
    if p is None:
        raise UserError(f"unknown dtype {dtype!r}: choose auto or one of {', '.join(DTYPE_NAMES[1:])}")
    return getattr(torch, p.name)


def resolve_device(device: str | None = "auto", dtype=None):
    """(torch.device, torch.dtype) for a stage: device None / "auto" is cuda when available, else the CPU; dtype
    as `parse_dtype`. A bad name, or cuda on a machine without it, is a `UserError`."""
    import torch

    dev = "cuda" if device in (None, "auto") and torch.cuda.is_available() else device
    dev = "cpu" if dev in (None, "auto") else dev
    try:
        dev_t = torch.device(dev)
    except RuntimeError:
        raise UserError(f"unknown device {dev!r} (use auto, cpu or cuda[:N])") from None
    if dev_t.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {dev}: no CUDA device on this machine")
    return dev_t, parse_dtype(dtype, dev_t)


def keeps_float32(name: str) -> bool:
    """True for a weight that transformers keeps in float32 whatever dtype the model loads in.

    NemotronH names the MoE router's weight and `e_score_correction_bias` (`_keep_in_fp32_modules_strict`):
    sigmoid scores plus a small bias choose the experts, and bf16 rounding of either changes which are chosen.
    Matched as transformers matches them, anywhere in the name, so block-relative names (`mixer.gate.weight`)
    answer like full ones.
    """
    return any(k in name for k in _float32_names())


@functools.cache
def _float32_names() -> tuple[str, ...]:
    from transformers.models.nemotron_h.modeling_nemotron_h import NemotronHPreTrainedModel

    return tuple(getattr(NemotronHPreTrainedModel, "_keep_in_fp32_modules_strict", None) or ())


def weight_dtype(name: str, stored, dtype):
    """The torch dtype weight `name` (stored as `stored`) takes in a model computing in `dtype`: `dtype`, except
    the tensors transformers keeps in float32 (`keeps_float32`) and integer tensors, which stay as they are. None
    keeps every tensor as stored. The one rule for every way a model is built: loaded whole, streamed a block at a
    time, offloaded, sharded."""
    import torch

    if dtype is None or not stored.is_floating_point:
        return stored
    return torch.float32 if keeps_float32(name) else dtype
