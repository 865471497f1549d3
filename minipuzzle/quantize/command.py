"""`minipuzzle quantize`: a bf16 checkpoint -> FP8 / NVFP4 serving checkpoint (Model Optimizer PTQ)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from minipuzzle.cli_options import settings_command
from minipuzzle.hardware import HardwareOptions, resolve
from minipuzzle.settings import DataOptions, DeviceOptions, QuantizeSettings

# Imports inside functions here keep torch and transformers unloaded until a function needs them, so `--help`
# and the offline commands (dry runs, info, search) start fast.


def register(app: typer.Typer) -> None:
    app.command("quantize")(quantize)


@settings_command(DataOptions, into="text", required=("data",),
                  helps={"data": "Calibration text: .txt/.jsonl/.parquet, a folder, or a hub dataset."})  # fmt: skip
@settings_command(DeviceOptions, into="compute")
@settings_command(HardwareOptions, into="hardware")
@settings_command(QuantizeSettings)
def quantize(
    model: Annotated[str, typer.Argument(help="bf16 checkpoint folder (a pruned / distilled student), preset or "
                                         "cached hub id.")],  # fmt: skip
    text: dict,
    output: Annotated[Path, typer.Option("--output", "-o", help="Folder for the quantized checkpoint.")],
    compute: dict | None = None,
    hardware: dict | None = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output folder.")] = False,
    settings: dict | None = None,
) -> None:
    """Quantize a checkpoint to FP8 or NVFP4 with NVIDIA Model Optimizer and export it for vLLM / TensorRT-LLM.

    Post-training quantization: calibration windows from --data set each quantizer's scale; attention, the Mamba
    conv1d, MoE routers, embeddings and the LM head stay in bf16 (Model Optimizer's hybrid recipe; --keep and
    --quantize-modules override per module pattern). The output holds safetensors with scales, hf_quant_config.json,
    config.json's quantization_config and quantize.json (bytes by role); `minipuzzle eval` evaluates it.
    NVFP4 needs a CUDA GPU.

    Example: minipuzzle quantize runs/demo/distill --precision fp8 --data calib.jsonl --samples 128 -o runs/demo/fp8
    """

    from minipuzzle.quantize.folder import quantize_to_folder

    st, src, dev = QuantizeSettings(**settings), DataOptions(**text), DeviceOptions(**compute)
    doc = quantize_to_folder(model, output, st, src.data, split=src.split, column=src.text_column,
                             streaming=src.streaming, device=dev.device, dtype=dev.dtype, overwrite=overwrite,
                             progress=True, hardware=resolve(None, hardware))  # fmt: skip
    b = doc["bytes"]
    Console().print(
        f"{doc['precision']}: {len(doc['quantized_modules'])} modules quantized; weights {b['total'] / 2**20:.2f} MiB "
        f"({b['quantized'] / 2**20:.2f} quantized, {b['scales'] / 2**10:.1f} KiB scales, {b['kept'] / 2**20:.2f} "
        f"kept in bf16/fp32); written to {output}", highlight=False)  # fmt: skip
