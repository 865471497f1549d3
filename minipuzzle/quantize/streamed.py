"""Streamed FP8 quantization: calibrate and export a checkpoint one block at a time, never the whole model in memory.

The whole-model path (`folder.quantize_to_folder` through `calibrate.quantize_model` and `export.export_quantized`)
needs the model resident. Here each Nemotron-H block is read from the checkpoint (`score.layerwise.StreamedStack`),
fake-quantized by Model Optimizer with the same hybrid config, calibrated on the windows' hidden states, exported
by Model Optimizer's own per-module export handlers and written to the shards, then dropped; its unquantized
output is the next block's input.

Why this reproduces the whole-model export:
- names: the block is wrapped so that its modules carry their whole-model names (`model.layers.3.mixer.in_proj`),
  so the config's wildcards and `--keep` / `--quantize-modules` patterns match exactly as inside the model;
- calibration: Model Optimizer's "max" calibration runs the forward with every quantizer only recording amax,
  not rounding, so the whole model's layer i sees the unquantized output of layers < i; the streamed loop feeds
  each block exactly that (the block's own calibration forward), in the same micro-batches;
- export: weights, scales and names come from Model Optimizer's per-module handlers and per-tensor post-processing
  (the ones its own offloaded-model exporter uses), then the same `backbone.*` renaming, bf16 cast of kept
  tensors and exclude-name repair as `export.export_quantized`; `hf_quant_config.json` and config.json's
  `quantization_config` come from Model Optimizer's `get_quant_config` on the model quantized on the meta device
  (configuration only: no weights, no calibration).

Embeddings, final norm and LM head are stored unquantized, as the hybrid config keeps them; a module pattern that
would quantize one of them is refused in streamed mode. NVFP4 is refused (whole-model and CUDA-only).
"""

from __future__ import annotations

import contextlib
import fnmatch
import io
import json
import os
import warnings
from pathlib import Path

import torch
from torch import nn

from minipuzzle.checkpoint.build import build_model
from minipuzzle.checkpoint.read import Checkpoint
from minipuzzle.checkpoint.write import SHARD_BYTES, ShardWriter, atomic_dir, copy_tokenizer
from minipuzzle.errors import UserError
from minipuzzle.progress import track
from minipuzzle.quantize.configs import check_patterns, hybrid_config, module_pattern, mtq, quantized_modules
from minipuzzle.quantize.export import SUMMARY, _repair, cast_kept, check_exclusions, weight_bytes
from minipuzzle.score.layerwise import StreamedStack, block_forward

# Model Optimizer's export internals are imported inside the functions that use them: the package is optional (the
# quant extra), and `minipuzzle quantize --help` should not load it.

# The modules outside the blocks: stored unquantized in streamed mode (the hybrid config keeps them).
OUTSIDE = ("model.embeddings", "model.norm_f", "lm_head")
# The environment variable with which Model Optimizer skips its check that a config quantizes some weight.
SKIP_CHECK = "MODELOPT_SKIP_WEIGHT_QUANT_CHECK"
# Model Optimizer's FP8 KV-cache bound, passed to its per-tensor post-processing (no KV cache is quantized here).
KV_CACHE_MAX_BOUND = 448


def check_streamable(precision: str, model_names: list[str], keep: list[str], quantize: list[str]) -> None:
    """Streamed mode quantizes FP8 blocks only: NVFP4, and a `--quantize-modules` pattern naming the embeddings,
    final norm or LM head, are refused in one line; unknown patterns as in the whole-model path."""
    if precision != "fp8":
        raise UserError(f"streamed quantization supports fp8 only, not {precision} (nvfp4 calibrates the whole "
                        "model on a CUDA GPU)")  # fmt: skip
    for p in quantize:
        hit = [n for n in fnmatch.filter(model_names, module_pattern(p)) if n.startswith(OUTSIDE)]
        if hit:
            raise UserError(f"--quantize-modules pattern {p!r} names {hit[0]}, which streamed quantization keeps "
                            "unquantized: quantize the whole model instead")  # fmt: skip


class _Named(nn.Module):
    """Block i under its whole-model name `model.layers.i`, so quantizer names and patterns match as in the model."""

    def __init__(self, i: int, block: nn.Module):
        super().__init__()
        self.model = nn.Module()
        self.model.layers = nn.Module()
        self.model.layers.add_module(str(i), block)
        # Model Optimizer's conversion reads the model's config (it forces eager experts there, whose matmuls its
        # quantizer hooks see); the block's own config object stands in for the model's.
        self.config = block.config


def _quiet():
    """Model Optimizer prints per-module lines and warns about the untested transformers release."""
    stack = contextlib.ExitStack()
    stack.enter_context(warnings.catch_warnings())
    warnings.simplefilter("ignore")
    stack.enter_context(contextlib.redirect_stdout(io.StringIO()))
    return stack


@contextlib.contextmanager
def _no_weight_check():
    """Model Optimizer refuses a config that enables no weight quantizer of the model it converts (patterns that
    match nothing). A single block may have none (attention, a layer under --keep): the whole model, converted on
    the meta device first, has passed that check, so it is skipped per block through the variable Model
    Optimizer reads for a pipeline stage holding none of the targeted modules, then restored."""
    old = os.environ.get(SKIP_CHECK)
    os.environ[SKIP_CHECK] = "1"
    try:
        yield
    finally:
        if old is None:
            del os.environ[SKIP_CHECK]
        else:
            os.environ[SKIP_CHECK] = old


@torch.no_grad()
def calibrate_block(i: int, block: nn.Module, states: torch.Tensor, cfg: dict, batch_size: int) -> nn.Module:
    """Fake-quantize block i with `cfg` and calibrate it on residual states [N, T, h]; `states` become the block's
    unquantized outputs (the next block's calibration input), in place. Returns the wrapper (`_Named`)."""
    named = _Named(i, block)

    def loop(_):
        # Calibration mode only records amax, so this forward is the unquantized block's: its output is what the
        # whole-model calibration hands the next layer.
        for s in range(0, states.shape[0], batch_size):
            states[s : s + batch_size] = block_forward(block, states[s : s + batch_size]).to(states.dtype)

    with _quiet(), _no_weight_check():
        return mtq().quantize(named, cfg, forward_loop=loop)


def quantized_meta_model(meta: nn.Module, cfg: dict):
    """`meta` (the checkpoint's model on the meta device) converted by `mtq.quantize` with `cfg` and no
    calibration: its quantizers are configured (enabled, format) as in the calibrated model, which is all Model
    Optimizer's `get_quant_config` and the exporter's name mapping read."""
    with _quiet():
        return mtq().quantize(meta, cfg, forward_loop=None)


def hf_quant_config(meta) -> dict:
    """hf_quant_config.json's content as Model Optimizer's exporter builds it, names already on the hub
    (`backbone.*`, repaired as `export.repair_exclude_names` repairs them)."""
    from modelopt.torch.export.quant_aware_conversion import build_reverse_name_mapper, revert_quant_config_names
    from modelopt.torch.export.quant_utils import get_quant_config

    qc = get_quant_config(meta)
    revert_quant_config_names(qc["quantization"], build_reverse_name_mapper(meta))
    q = qc["quantization"]
    q["exclude_modules"] = [_repair(n) for n in q.get("exclude_modules") or []]
    return qc


def export_dtype(meta) -> torch.dtype:
    """The dtype Model Optimizer's exporter packs weights in when given none, as `export.export_quantized` calls
    it: the config's dtype (bf16 for a bf16 checkpoint, whatever the calibration dtype), else the parameters'.
    Packing in bf16 rounds weight / scale once in bf16 before the FP8 cast, so a few percent of FP8 values land
    one step from the float32 round-to-nearest; the streamed export does the same to write the same bytes."""
    from modelopt.torch.export.unified_export_hf import _resolve_export_dtype

    return _resolve_export_dtype(meta, None)


@torch.no_grad()
def export_block(named: nn.Module, meta, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The exported tensors of one calibrated block (`_Named`), hub names -> tensors: Model Optimizer's
    per-module export handlers (FP8 weight [out, in], float32 scalar weight_scale / input_scale; routed experts
    split one module per expert), its per-tensor post-processing, then its quant-aware reverse renaming with the
    whole model's rules. `dtype`: the exporter's (`export_dtype`), in which it divides weights by their scales."""
    from modelopt.torch.export.quant_aware_conversion import revert_weight_conversion_quant_aware
    from modelopt.torch.export.quant_utils import _postprocess_single_tensor
    from modelopt.torch.export.registry import ExportContext
    from modelopt.torch.export.unified_export_hf import _dispatch_export_handler, _prepare_moe_inputs
    from modelopt.torch.quantization.plugins.huggingface import _reconstruct_fused_moe_linear

    with _quiet():
        _prepare_moe_inputs(named, dtype, False)
        ctx = ExportContext(model=named, dtype=dtype, is_modelopt_qlora=False)
        for name, sub in named.named_modules():
            _dispatch_export_handler(name, sub, ctx)
        _reconstruct_fused_moe_linear(named)
    state = {}
    for k, t in named.state_dict().items():
        key, value = _postprocess_single_tensor(k, t, KV_CACHE_MAX_BOUND, None, False)
        if key is not None and value is not None:
            state[key] = value
    return revert_weight_conversion_quant_aware(meta, state)


def _outside(ckpt: Checkpoint, meta, names: tuple[str, ...], keep_float32) -> dict[str, torch.Tensor]:
    """The unquantized tensors outside the blocks (`OUTSIDE` modules' weights), hub-named and in bf16."""
    from modelopt.torch.export.quant_aware_conversion import revert_weight_conversion_quant_aware

    state = {n: ckpt.get(ckpt.source_of(n)).float() for n in names}
    return cast_kept(revert_weight_conversion_quant_aware(meta, state), torch.bfloat16, keep_float32)


def _write_configs(folder: Path, meta, qc: dict) -> None:
    """config.json and generation_config.json as the model's `save_pretrained` writes them, plus Model
    Optimizer's deployment edits and `quantization_config` (its `_write_hf_export_config`, which also writes
    hf_quant_config.json), dtype bf16."""
    from modelopt.torch.export.unified_export_hf import _sanitize_generation_config_for_save, _write_hf_export_config

    meta.config.save_pretrained(folder)
    # save_pretrained also writes the generation config (a source's own replaces it with the tokenizer's files).
    if getattr(meta, "generation_config", None) is not None:
        _sanitize_generation_config_for_save(meta)
        meta.generation_config.save_pretrained(folder)
    with _quiet():
        _write_hf_export_config(meta, qc, folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["dtype"] = "bfloat16"
    (folder / "config.json").write_text(json.dumps(cfg, indent=4))


def quantize_streamed(path: Path, out: str | Path, windows: torch.Tensor, *, precision: str = "fp8",
                      keep: list[str] = (), quantize: list[str] = (), batch_size: int = 8,
                      summary: dict, max_shard_bytes: int = SHARD_BYTES, overwrite: bool = False,
                      progress: bool = False) -> list[str]:  # fmt: skip
    """Quantize checkpoint `path` block by block on the CPU in float32 with calibration windows [N, T] and write
    the serving checkpoint to `out` atomically (the files `export.export_quantized` writes); returns the
    quantized module names. Resident at once: one block, the residual states [N, T, h] float32, one shard."""
    ckpt = Checkpoint(path)
    if ckpt.layout.tie_word_embeddings:
        raise UserError(f"{path} ties its LM head to the embeddings: streamed quantization writes untied heads only")
    plain = build_model(ckpt.layout, ckpt.config)  # patterns are checked on the model's own module names
    check_streamable(precision, [n for n, _ in plain.named_modules() if n], list(keep), list(quantize))
    check_patterns(plain, keep, quantize)
    cfg = hybrid_config(precision, keep, quantize)
    meta = quantized_meta_model(plain, cfg)
    dtype = export_dtype(meta)
    keep32 = tuple(getattr(meta, "_keep_in_fp32_modules_strict", None) or ())
    # Only the embeddings are used (for the first block's input); the final norm and head are never run here, so
    # placeholders stand for them instead of holding the head [V, h] through the whole pass.
    stack = StreamedStack(ckpt, ckpt.layout, ckpt.get("model.embeddings.weight").float(),
                          torch.ones(ckpt.layout.hidden_size), torch.empty(0))  # fmt: skip
    # Model Optimizer switches a model with fused experts to eager experts when it converts it (the meta model
    # shows it): every block runs so, also a MoE block the config leaves unquantized, as in the whole model.
    stack.config._experts_implementation = meta.config._experts_implementation or stack.config._experts_implementation
    states = torch.cat([stack.embed(windows[s : s + batch_size]) for s in range(0, len(windows), batch_size)])
    stack.embed_weight = None  # only the first block's input needs it
    with atomic_dir(out, overwrite) as tmp:
        writer = ShardWriter(tmp, max_shard_bytes, split_experts=False)
        for k, t in _outside(ckpt, meta, ("model.embeddings.weight",), keep32).items():
            writer.add(k, t)
        for i in track(range(ckpt.layout.num_layers), "streamed calibration", progress):
            with stack.block(i) as block:
                named = calibrate_block(i, block, states, cfg, batch_size)
                for k, t in cast_kept(export_block(named, meta, dtype), torch.bfloat16, keep32).items():
                    writer.add(k, t)
                del named
        for k, t in _outside(ckpt, meta, ("model.norm_f.weight", "lm_head.weight"), keep32).items():
            writer.add(k, t)
        writer.close()
        _write_configs(tmp, meta, hf_quant_config(meta))
        check_exclusions(tmp)
        copy_tokenizer(path, tmp)
        doc = {**summary, "quantized_modules": quantized_modules(meta), "bytes": weight_bytes(tmp)}
        (tmp / SUMMARY).write_text(json.dumps(doc, indent=2) + "\n")
    return doc["quantized_modules"]
