"""Export a quantized model as the Hugging Face checkpoint that Model Optimizer's HF export writes and vLLM /
TensorRT-LLM load, and account for its bytes.

The format (Model Optimizer 0.47 `export_hf_checkpoint`, the "unified" checkpoint): safetensors where each
quantized linear layer `X` stores `X.weight` (FP8 E4M3, or NVFP4 as uint8 holding two E2M1 values each, [out,
in/2]), `X.weight_scale` (float32 scalar for FP8; FP8 [out, in/16] for NVFP4), `X.weight_scale_2` (NVFP4: the
float32 per-tensor scale) and `X.input_scale` (float32 scalar); everything else in bf16 (routers float32); routed
experts one tensor per expert (`...experts.E.up_proj.weight`), weights named as on the hub (`backbone.*` for
Nemotron-H: transformers' conversion mapping is reverted). `hf_quant_config.json` holds
{"producer", "quantization": {"quant_algo": "FP8" | "NVFP4", "kv_cache_quant_algo", "exclude_modules", ...}}, and
config.json its `quantization_config` ({"quant_method": "modelopt", "quant_algo", "ignore", "config_groups"}).

Model Optimizer 0.47 with transformers 5.24 writes that, with one defect that `repair_exclude_names` undoes: its
`build_reverse_name_mapper` appends the sentinel ".\\x00modelopt_name_sentinel" to every excluded module name
before applying the reverse of transformers' rename `backbone. -> model.`, whose regex ("model.", the dot
unescaped) also matches inside the sentinel, so every `exclude_modules` / `ignore` entry comes out as
"backbone.layers.0.mixer.conv1d.\\x00backbone.pt_name_sentinel": a loader matching them would find no module and
load the bf16 layers as quantized.
"""

from __future__ import annotations

import contextlib
import fnmatch
import io
import json
import warnings
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from minipuzzle.checkpoint.dtypes import stored_bytes
from minipuzzle.checkpoint.write import atomic_dir, copy_tokenizer
from minipuzzle.quantize.configs import mtq

# Imports inside functions here are of optional packages (Model Optimizer, lm-eval, matplotlib, the MIP solver),
# loaded only where a feature uses them.

QUANT_CONFIG = "hf_quant_config.json"
SUMMARY = "quantize.json"
SCALE_SUFFIXES = (".weight_scale", ".weight_scale_2", ".input_scale", ".k_scale", ".v_scale")


def _repair(name: str) -> str:
    head, sep, _ = name.partition("\x00")
    if not sep:
        return name
    suffix = ".*" if name.endswith(".*") else "*" if name.endswith("*") else ""
    return head.removesuffix(".") + suffix


def repair_exclude_names(folder: Path) -> None:
    """Undo Model Optimizer 0.47's sentinel corruption of the excluded module names (module docstring) in
    hf_quant_config.json and config.json's quantization_config, in place."""
    qc_file, cfg_file = folder / QUANT_CONFIG, folder / "config.json"
    qc = json.loads(qc_file.read_text())
    q = qc["quantization"]
    q["exclude_modules"] = [_repair(n) for n in q.get("exclude_modules") or []]
    if isinstance(q.get("quantized_layers"), dict):
        q["quantized_layers"] = {_repair(k): v for k, v in q["quantized_layers"].items()}
    qc_file.write_text(json.dumps(qc, indent=4))
    cfg = json.loads(cfg_file.read_text())
    if "quantization_config" in cfg:
        cfg["quantization_config"]["ignore"] = [_repair(n) for n in cfg["quantization_config"].get("ignore", [])]
        cfg_file.write_text(json.dumps(cfg, indent=4))


def tensor_table(folder: str | Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """{name: (safetensors dtype, shape)} of every tensor of a checkpoint folder, read from the file headers."""

    out = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(f, "pt") as fh:
            for k in fh.keys():
                sl = fh.get_slice(k)
                out[k] = (sl.get_dtype(), tuple(sl.get_shape()))
    return out


def quantized_weights(table: dict) -> list[str]:
    """Names of the stored quantized weights: those with a `weight_scale` beside them."""
    return [k for k in table if k.endswith(".weight") and k.removesuffix("weight") + "weight_scale" in table]


def weight_bytes(folder: str | Path) -> dict[str, int]:
    """Bytes of an exported checkpoint's tensors by role: `quantized` (the FP8 / packed NVFP4 weights), `scales`
    (weight, per-block, per-tensor and input scales), `kept` (everything stored in bf16 / float32), `total`; and
    `quantized_params` / `kept_params`, the model parameters each holds (an NVFP4 byte holds two)."""
    table = tensor_table(folder)
    quant = set(quantized_weights(table))

    def nbytes(k: str) -> int:
        dt, shape = table[k]
        return stored_bytes(dt) * int(torch.Size(shape).numel())

    out = {"quantized": 0, "scales": 0, "kept": 0, "quantized_params": 0, "kept_params": 0}
    for k, (dt, shape) in table.items():
        if k in quant:
            out["quantized"] += nbytes(k)
            out["quantized_params"] += int(torch.Size(shape).numel()) * (2 if dt == "U8" else 1)
        elif k.endswith(SCALE_SUFFIXES):
            out["scales"] += nbytes(k)
        else:
            out["kept"] += nbytes(k)
            out["kept_params"] += int(torch.Size(shape).numel())
    out["total"] = out["quantized"] + out["scales"] + out["kept"]
    return out


def check_exclusions(folder: Path) -> None:
    """Every excluded module pattern names stored tensors, none of them quantized: what a loader relies on. A
    failure is a bug in the export (ours or Model Optimizer's), not a user error."""
    table = tensor_table(folder)
    quant = {k.removesuffix(".weight") for k in quantized_weights(table)}
    mods = {k.rsplit(".", 1)[0] for k in table}
    for pat in json.loads((folder / QUANT_CONFIG).read_text())["quantization"].get("exclude_modules") or []:
        hit = [m for m in mods if fnmatch.fnmatch(m, pat) or fnmatch.fnmatch(m + ".", pat)]
        if not hit or any(m in quant for m in hit):
            raise RuntimeError(f"exported exclude_modules entry {pat!r} names {'no' if not hit else 'a quantized'} module")


def cast_kept(state: dict[str, torch.Tensor], dtype: torch.dtype, keep_float32: tuple[str, ...] = ()) -> dict:
    """`state` (exported names -> tensors) with every unquantized floating tensor in `dtype`; quantized weights,
    scales and the names containing one of `keep_float32` (the routers) as they are."""
    quant = set(quantized_weights(state))
    return {k: t.to(dtype) if (t.dtype.is_floating_point and t.dtype != dtype and t.element_size() > 1
                               and k not in quant and not k.endswith(SCALE_SUFFIXES)
                               and not any(n in k for n in keep_float32)) else t
            for k, t in state.items()}  # fmt: skip


def store_kept_in(folder: Path, dtype: torch.dtype, keep_float32: tuple[str, ...] = ()) -> None:
    """Rewrite the exported shards with every unquantized floating tensor in `dtype` (scales and the names
    containing one of `keep_float32`, the routers, stay float32), and config.json's dtype.

    Model Optimizer 0.47 writes unquantized tensors in the model's own dtype whatever its `dtype` argument says,
    so the kept tensors are cast here, one shard in memory at a time. (It packs the quantized weights in the
    config's dtype, bf16 for a model loaded from a bf16 checkpoint even when it computes in float32: about 3 % of
    FP8 values then sit one step from float32 round-to-nearest of weight / scale. The streamed export does the
    same, so the two paths agree byte for byte.)"""

    for f in sorted(folder.glob("*.safetensors")):
        save_file(cast_kept(load_file(f), dtype, keep_float32), f, metadata={"format": "pt"})
    cfg_file = folder / "config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["dtype"] = str(dtype).removeprefix("torch.")
    cfg_file.write_text(json.dumps(cfg, indent=4))


def export_quantized(model, out: str | Path, *, summary: dict, tokenizer_from: str | Path | None = None,
                     overwrite: bool = False, dtype: torch.dtype = torch.bfloat16,
                     extra_files: dict[str, str] | None = None) -> Path:  # fmt: skip
    """Write `model` (quantized by `calibrate.quantize_model`; the export packs its weights in place, so it is
    spent afterwards) to `out` atomically through Model Optimizer's `export_hf_checkpoint`, unquantized tensors
    in `dtype`; then repair the excluded names, check them, copy the tokenizer and write `quantize.json`
    (`summary` plus the bytes by role, `weight_bytes`) and `extra_files` ({file name: text})."""

    mtq()  # imports modelopt.torch quietly before its exporter
    from modelopt.torch.export import export_hf_checkpoint

    keep_float32 = tuple(getattr(model, "_keep_in_fp32_modules_strict", None) or ())
    with atomic_dir(out, overwrite) as tmp:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            export_hf_checkpoint(model, export_dir=tmp)
        store_kept_in(tmp, dtype, keep_float32)
        repair_exclude_names(tmp)
        check_exclusions(tmp)
        copy_tokenizer(tokenizer_from, tmp)
        doc = {**summary, "bytes": weight_bytes(tmp)}
        (tmp / SUMMARY).write_text(json.dumps(doc, indent=2) + "\n")
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
    return Path(out)


def quantization_of(path: str | Path) -> str | None:
    """The quantization a checkpoint folder already carries ("FP8", "NVFP4", or the config's method), or None."""
    path = Path(path)
    if (path / QUANT_CONFIG).is_file():
        return json.loads((path / QUANT_CONFIG).read_text())["quantization"].get("quant_algo") or "quantized"
    cfg = path / "config.json"
    if cfg.is_file():
        qc = json.loads(cfg.read_text()).get("quantization_config")
        if qc:
            return str(qc.get("quant_algo") or qc.get("quant_method") or "quantized")
    return None
