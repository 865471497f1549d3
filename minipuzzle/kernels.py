"""Which Mamba implementation transformers' NemotronH will run here: the fused kernels of the `gpu` extra
(mamba-ssm, causal-conv1d) or its PyTorch reference path; and what each attention implementation holds.

The two paths hold very different activations: the PyTorch chunk scan makes float32 temporaries of
[tokens, heads, state] and more (about 79 GiB for a checkpointed 56B micro-batch where the kernels need 22.9 GiB),
so the memory plan counts the path that will run, not the one a GPU could run.

transformers 5.x resolves each Mamba function once, at import, to the package's kernel when that package imports
and to its PyTorch reference otherwise (`integrations.hub_kernels.use_kernel_func_from_hub_with_fallback`, whose
wrapper keeps the choice in its closure as `is_new_implementation`): `dispatch_of` reads that choice back.
"""

from __future__ import annotations

import importlib.util
import inspect
from dataclasses import dataclass

from minipuzzle.errors import UserError

# Imports inside functions here keep torch and transformers unloaded until a function needs them, so `--help`
# and the offline commands (dry runs, info, search) start fast.

# The functions NemotronH's Mamba mixer runs a whole sequence through (training, scoring, prefill), by the names
# transformers releases have used for them; the decode-step ones (`*_update`) hold no activations worth planning.
# transformers' NemotronHConfig.chunk_size, which NVIDIA's Nemotron-H configs keep: the PyTorch scan's chunk, whose
# [chunk x chunk] segment sums the memory plan counts on that path (tests/test_memory_terms.py reads transformers').
MAMBA_CHUNK = 128
SEQUENCE_FUNCS = ("causal_conv1d_fn", "mamba_chunk_scan_combined", "mamba2_chunk_scan", "mamba2_split_conv1d_scan_combined")
PACKAGES = ("mamba_ssm", "causal_conv1d")


@dataclass(frozen=True)
class MambaPath:
    """fused: the kernels will run; why: one line saying which path and what decided it."""

    fused: bool
    why: str


def dispatch_of(fn) -> tuple[bool | None, str | None]:
    """(does `fn` dispatch to a package's kernel rather than PyTorch?, that kernel's `module.name`), read from the
    closure of transformers' fallback wrapper; (None, None) when `fn` is not such a wrapper."""
    f = fn
    for _ in range(4):
        try:
            nonlocals = inspect.getclosurevars(f).nonlocals
        except (TypeError, ValueError):
            nonlocals = {}
        if "is_new_implementation" in nonlocals:
            impl = nonlocals.get("implementation")
            where = f"{getattr(impl, '__module__', '?')}.{getattr(impl, '__name__', '?')}" if impl else None
            return bool(nonlocals["is_new_implementation"]), where
        f = getattr(f, "__wrapped__", None)
        if f is None:
            break
    return None, None


def detect_mamba_path(cuda_available: bool | None = None) -> MambaPath:
    """The Mamba path NemotronH takes on this machine. The kernels run only on a CUDA device, only when both
    packages are installed, and only where transformers resolved its functions to them (a package that is
    installed but fails to import, e.g. built for another torch, leaves the PyTorch path)."""
    if cuda_available is None:
        import torch

        cuda_available = torch.cuda.is_available()
    if not cuda_available:
        return MambaPath(False, "PyTorch Mamba path (no CUDA device)")
    missing = [p.replace("_", "-") for p in PACKAGES if importlib.util.find_spec(p) is None]
    if missing:
        return MambaPath(False, f"PyTorch Mamba path ({' and '.join(missing)} not installed: the gpu extra)")
    from transformers.models.nemotron_h import modeling_nemotron_h as modeling

    resolved = {n: dispatch_of(getattr(modeling, n))[0] for n in SEQUENCE_FUNCS if callable(getattr(modeling, n, None))}
    slow = sorted(n for n, kernel in resolved.items() if kernel is False)
    if slow:
        return MambaPath(False, f"PyTorch Mamba path (transformers could not import the kernels for {', '.join(slow)})")
    return MambaPath(True, "fused Mamba kernels (mamba-ssm, causal-conv1d)")


# What the memory plan counts for each attention implementation transformers offers NemotronH. Distillation takes
# --attn-implementation; every other stage runs transformers' default, SDPA.
ATTENTION_PATHS = {
    "sdpa": "SDPA (flash / memory-efficient kernels: no [T x T] scores kept)",
    "eager": "eager ([heads x T x T] scores, their float32 softmax and mask counted per attention layer)",
    "flash_attention_2": "flash-attn 2 (counted as SDPA's flash path)",
}


def attention_text(implementation: str) -> str:
    """Which attention path the plan counts for `implementation`, and, for flash-attn 2 where its package is not
    installed, that a run would refuse it (transformers raises on `set_attn_implementation`)."""
    text = ATTENTION_PATHS[implementation]
    if implementation == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        text += ": flash-attn is not installed here, so a run here would refuse it"
    return text


def check_attention(implementation: str, device_type: str) -> None:
    """Refuse flash-attn 2 where it cannot run (no CUDA device, or the package missing), in one line, before any
    model is built."""
    if implementation != "flash_attention_2":
        return
    if device_type != "cuda":
        raise UserError("--attn-implementation flash_attention_2 needs a CUDA GPU: use sdpa (the default) here")
    if importlib.util.find_spec("flash_attn") is None:
        raise UserError("--attn-implementation flash_attention_2 needs the flash-attn package (the gpu extra): "
                        "install it or use sdpa (the default)")  # fmt: skip
