"""Model Optimizer quantization configs for Nemotron-H hybrids: what is quantized, what stays in bf16.

The default is Model Optimizer's own hybrid recipe, `MAMBA_MOE_{FP8,NVFP4}_AGGRESSIVE_CFG` (0.47): every linear
layer's weights and inputs quantized (Mamba in_proj / out_proj, MLP, routed and shared experts), while attention
(q/k/v/o), the Mamba conv1d, the MoE routers, the embeddings and the LM head stay in bf16, as NVIDIA keeps them
for its Mamba/MoE models. Its `_CONSERVATIVE` variant also keeps the Mamba projections; `--keep '*mixer.in_proj,
*mixer.out_proj'` gives that. Name patterns are fnmatch patterns over module names (`model.layers.3.mixer.in_proj`,
`lm_head`); one without a leading `*` matches at any depth.
"""

from __future__ import annotations

import copy
import fnmatch
import warnings
from collections.abc import Iterable

import torch

from minipuzzle.errors import UserError
from minipuzzle.settings import QUANT_PRECISIONS

# Imports inside functions here are of optional packages (Model Optimizer, lm-eval, matplotlib, the MIP solver),
# loaded only where a feature uses them.

PRECISIONS = QUANT_PRECISIONS
# Model Optimizer config names per precision (modelopt.torch.quantization).
BASE_CONFIG = {"fp8": "MAMBA_MOE_FP8_AGGRESSIVE_CFG", "nvfp4": "MAMBA_MOE_NVFP4_AGGRESSIVE_CFG"}
# The precision names of `arch.Layout.memory` (NVFP4 is its fp4: 4 bits + an 8-bit scale per 16 = 4.5 bits).
ARCH_PRECISION = {"fp8": "fp8", "nvfp4": "fp4"}


def mtq():
    """`modelopt.torch.quantization`, imported without its warning that this transformers release is untested
    (its `hf` extra pins transformers<5.15; the core package has no pin, and this project tests the range it uses)."""

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is not tested with current version of modelopt")
        import modelopt.torch.quantization as mtq_module
    return mtq_module


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise UserError(f"unknown precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    return precision


def check_runnable(precision: str, device: torch.device | str) -> None:
    """Refuse NVFP4 off CUDA: Model Optimizer 0.47 simulates NVFP4's per-16 scales with a CUDA-only op
    (`dynamic_block_quantize_op` asserts `amax.is_cuda`), so neither calibration nor export can run on the CPU."""
    check_precision(precision)
    if precision == "nvfp4" and torch.device(device).type != "cuda":
        raise UserError("nvfp4 needs a CUDA GPU (Model Optimizer simulates NVFP4 block scales only on CUDA): run it "
                        "on a GPU machine, or use --precision fp8")  # fmt: skip


def module_pattern(pattern: str) -> str:
    """A user's module pattern as one over full module names ('lm_head' -> '*lm_head')."""
    return pattern if pattern.startswith("*") else "*" + pattern


def hybrid_config(precision: str, keep: Iterable[str] = (), quantize: Iterable[str] = ()) -> dict:
    """The `mtq.quantize` config: Model Optimizer's hybrid recipe for `precision`, then `quantize` module patterns
    given the recipe's weight and input format (enabling only those two quantizers: enabling every quantizer of a
    module would turn on its 8-bit output quantizer too, which the exporter reads as an INT8 KV cache), then `keep`
    patterns switched off (every quantizer under them). Later entries win in Model Optimizer's list format."""
    cfg = copy.deepcopy(getattr(mtq(), BASE_CONFIG[check_precision(precision)]))
    fmt = {e["quantizer_name"]: e["cfg"] for e in cfg["quant_cfg"] if "cfg" in e}
    for p in quantize:
        mp = module_pattern(p)
        for q in ("weight_quantizer", "input_quantizer"):
            cfg["quant_cfg"].append({"quantizer_name": f"{mp}.{q}", "cfg": copy.deepcopy(fmt[f"*{q}"]),
                                     "enable": True})  # fmt: skip
    for p in keep:
        cfg["quant_cfg"].append({"quantizer_name": f"{module_pattern(p)}.*", "enable": False})
    return cfg


def check_patterns(model, keep: Iterable[str], quantize: Iterable[str]) -> None:
    """A pattern that names no module of `model` is a typo, not a wish: one line naming it."""
    names = [n for n, _ in model.named_modules() if n]
    for opt, pats in (("--keep", keep), ("--quantize-modules", quantize)):
        for p in pats:
            if not fnmatch.filter(names, module_pattern(p)):
                raise UserError(f"{opt} pattern {p!r} matches no module of the model (e.g. {names[-1]})")


def quantized_modules(model) -> list[str]:
    """Names of the modules whose weights Model Optimizer quantizes (an enabled weight quantizer), in order; routed
    experts (one module holding [E, out, in] tensors) count once per projection (`experts.up_proj`)."""
    out = []
    for name, mod in model.named_modules():
        wq = getattr(mod, "weight_quantizer", None)
        if wq is not None and getattr(wq, "is_enabled", False):
            out.append(name)
        for proj in ("up_proj", "down_proj"):
            qs = getattr(mod, f"{proj}_weight_quantizers", None)
            if qs is not None and any(q.is_enabled for q in qs):
                out.append(f"{name}.{proj}")
    return out
