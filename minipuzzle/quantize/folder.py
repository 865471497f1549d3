"""`quantize_to_folder`: a bf16 checkpoint -> calibrated FP8 / NVFP4 model -> exported serving checkpoint."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from minipuzzle.checkpoint.dtypes import resolve_device
from minipuzzle.checkpoint.resolve import resolve_checkpoint
from minipuzzle.checkpoint.write import check_output_dir
from minipuzzle.data import load_tokenizer, token_windows
from minipuzzle.errors import UserError
from minipuzzle.evaluate.placement import load_placed
from minipuzzle.hardware import resolve
from minipuzzle.memory import check, compute_hardware, eval_weight_share, model_facts
from minipuzzle.quantize.calibrate import quantize_model
from minipuzzle.quantize.configs import ARCH_PRECISION, BASE_CONFIG, check_runnable, quantized_modules
from minipuzzle.quantize.export import SUMMARY, export_quantized, quantization_of
from minipuzzle.quantize.plan import plan_quantize, quantize_launch
from minipuzzle.quantize.streamed import quantize_streamed
from minipuzzle.settings import QuantizeSettings


def check_source(path: Path) -> None:
    """A checkpoint that is already quantized cannot be calibrated again: one line naming its quantization."""

    algo = quantization_of(path)
    if algo is not None:
        raise UserError(f"{path} is already quantized ({algo}): quantize its bf16 source instead")


def quantize_to_folder(model: str | Path, out: str | Path, settings: QuantizeSettings, data: str | Path, *,
                       split: str = "train", column: str = "text", streaming: bool | None = None,
                       device: str | None = None, dtype: str | None = None, overwrite: bool = False,
                       progress: bool = False, hardware=None) -> dict:  # fmt: skip
    """Quantize checkpoint `model` to `settings.precision` with Model Optimizer and write the serving checkpoint
    to `out` (see `export.export_quantized`); returns its `quantize.json` summary.

    Calibration windows [samples, seq_len] come from `data` like every stage's (`data.token_windows`); the model
    is placed as the memory plan (`plan.plan_quantize`) on `hardware` (default: this machine) says, in `dtype`
    (auto: bf16 on a GPU, float32 on the CPU). Every input is checked (precision on this device, an already
    quantized source, module patterns, the plan) before anything is written; the folder appears whole or not at
    all. When no node holds the model (or `settings.stream` is True) the plan streams it: FP8 calibrated and exported
    block by block on the CPU in float32 (`streamed.quantize_streamed`), the same files as the whole-model export."""


    st, t0 = settings, time.time()
    check_output_dir(out, overwrite)
    dev, dt = resolve_device(device, dtype)
    check_runnable(st.precision, dev)
    path = resolve_checkpoint(str(model))
    check_source(path)
    layout, stored = model_facts(str(path))
    hw = compute_hardware(hardware or resolve(), str(dev))
    plan = plan_quantize(layout, hw, st, head=any("lm_head" in p for p in st.quantize_patterns()),
                         dtype=str(dt).removeprefix("torch."), stored_bytes=stored)  # fmt: skip
    check(hw, plan)
    launch = quantize_launch(plan)
    tok = load_tokenizer(path)
    windows = token_windows(data, tok, st.seq_len, st.samples, st.seed, split=split, column=column,
                            streaming=streaming)  # fmt: skip
    if launch["streaming"]:
        return _streamed(path, out, st, windows, launch, model=model, data=data, layout=layout, t0=t0,
                         overwrite=overwrite, progress=progress)  # fmt: skip
    net = load_placed(path, dt, dev, launch["devices"], eval_weight_share(layout, launch["devices"], launch["dtype"]))
    net = quantize_model(net, st.precision, windows, batch_size=launch["batch"], keep=st.keep_patterns(),
                         quantize=st.quantize_patterns(), progress=progress)  # fmt: skip
    summary = _summary(model, st, quantized_modules(net), data, windows, str(dev), dt, launch["batch"], layout, t0)
    export_quantized(net, out, summary=summary, tokenizer_from=path, overwrite=overwrite, dtype=torch.bfloat16)
    return json.loads((Path(out) / SUMMARY).read_text())


def _summary(model, st: QuantizeSettings, modules: list[str], data, windows: torch.Tensor, device: str,
             dt: torch.dtype, batch: int, layout, t0: float, streamed: bool = False) -> dict:  # fmt: skip
    """quantize.json's content before the export adds its bytes."""
    calibration = {"data": str(data), "windows": len(windows), "seq_len": windows.shape[1], "device": device,
                   "dtype": str(dt).removeprefix("torch."), "batch": batch}  # fmt: skip
    if streamed:
        calibration["streamed"] = True
    calibration["elapsed_s"] = round(time.time() - t0, 3)
    return {"source": str(model), "precision": st.precision, "base_config": BASE_CONFIG[st.precision],
            "settings": st.model_dump(), "quantized_modules": modules, "calibration": calibration,
            "arch_weight_bytes": layout.memory(ARCH_PRECISION[st.precision])["weights"],
            "params": layout.num_params()}  # fmt: skip


def _streamed(path: Path, out, st: QuantizeSettings, windows: torch.Tensor, launch: dict, *, model, data, layout,
              t0: float, overwrite: bool, progress: bool) -> dict:  # fmt: skip
    """The streamed path of `quantize_to_folder`, as the plan's geometry says (micro-batch, output shard bytes)."""
    summary = _summary(model, st, [], data, windows, "cpu", torch.float32, launch["batch"], layout, t0, True)
    quantize_streamed(path, out, windows, precision=st.precision, keep=st.keep_patterns(),
                      quantize=st.quantize_patterns(), batch_size=launch["batch"], summary=summary,
                      max_shard_bytes=launch["shard_bytes"], overwrite=overwrite, progress=progress)  # fmt: skip
    return json.loads((Path(out) / SUMMARY).read_text())
