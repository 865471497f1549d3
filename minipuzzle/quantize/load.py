"""Load an exported quantized checkpoint (`export.export_quantized`, or any Model Optimizer FP8 / NVFP4 HF export
of a Nemotron-H) as a `NemotronHForCausalLM` that computes as the quantized model does, on any device.

Each quantized weight is dequantized exactly (FP8 value x its scale; NVFP4 E2M1 value x its FP8 block scale x the
per-tensor scale, by Model Optimizer's own `NVFP4QTensor.dequantize`), so the weights are the quantized ones; each
quantized input gets a Model Optimizer input quantizer with the stored `input_scale` (FP8: amax = scale x 448;
NVFP4: amax = scale x 6 x 448, the block scales computed per input as at serving), so activations are rounded as a
serving engine rounds them. Matmuls then run in `dtype`: the simulated ("fake") quantized model of the checkpoint.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import PretrainedConfig

from minipuzzle.arch import Layout, hf_config
from minipuzzle.checkpoint.build import build_model
from minipuzzle.checkpoint.dtypes import weight_dtype
from minipuzzle.checkpoint.read import native_name
from minipuzzle.errors import UserError
from minipuzzle.quantize.configs import BASE_CONFIG, check_runnable, mtq
from minipuzzle.quantize.export import SCALE_SUFFIXES, quantization_of, quantized_weights, tensor_table

# Imports inside functions here are of optional packages (Model Optimizer, lm-eval, matplotlib, the MIP solver),
# loaded only where a feature uses them.

FP8_MAX = 448.0  # largest E4M3 value
E2M1_MAX = 6.0  # largest E2M1 value
NVFP4_BLOCK = 16
_EXPERT = re.compile(r"^(.+\.mixer\.experts)\.(\d+)\.(up_proj|down_proj)\.(weight|input_scale)$")


def _dequantize(algo: str, w: torch.Tensor, get) -> torch.Tensor:
    """The float32 weight [out, in] that a stored quantized weight `w` represents; `get(suffix)` reads its
    scales."""
    if algo == "FP8":
        return w.to(torch.float32) * get("weight_scale").to(torch.float32)
    from modelopt.torch.quantization.qtensor import NVFP4QTensor

    shape = (*w.shape[:-1], w.shape[-1] * 2)
    return NVFP4QTensor(torch.Size(shape), torch.float32, w).dequantize(
        dtype=torch.float32, scale=get("weight_scale"), double_scale=get("weight_scale_2").to(torch.float32),
        block_sizes={-1: NVFP4_BLOCK},
    )  # fmt: skip


def _amax(algo: str, input_scale: torch.Tensor) -> torch.Tensor:
    bound = FP8_MAX if algo == "FP8" else E2M1_MAX * FP8_MAX
    return input_scale.to(torch.float32) * bound


def _read_state(path: Path, algo: str) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(weights under the model's names, routed experts merged into [E, out, in]; {input quantizer name: amax})."""


    raw = {}
    for f in sorted(path.glob("*.safetensors")):
        raw |= load_file(f)
    quant = set(quantized_weights({k: None for k in raw}))
    state, amax, experts = {}, {}, {}
    for k, t in raw.items():
        base = k.rsplit(".", 1)[0]
        if k in quant:
            t = _dequantize(algo, t, lambda s, b=base: raw[f"{b}.{s}"])
        elif k.endswith(".input_scale"):
            t = _amax(algo, t)
        elif k.endswith(SCALE_SUFFIXES):
            continue
        name = native_name(k)
        if m := _EXPERT.match(name):
            experts.setdefault((m[1], m[3], m[4]), {})[int(m[2])] = t
        elif name.endswith(".input_scale"):
            amax[name.removesuffix(".input_scale") + ".input_quantizer"] = t
        else:
            state[name] = t
    for (mod, proj, what), per in experts.items():
        if what == "weight":
            state[f"{mod}.{proj}"] = torch.stack([per[e] for e in range(len(per))])
        else:  # one input quantizer per projection serves every expert: the largest range of any
            amax[f"{mod}.{proj}_input_quantizer"] = torch.stack(list(per.values())).max()
    return state, amax


def _input_config(algo: str, names: list[str]) -> dict:

    base = getattr(mtq(), BASE_CONFIG["fp8" if algo == "FP8" else "nvfp4"])
    fmt = next(e["cfg"] for e in base["quant_cfg"] if e.get("quantizer_name") == "*input_quantizer")
    return {"quant_cfg": [{"quantizer_name": "*", "enable": False},
                          *({"quantizer_name": n, "cfg": fmt, "enable": True} for n in names)],
            "algorithm": "max"}  # fmt: skip


def _plain_config(path: Path) -> dict:
    """config.json as transformers reads it (its `{"__float__": "Infinity"}` decoded), without the
    quantization_config: the model is built unquantized and quantized by Model Optimizer here."""

    cfg, _ = PretrainedConfig.get_config_dict(str(path))
    cfg.pop("quantization_config", None)
    return cfg


def load_quantized(path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """The fake-quantized model of checkpoint folder `path` (module docstring) on `device`, weights in `dtype`
    (routers float32, as transformers keeps them). NVFP4 needs CUDA (Model Optimizer's block quantization)."""

    path = Path(path)
    algo = quantization_of(path)
    if algo not in ("FP8", "NVFP4"):
        raise UserError(f"{path} is not an FP8 or NVFP4 Model Optimizer checkpoint (quantization: {algo})")
    check_runnable("fp8" if algo == "FP8" else "nvfp4", device)
    cfg = hf_config(_plain_config(path))
    model = build_model(Layout.from_config(cfg), cfg)
    state, amax = _read_state(path, algo)
    state = {k: v.to(weight_dtype(k, v.dtype, dtype)).to(device) for k, v in state.items()}
    model.load_state_dict(state, strict=True, assign=True)
    model.eval()
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        mtq().quantize(model, _input_config(algo, sorted(amax)), forward_loop=None)
    quantizers = dict(model.named_modules())
    for name, a in amax.items():
        quantizers[name].amax = a.to(device)
    return model


def describe(path: str | Path) -> dict:
    """What an exported checkpoint holds: its algorithm, quantized tensor count, excluded module patterns."""
    path = Path(path)
    qc = json.loads((path / "hf_quant_config.json").read_text())["quantization"]
    return {"quant_algo": qc.get("quant_algo"), "quantized_tensors": len(quantized_weights(tensor_table(path))),
            "exclude_modules": qc.get("exclude_modules") or []}  # fmt: skip


def quantized(path: str | Path) -> bool:
    """The checkpoint folder holds a Model Optimizer FP8 / NVFP4 export."""
    return quantization_of(path) in ("FP8", "NVFP4")


def load_quantized_placed(path: str | Path, dtype: torch.dtype, device: torch.device, launch: dict):
    """`load_quantized` for eval's plan (`evaluate.runner.eval_launch`): whole on one device only. Spreading a
    fake-quantized model over GPUs or offloading it to its checkpoint is refused in one line."""
    if launch["devices"] > 1 or launch["offload"]:
        raise UserError(f"{path} is quantized and does not fit one device in eval's plan: a quantized checkpoint is "
                        "evaluated whole on one device (give eval a larger device, or --device cpu)")  # fmt: skip
    return load_quantized(path, dtype, device)
