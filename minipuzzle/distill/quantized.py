"""Quantization-aware distillation (QAD): the student trains through Model Optimizer's fake quantizers.

    minipuzzle distill ... --quantize fp8|nvfp4

The student gets the hybrid config of post-training quantization (`quantize.configs.hybrid_config`: Mamba and
MLP / expert projections quantized; attention, conv1d, routers, embeddings and LM head kept), calibrated once
before step 1 with Model Optimizer's "max" algorithm; the teacher stays unquantized. Every forward then rounds
the quantized weights and inputs to the FP8 / NVFP4 grid, and the backward passes gradients straight through the
rounding to the float32 master weights. The scales stay as calibrated (the quantizers' `_amax` buffers are part
of the student's state dict, so they travel in every checkpoint and a resumed run reads them back instead of
calibrating again). The run ends with the serving checkpoint `minipuzzle quantize` writes (`export_quantized`).

Calibration uses the first training batch (the windows step 1 trains on), read from a copy of the stream so the
stream itself does not move: the held-out windows stay unseen by anything that sets the student's numbers, so
the held-out KL still measures generalisation, and a run without held-out windows can be quantized too.
"""

from __future__ import annotations

import contextlib
import copy
import io
import warnings
from pathlib import Path

import torch

import minipuzzle.distill.state as state
from minipuzzle.distill.stream import WindowStream
from minipuzzle.errors import UserError
from minipuzzle.quantize.calibrate import quantize_model
from minipuzzle.quantize.configs import BASE_CONFIG, check_runnable, hybrid_config, mtq, quantized_modules
from minipuzzle.settings import DistillSettings

AMAX = "_amax"


def check_quantize(cfg: DistillSettings, device: torch.device, world: int) -> None:
    """Refuse (`UserError`, one line) what QAD cannot run, before any model loads: NVFP4 off CUDA (Model
    Optimizer simulates its block scales only there) and more than one process (`check_processes`)."""
    if cfg.quantize is None:
        return
    check_runnable(cfg.quantize, device)
    check_processes(cfg, world)


def check_processes(cfg: DistillSettings, world: int) -> None:
    """QAD runs in one process. Model Optimizer's quantizers do calibrate and train on an FSDP2-sharded student
    (through the root unit's forward), but calibrating through the sharded objective, giving a sharded student its
    quantizers on resume, and gathering it whole for the export are not implemented: refused in one line."""
    if cfg.quantize is not None and world > 1:
        raise UserError(f"--quantize {cfg.quantize} runs in one process only (QAD under FSDP2 is not implemented): "
                        f"launch it on one process, not {world} (recipe: distill.launcher: local)")  # fmt: skip


def calibration_windows(cfg: DistillSettings, train: WindowStream) -> torch.Tensor:
    """The first training batch [batch_size, seq_len], read from a copy of `train` (its position is unchanged)."""
    peek = WindowStream(cfg.data, train.tokenizer, cfg.seq_len, streaming=cfg.streaming, split=cfg.split,
                        column=cfg.text_column, state=copy.deepcopy(train.state))  # fmt: skip
    return peek.take(cfg.batch_size)


def quantize_student(student, cfg: DistillSettings, train: WindowStream, device: torch.device, autocast) -> None:
    """Fake-quantize `student` (a `NemotronHForCausalLM`, in place) to `cfg.quantize`: calibrated on the first
    training batch (`calibration_windows`) one micro-batch at a time under the training's `autocast` context, or,
    when OUT.partial holds a checkpoint to resume, only given its quantizers, whose scales the checkpoint then
    fills (`restore_points`)."""
    check_runnable(cfg.quantize, device)
    last = state.latest_checkpoint(cfg.run_dir)
    if last is not None:
        _attach_quantizers(student, cfg.quantize)
        restore_points(student, last)
        return
    windows = calibration_windows(cfg, train)
    micro = max(1, cfg.batch_size // (cfg.grad_accum or 1))
    was_training = student.training
    student.eval()
    with autocast:
        quantize_model(student, cfg.quantize, windows, batch_size=micro)
    student.train(was_training)


def _attach_quantizers(student, precision: str) -> None:
    """The hybrid config's quantizers on `student`, not calibrated on data (Model Optimizer still sets the
    weight quantizers' ranges from the weights; the checkpoint overwrites them)."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        mtq().quantize(student, hybrid_config(precision), forward_loop=None)


def restore_points(student, checkpoint: Path) -> int:
    """Give every quantizer whose range checkpoint `checkpoint` stores an `_amax` buffer of the stored shape (zeros
    until the checkpoint is loaded into it), so that loading the checkpoint restores the calibrated scales; returns
    how many. A quantizer the checkpoint names but the student lacks is a run from another config: one line."""
    from torch.distributed.checkpoint import FileSystemReader

    meta = FileSystemReader(str(checkpoint)).read_metadata().state_dict_metadata
    modules = dict(student.named_modules())
    n = 0
    for key, md in meta.items():
        if not (key.startswith("model.") and key.endswith("." + AMAX)):
            continue
        name = key.removeprefix("model.").removesuffix("." + AMAX)
        q = modules.get(name)
        if q is None or not hasattr(q, "amax"):
            raise UserError(f"{checkpoint} holds the quantizer {name}, which this student does not have: delete "
                            f"{checkpoint.parent.parent} to start over")  # fmt: skip
        q.amax = torch.zeros(tuple(md.size), dtype=md.properties.dtype, device=next(student.parameters()).device)
        n += 1
    return n


def quantizer_ranges(student) -> dict[str, torch.Tensor]:
    """{quantizer module name: its `_amax`} of every calibrated quantizer of `student` (copies on the host)."""
    return {k.removesuffix("." + AMAX): v.detach().cpu().clone() for k, v in student.state_dict().items()
            if k.endswith("." + AMAX)}  # fmt: skip


def export_student(student, cfg: DistillSettings, out: Path, tok_dir: Path, extra_files: dict[str, str]) -> Path:
    """Write the trained fake-quantized `student` as the serving checkpoint `minipuzzle quantize` writes
    (`quantize.export.export_quantized`: quantized weights with their scales, kept tensors in bf16, quantize.json),
    with `extra_files` (metrics.jsonl, distill.json) beside it. The export packs the student's weights in place."""
    from minipuzzle.quantize.export import export_quantized

    student.eval()
    summary = {
        "source": str(cfg.student), "precision": cfg.quantize, "base_config": BASE_CONFIG[cfg.quantize],
        "quantized_modules": quantized_modules(student), "qad": True,
        "calibration": {"data": str(cfg.data), "windows": cfg.batch_size, "seq_len": cfg.seq_len,
                        "from": "the first training batch, before step 1"},
    }  # fmt: skip
    return export_quantized(student, out, summary=summary, tokenizer_from=tok_dir, overwrite=cfg.overwrite,
                            dtype=torch.bfloat16, extra_files=extra_files)  # fmt: skip
