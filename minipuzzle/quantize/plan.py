"""The memory plan of the quantize stage, in `minipuzzle.memory`'s terms (one `StageMemory`, refused in one line when it
cannot fit).

Calibration holds the model in the compute dtype, whole on one device or spread over as few of one node's GPUs
as hold it (accelerate's device map, as eval places models: Model Optimizer's calibration runs the dispatched
model's forward), plus one micro-batch's forward activations, the LM head's logits chunk when the head is
quantized, and Model Optimizer's fake-quantized copy of the largest weight (its quantizer rounds a whole weight
per matmul: for routed experts, all of a layer's experts at once). The export then packs every quantized weight
on its device (a copy at the precision's bytes next to the original until it replaces it) and gathers the whole
exported state dict on the host to write it (`export_hf_checkpoint` has no streaming path for a model in
memory). A model that no node holds (or `stream: true`) is planned streamed (`streamed.quantize_streamed`, FP8
only): on the host in float32, one block read from the checkpoint at a time beside the calibration windows'
residual states, its fake-quantized weight copy and packed FP8 copy, and the output shard being filled.
"""

from __future__ import annotations

from minipuzzle.arch import Layout, _bits
from minipuzzle.checkpoint.dtypes import dtype_bytes
from minipuzzle.checkpoint.write import SHARD_BYTES
from minipuzzle.hardware import Hardware
from minipuzzle.memory import Geometry, Memory, StageMemory, eval_weight_share
from minipuzzle.memory.fitting import _fit_micro, _part, _problem, default_dtype, host_device, usable
from minipuzzle.memory.terms import _max_kind, _read_host, forward_bytes_per_token, largest_block, largest_tensor
from minipuzzle.quantize.calibrate import HEAD_CHUNK
from minipuzzle.quantize.configs import ARCH_PRECISION

NVFP4_CPU = "nvfp4 needs a CUDA GPU (Model Optimizer simulates NVFP4 block scales only on CUDA)"
# The share of the host a streamed quantization's output shard takes (held twice while it is written).
STREAMED_SHARD_SHARE = 0.1
NVFP4_STREAMED = ("streamed quantization (a model no node holds) supports fp8 only: nvfp4 calibrates the whole "
                  "model on CUDA GPUs")  # fmt: skip


def _largest_fake_quant(layout: Layout) -> int:
    """Elements Model Optimizer fake-quantizes at once: the largest weight, or a MoE layer's [E, out, in]."""
    experts = layout.n_routed_experts * layout.moe_intermediate_size * layout.hidden_size if layout.is_moe else 0
    return max(largest_tensor(layout), experts)


def exported_bytes(layout: Layout) -> int:
    """An upper bound of the exported checkpoint's bytes, which the exporter gathers on the host: every parameter
    in bf16 (a quantized one takes 1 byte in FP8, 0.5625 in NVFP4, scales included)."""
    return layout.num_params() * 2


def streamed_shard_bytes(layout: Layout, hw: Hardware) -> int:
    """The output shard size of a streamed quantization on host `hw`: `STREAMED_SHARD_SHARE` of its usable
    memory (a shard is buffered, then serialised whole), at least the largest tensor in bf16, at most
    `SHARD_BYTES`."""
    return min(SHARD_BYTES, max(largest_tensor(layout) * 2, int(STREAMED_SHARD_SHARE * usable(hw))))


def plan_streamed(layout: Layout, hw: Hardware, st, stored_bytes: int = 2) -> StageMemory:
    """The streamed quantize stage (`streamed.quantize_streamed`) on `hw`'s host in float32: "calibration" holds
    one block [largest_block] beside the residual states [samples, seq_len, h] float32, one micro-batch's forward
    and Model Optimizer's fake-quantized weight copy; "export" the block, its packed FP8 copy and the output shard
    (`Geometry.shard_bytes`, `streamed_shard_bytes`). NVFP4 is refused in the calibration part."""
    where = host_device(hw) or hw
    b, block = 4, largest_block(layout)
    states = st.samples * st.seq_len * (layout.hidden_size * b + 8)
    read = _read_host(layout, stored_bytes, True, compute=b, hw=where)
    shard = streamed_shard_bytes(layout, where)
    fwd = _max_kind(layout, forward_bytes_per_token, b, False)
    temp = _largest_fake_quant(layout) * b

    def calib(micro: int) -> Memory:
        return Memory(weights=block * b, activations=micro * st.seq_len * fwd + temp, host_buffers=states + read)

    mem, micro = _fit_micro(calib, where, min(st.batch_size, st.samples))
    geo = Geometry(dtype="float32", streaming=True, micro_batch=micro, shard_bytes=shard)
    calibration = _part("quantize", "calibration", geo, mem, where, note=f"block by block, shards of {shard:,} B")
    if st.precision != "fp8":
        calibration = calibration.model_copy(update={"fits": False, "problem": NVFP4_STREAMED})
    # Packing divides the largest weight by its scale in float32 beside its FP8 result; the block's packed copy;
    # safetensors serialises a full shard into one buffer beside its tensors (two shards at the write).
    export = Memory(weights=block * b, activations=largest_tensor(layout) * (b + 1) + block,
                    host_buffers=states + read + 2 * shard)  # fmt: skip
    return StageMemory(stage="quantize", parts=[calibration, _part("quantize", "export", geo, export, where)])


def plan_quantize(layout: Layout, hw: Hardware, st, *, head: bool = False, dtype: str | None = None,
                  stored_bytes: int = 2) -> StageMemory:  # fmt: skip
    """The quantize stage for `st` (a `settings.QuantizeSettings`) on `hw`: a "calibration" part (model placed on
    the fewest devices that hold it with a micro-batch of one, the largest micro-batch <= st.batch_size) and an
    "export" part. `head`: the LM head is quantized (it is calibrated then, `HEAD_CHUNK` positions at a time).
    When no node holds the model (`st.stream` None) or `st.stream` is True, the streamed plan (`plan_streamed`)."""
    if st.stream:
        return plan_streamed(layout, hw, st, stored_bytes)
    dt = default_dtype(hw, dtype)
    b, kernels = dtype_bytes(dt), hw.device == "cuda"
    fwd = _max_kind(layout, forward_bytes_per_token, b, kernels)
    temp = _largest_fake_quant(layout) * b
    logits = HEAD_CHUNK * layout.vocab_size * b if head else 0
    host = _read_host(layout, stored_bytes, False, compute=b, hw=hw) + st.samples * st.seq_len * 8
    packed = int(layout.num_params() * _bits(ARCH_PRECISION[st.precision]) / 8)
    most = hw.gpus_per_node if hw.device == "cuda" else 1

    def calib(k: int):
        share = eval_weight_share(layout, k, dt)
        return lambda micro: Memory(weights=share, activations=micro * st.seq_len * fwd + temp, logits=logits,
                                    host_buffers=host)  # fmt: skip

    def export(k: int) -> Memory:  # the same placed model: its share plus its packed copy
        return Memory(weights=eval_weight_share(layout, k, dt) + -(-packed // k),
                      host_buffers=exported_bytes(layout))  # fmt: skip

    # The fewest devices on which both parts fit (one placement serves both).
    k = next((k for k in range(1, most + 1) if _problem(calib(k)(1), hw) is None and _problem(export(k), hw) is None),
             most)  # fmt: skip
    if st.stream is None and (_problem(calib(k)(1), hw) is not None or _problem(export(k), hw) is not None):
        return plan_streamed(layout, hw, st, stored_bytes)
    mem, micro = _fit_micro(calib(k), hw, min(st.batch_size, st.samples))
    geo = Geometry(devices=k, sharding="device_map" if k > 1 else "none", dtype=dt, micro_batch=micro)
    calibration = _part("quantize", "calibration", geo, mem, hw)
    if st.precision == "nvfp4" and hw.device != "cuda":
        calibration = calibration.model_copy(update={"fits": False, "problem": NVFP4_CPU})
    return StageMemory(stage="quantize", parts=[
        calibration,
        _part("quantize", "export", geo.model_copy(update={"micro_batch": 1}), export(k), hw),
    ])  # fmt: skip


def quantize_launch(plan: StageMemory) -> dict:
    """What `quantize_to_folder` takes from its plan: {"devices", "batch", "dtype", "streaming", "shard_bytes"}."""
    geo = plan.parts[0].geometry
    return {"devices": geo.devices, "batch": geo.micro_batch, "dtype": geo.dtype, "streaming": geo.streaming,
            "shard_bytes": geo.shard_bytes}  # fmt: skip
