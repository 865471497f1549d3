"""What a memory plan is made of: a part's launch (`Geometry`), what one device holds at its peak (`Memory`),
the part itself, a stage's parts (`StageMemory`) and a run's stages (`RunMemory`)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field, computed_field

from minipuzzle.checkpoint.dtypes import short_name
from minipuzzle.communication import Traffic
from minipuzzle.hardware import Hardware

# torch dtype names -> the short precision names `arch.Layout.memory` and the summaries use.


class Geometry(BaseModel):
    """How a part is launched. `micro_batch` is sequences per forward on one device; `grad_accum` micro-batches
    per optimizer step, so micro_batch x grad_accum x data-parallel ranks = `global_batch` (training only)."""

    devices: int = 1
    nodes: int = 1
    sharding: Literal["none", "full", "per_node", "device_map"] = "none"
    dtype: str = "bfloat16"
    streaming: bool = False
    micro_batch: int = 1
    grad_accum: int | None = Field(None, description="training: micro-batches per optimizer step on each rank")
    global_batch: int | None = Field(None, description="training: sequences per optimizer step, all ranks")
    activation_checkpointing: bool | None = Field(None, description="training: block activations recomputed")
    attention: str | None = Field(None, description="training: the attention implementation counted")
    accumulation: Literal["sharded", "unsharded"] | None = Field(
        None, description="training under FSDP2: gradients reduce-scattered after every micro-batch (sharded) or "
        "once per step, each rank holding the whole gradient until then (unsharded)"
    )  # fmt: skip
    rows_per_chunk: int | None = Field(None, description="scoring: windows per chunk of rows")
    logits_chunk: int | None = Field(None, description="positions whose full-vocabulary logits exist at once")
    host_group: int | None = Field(
        None, description="streamed ranking: windows whose parent final states the host keeps at once"
    )
    sequential: bool = Field(False, description="eval: teacher and student one after the other, not both resident")
    shard_bytes: int | None = Field(None, description="cut: the largest output shard, buffered whole before written")

    def describe(self) -> str:
        """One short line: '64 dev FSDP2, bf16, micro 1 x 12, ckpt' (micro-batch x grad-accum)."""
        out = [f"{self.devices} dev"]
        out[0] += {"full": " FSDP2", "per_node": " FSDP2/node", "device_map": " device map"}.get(self.sharding, "")
        out.append(short_name(self.dtype))
        if self.grad_accum is not None:
            out.append(f"micro {self.micro_batch} x {self.grad_accum}")
        else:
            out.append(f"batch {self.micro_batch}")
        if self.rows_per_chunk is not None:
            out.append(f"{self.rows_per_chunk} rows")
        if self.streaming:
            out.append("streamed")
        if self.activation_checkpointing:
            out.append("ckpt")
        if self.accumulation == "unsharded":
            out.append("unsharded grads")
        if self.attention not in (None, "sdpa"):
            out.append(f"{self.attention} attention")
        if self.sequential:
            out.append("one model at a time")
        return ", ".join(out)


class Memory(BaseModel):
    """Bytes one device holds at the part's peak; `host_buffers` is bytes of one node's RAM.

    weights: what the compute reads (bf16 copies, gathered FSDP2 units, the streamed layer); master_weights: the
    float32 weights the optimizer updates; optimizer_state: AdamW's two float32 moments; gradients; activations:
    the counted figure (with checkpointing where the geometry has it on; `activations_checkpointed` and
    `activations_full` give both for training); logits: the float32 logits buffers alive at once.
    baseline: what the process holds on this memory before any work (`process_baseline`: on the CPU its
    interpreter and libraries, on a GPU its CUDA context); host_baseline: interpreters on one node's RAM that
    `baseline` does not count (`host_baseline`: on GPU nodes every process's, and a launch's helpers anywhere).
    """

    weights: int = 0
    master_weights: int = 0
    optimizer_state: int = 0
    gradients: int = 0
    activations: int = 0
    activations_checkpointed: int | None = None
    activations_full: int | None = None
    logits: int = 0
    host_buffers: int = 0
    baseline: int = 0
    host_baseline: int = 0

    @property
    def device_total(self) -> int:
        return (self.baseline + self.weights + self.master_weights + self.optimizer_state + self.gradients
                + self.activations + self.logits)  # fmt: skip

    @property
    def host_total(self) -> int:
        """Bytes of one node's RAM: the host buffers and the interpreters `host_baseline` counts."""
        return self.host_buffers + self.host_baseline


class Part(BaseModel):
    """One phase of a stage: its geometry, its memory, and whether that fits the hardware."""

    stage: str
    name: str
    geometry: Geometry
    memory: Memory
    device_total: int
    fits: bool
    problem: str | None = None
    note: str | None = None
    traffic: Traffic | None = Field(None, description="training: one rank's collectives and time per step")


class StageMemory(BaseModel):
    """A stage's parts, each freed before the next starts: the stage fits when each part does."""

    stage: str
    parts: list[Part]

    @computed_field
    @property
    def fits(self) -> bool:
        return all(p.fits for p in self.parts)


class RunMemory(BaseModel):
    """The plan of every stage of a run on `hardware` (stages already finished may be left out)."""

    hardware: Hardware
    hardware_text: str
    usable_device_bytes: int
    stages: list[StageMemory]
    attention: str | None = Field(None, description="the attention path each stage's plan counts")

    def refusal(self) -> str | None:
        """One line naming the first part that cannot run (its stage, what it needs, what the hardware has), or
        None when every part fits."""
        for st in self.stages:
            for p in st.parts:
                if not p.fits:
                    return f"{_label(p)} does not fit: {p.problem}"
        return None


def _label(p: Part) -> str:
    return p.stage if p.name == p.stage else f"{p.stage} ({p.name})"
