"""Quantization-aware distillation (QAD): the student trains through Model Optimizer's fake quantizers.

    minipuzzle distill ... --quantize fp8|nvfp4

The student gets the hybrid config of post-training quantization (`quantize.configs.hybrid_config`: Mamba and
MLP / expert projections quantized; attention, conv1d, routers, embeddings and LM head kept), calibrated once
before step 1 with Model Optimizer's "max" algorithm; the teacher stays unquantized. Every forward then rounds
the quantized weights and inputs to the FP8 / NVFP4 grid, and the backward passes gradients straight through the
rounding to the float32 master weights. The scales stay as calibrated (the quantizers' `_amax` buffers are part
of the student's state dict, so they travel in every checkpoint and a resumed run reads them back instead of
calibrating again). The run ends with the serving checkpoint `minipuzzle quantize` writes (`export_quantized`).

Under torchrun the student is quantized after FSDP2 has sharded it: calibration runs through the objective (its
root unit gathers what the student's blocks do not own), every process on the whole first batch, and the export
gathers the student into one whole float32 copy on the main process (Model Optimizer exports a model in memory),
which that process's host (FP8) or device (NVFP4) must hold beside its shard. The memory plan counts it
(`memory.train._train_host`; an NVFP4 export that one GPU cannot hold is refused before the run).

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
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

import minipuzzle.distill.state as state
from minipuzzle.checkpoint.build import build_model
from minipuzzle.distill.stream import WindowStream
from minipuzzle.errors import UserError
from minipuzzle.quantize.calibrate import quantize_model
from minipuzzle.quantize.configs import BASE_CONFIG, check_runnable, hybrid_config, mtq, quantized_modules
from minipuzzle.quantize.export import export_quantized
from minipuzzle.settings import DistillSettings

AMAX = "_amax"


def check_quantize(cfg: DistillSettings, device: torch.device) -> None:
    """Refuse NVFP4 off CUDA (`UserError`, one line) before any model loads: Model Optimizer simulates its block
    scales only there."""
    if cfg.quantize is not None:
        check_runnable(cfg.quantize, device)


def calibration_windows(cfg: DistillSettings, train: WindowStream) -> torch.Tensor:
    """The first training batch [batch_size, seq_len], read from a copy of `train` (its position is unchanged)."""
    peek = WindowStream(cfg.data, train.tokenizer, cfg.seq_len, streaming=cfg.streaming, split=cfg.split,
                        column=cfg.text_column, state=copy.deepcopy(train.state))  # fmt: skip
    return peek.take(cfg.batch_size)


def quantize_student(objective, cfg: DistillSettings, train: WindowStream, d, autocast) -> None:
    """Fake-quantize the objective's student (in place, sharded or not) to `cfg.quantize`: calibrated on the first
    training batch (`calibration_windows`) one micro-batch at a time under the training's `autocast` context, or,
    when OUT.partial holds a checkpoint to resume, only given its quantizers, whose ranges the checkpoint then
    fills (`restore_points`). `d`: the run's `parallel.Dist`."""
    student = objective.student
    check_runnable(cfg.quantize, d.device)
    last = state.latest_checkpoint(cfg.run_dir)
    if last is not None:
        _attach_quantizers(student, cfg.quantize)
        restore_points(student, last)
        return
    windows = calibration_windows(cfg, train)
    micro = max(1, cfg.batch_size // (d.world * (cfg.grad_accum or 1)))
    was_training = objective.training
    objective.eval()
    with autocast:
        if d.enabled:
            _calibrate_sharded(objective, cfg.quantize, windows, micro)
        else:
            quantize_model(student, cfg.quantize, windows, batch_size=micro)
    objective.train(was_training)


def _calibrate_sharded(objective, precision: str, windows: torch.Tensor, micro: int) -> None:
    """Calibrate an FSDP2-sharded student: every process runs all `windows` through the objective (its root unit
    gathers the embeddings and head that the student's own forward would find sharded), so every process records
    the same ranges; Model Optimizer then takes their maximum over the processes anyway (its data-parallel sync)."""
    device = next(objective.student.parameters()).device

    @torch.no_grad()
    def loop(_model) -> None:
        for i in range(0, len(windows), micro):
            objective(windows[i : i + micro].to(device), evaluate=True)

    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        mtq().quantize(objective.student, hybrid_config(precision), forward_loop=loop)
    # FSDP2 keeps the root unit gathered after a forward until a backward reshards it; without one, the optimizer
    # built next would hold the gathered parameters, not the shards the training updates.
    for m in objective.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def _attach_quantizers(student, precision: str) -> None:
    """The hybrid config's quantizers on `student`, with no ranges: they come from a checkpoint. Not calibrated
    at all (`algorithm: None`): Model Optimizer's max calibration would also reduce the ranges over the
    processes, a collective that the main process alone (the export's gathered copy) would wait on forever."""
    cfg = {**hybrid_config(precision), "algorithm": None}
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        mtq().quantize(student, cfg, forward_loop=None)


def restore_points(student, checkpoint: Path) -> int:
    """Give every quantizer whose range checkpoint `checkpoint` stores an `_amax` buffer of the stored shape (zeros
    until the checkpoint is loaded into it), so that loading the checkpoint restores the calibrated ranges; returns
    how many. A quantizer the checkpoint names but the student lacks is a run from another config: one line."""
    meta = FileSystemReader(str(checkpoint)).read_metadata().state_dict_metadata
    shapes = {k.removeprefix("model."): (tuple(md.size), md.properties.dtype) for k, md in meta.items()
              if k.startswith("model.") and k.endswith("." + AMAX)}  # fmt: skip
    missing = _placeholders(student, shapes)
    if missing:
        raise UserError(f"{checkpoint} holds the quantizer {missing}, which this student does not have: delete "
                        f"{checkpoint.parent.parent} to start over")  # fmt: skip
    return len(shapes)


def _placeholders(model, shapes: dict[str, tuple[tuple[int, ...], torch.dtype]]) -> str | None:
    """Zero `_amax` buffers of the given {state dict key: (shape, dtype)} on `model`'s quantizers, so that a state
    dict holding those keys loads into them; returns the first key naming no quantizer of `model`, else None."""
    modules = dict(model.named_modules())
    device = next(model.parameters()).device
    for key, (shape, dtype) in shapes.items():
        q = modules.get(key.removesuffix("." + AMAX))
        if q is None or not hasattr(q, "amax"):
            return key.removesuffix("." + AMAX)
        q.amax = torch.zeros(shape, dtype=dtype, device=device)
    return None


def export_student(student, cfg: DistillSettings, s_ckpt, tok_dir: Path, extra_files: dict[str, str], d) -> None:
    """Write the trained fake-quantized `student` as the serving checkpoint `minipuzzle quantize` writes
    (`quantize.export.export_quantized`: quantized weights with their scales, kept tensors in bf16, quantize.json),
    with `extra_files` (metrics.jsonl, distill.json) beside it, to OUT. The export packs the student's weights in
    place. A sharded student is gathered into a whole one on the main process first (`_gathered`): Model
    Optimizer's exporter takes a model in memory, so that process's host holds the float32 student."""
    model = _gathered(student, s_ckpt, cfg.quantize, d) if d.enabled else student
    if model is None:
        return
    model.eval()
    summary = {
        "source": str(cfg.student), "precision": cfg.quantize, "base_config": BASE_CONFIG[cfg.quantize],
        "quantized_modules": quantized_modules(model), "qad": True,
        "calibration": {"data": str(cfg.data), "windows": cfg.batch_size, "seq_len": cfg.seq_len,
                        "from": "the first training batch, before step 1"},
    }  # fmt: skip
    export_quantized(model, cfg.output_path, summary=summary, tokenizer_from=tok_dir, overwrite=cfg.overwrite,
                     dtype=torch.bfloat16, extra_files=extra_files)  # fmt: skip


def _gathered(student, s_ckpt, precision: str, d):
    """On the main process, a whole float32 copy of the sharded fake-quantized `student` (weights and quantizer
    ranges), on the host for FP8 (Model Optimizer exports FP8 there) and on the device for NVFP4 (CUDA only); None
    on the other processes, which take part in every gather."""
    where = d.device if precision == "nvfp4" else torch.device("cpu")
    full = {}
    for name, t in student.state_dict().items():
        t = t.full_tensor() if isinstance(t, DTensor) else t
        if d.main:
            full[name] = t.detach().to(where, copy=True)
        del t
    if not d.main:
        return None
    model = build_model(s_ckpt.layout, s_ckpt.config)  # on the meta device: the gathered tensors are assigned
    model.load_state_dict({n: t for n, t in full.items() if not n.endswith("." + AMAX)}, strict=True, assign=True)
    _attach_quantizers(model, precision)
    _placeholders(model, {n: (tuple(t.shape), t.dtype) for n, t in full.items() if n.endswith("." + AMAX)})
    model.load_state_dict(full, strict=True)
    return model
