"""The machine a run plans against: how many devices, how much memory each has, how much host memory each node has.

Recipes give it as a `hardware:` section (`{gpu_memory: 80GiB, gpus_per_node: 8, nodes: 8}`), commands as
`--gpu-memory` / `--gpus`; without either, `detect()` reads this machine: its CUDA devices and their memory, or,
with none, the CPU as one device whose memory is the host's RAM. Sizes are read by `units.parse_bytes`, so a recipe
may write `80GiB`, `80GB` or a byte count.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from minipuzzle.errors import UserError
from minipuzzle.kernels import detect_mamba_path
from minipuzzle.units import gib, parse_bandwidth, parse_bytes

# Imports inside functions here keep torch and transformers unloaded until a function needs them, so `--help`
# and the offline commands (dry runs, info, search) start fast.

# Link bandwidths a plan assumes when the hardware does not give them: an H100 SXM node and its cluster network.
# NVLink 4 on an H100 SXM: 18 links x 25 GB/s = 450 GB/s per direction per GPU (NVIDIA's H100 datasheet quotes
# 900 GB/s, both directions together).
NVLINK4_BYTES_PER_S = 450e9
# InfiniBand NDR: 400 Gb/s = 50 GB/s per direction per NIC; a DGX / HGX H100 node has one NIC per GPU (8 x
# ConnectX-7), so each GPU has one link's worth to the other nodes.
NDR_BYTES_PER_S = 400e9 / 8
# The share of a link's bandwidth that NCCL's ring all-gather, reduce-scatter and all-reduce reach on large
# messages (nccl-tests' "bus bandwidth"): a judgement, not a measurement here. Give `intra_node_bandwidth` /
# `inter_node_bandwidth` from nccl-tests on the real machine to replace both assumptions.
COLLECTIVE_SHARE = 0.8
DEFAULT_INTRA_NODE = COLLECTIVE_SHARE * NVLINK4_BYTES_PER_S  # 360 GB/s
DEFAULT_INTER_NODE = COLLECTIVE_SHARE * NDR_BYTES_PER_S  # 40 GB/s


def _size(value: object, what: str) -> int:
    """A size field as bytes; a ValueError (not a UserError) so that pydantic names the key it came from."""
    try:
        return parse_bytes(value, what)  # type: ignore[arg-type]
    except UserError as e:
        raise ValueError(str(e)) from None


class Hardware(BaseModel):
    """Devices and memory: `gpus_per_node` devices of `gpu_memory` bytes on each of `nodes` nodes.

    `device` is "cuda" for GPUs, "cpu" when the CPU is the one device (then `gpu_memory` is the host's RAM, and
    what a stage keeps "on the host" shares that memory). `host_memory` is the RAM of one node; None means unknown,
    and the plan then reports host buffers without checking them.
    """

    model_config = ConfigDict(extra="forbid")

    device: Literal["cuda", "cpu"] = Field("cuda", description="cuda (GPUs) or cpu (the CPU is the one device)")
    gpu_memory: int = Field(description="memory of one device, e.g. 80GiB")
    gpus_per_node: int = Field(1, ge=1, description="devices per node")
    nodes: int = Field(1, ge=1, description="nodes")
    host_memory: int | None = Field(None, description="RAM of one node, e.g. 2TiB (unchecked when not given)")
    mamba_kernels: bool | None = Field(
        None, description="whether the fused Mamba kernels (mamba-ssm, causal-conv1d) run on these GPUs; unset: "
        "the PyTorch path is planned (its float32 temporaries are far larger); on a CUDA machine what is installed "
        "there decides"
    )  # fmt: skip
    mamba_path: str | None = Field(None, exclude=True, description="why the Mamba path is what it is (detection)")
    intra_node_bandwidth: float | None = Field(
        None, description="bytes per second a collective reaches per GPU inside a node, e.g. 360GB/s (nccl-tests' "
        "bus bandwidth); unset: 80% of H100 NVLink 4's 450 GB/s per direction"
    )  # fmt: skip
    inter_node_bandwidth: float | None = Field(
        None, description="bytes per second a collective reaches per GPU between nodes, e.g. 40GB/s; unset: 80% "
        "of one 400 Gb/s InfiniBand NIC per GPU"
    )  # fmt: skip

    @field_validator("gpu_memory", mode="before")
    @classmethod
    def _gpu_memory(cls, v: object) -> int:
        return _size(v, "gpu_memory")

    @field_validator("host_memory", mode="before")
    @classmethod
    def _host_memory(cls, v: object) -> int | None:
        return None if v is None else _size(v, "host_memory")

    @field_validator("intra_node_bandwidth", "inter_node_bandwidth", mode="before")
    @classmethod
    def _bandwidth(cls, v: object, info) -> float | None:
        if v is None:
            return None
        try:
            return parse_bandwidth(v, info.field_name)  # type: ignore[arg-type]
        except UserError as e:
            raise ValueError(str(e)) from None

    @property
    def intra_node_bytes_per_s(self) -> float:
        """What a collective among one node's GPUs moves per GPU per second (given, else `DEFAULT_INTRA_NODE`)."""
        return self.intra_node_bandwidth or DEFAULT_INTRA_NODE

    @property
    def inter_node_bytes_per_s(self) -> float:
        """What a collective across nodes moves per GPU per second (given, else `DEFAULT_INTER_NODE`)."""
        return self.inter_node_bandwidth or DEFAULT_INTER_NODE

    def bandwidth_text(self) -> str:
        """'NVLink 360 GB/s, InfiniBand 40 GB/s per GPU (assumed: ...)': the figures communication is timed with
        and which of them are assumptions (one line, for dry runs)."""
        out = (f"inside a node {self.intra_node_bytes_per_s / 1e9:.0f} GB/s, between nodes "
               f"{self.inter_node_bytes_per_s / 1e9:.0f} GB/s per GPU")  # fmt: skip
        assumed = [a for a, given in (
            (f"{COLLECTIVE_SHARE:.0%} of H100 NVLink 4's {NVLINK4_BYTES_PER_S / 1e9:.0f} GB/s",
             self.intra_node_bandwidth),
            (f"{COLLECTIVE_SHARE:.0%} of one {NDR_BYTES_PER_S * 8 / 1e9:.0f} Gb/s InfiniBand NIC per GPU",
             self.inter_node_bandwidth)) if given is None]  # fmt: skip
        return out + (f" (assumed: {'; '.join(assumed)}; set hardware.intra_node_bandwidth / "
                      "inter_node_bandwidth)" if assumed else "")  # fmt: skip

    @property
    def devices(self) -> int:
        """Devices of all nodes together."""
        return self.gpus_per_node * self.nodes

    @property
    def fused_mamba(self) -> bool:
        """The fused Mamba kernels run (GPUs that have them); else transformers' PyTorch path, which the memory
        plan counts with its float32 temporaries."""
        return self.device == "cuda" and bool(self.mamba_kernels)

    def mamba_text(self) -> str:
        """Which Mamba path the plan counts, and why (one clause, for dry runs and refusals)."""
        if self.mamba_path:
            return self.mamba_path
        if self.device == "cpu":
            return "PyTorch Mamba path (the CPU)"
        if self.mamba_kernels is None:
            return "PyTorch Mamba path (kernels not known for this hardware: set hardware.mamba_kernels)"
        return "fused Mamba kernels (as the hardware says)" if self.mamba_kernels else "PyTorch Mamba path (as the hardware says)"

    def describe(self) -> str:
        """'8 x 8 GPUs of 80 GiB, fused Mamba kernels (...)', 'the CPU with 23.5 GiB of RAM' (one line, for
        tables and errors; GPUs name the Mamba path the plan counts)."""
        mem = gib(self.gpu_memory)
        if self.device == "cpu":
            return f"the CPU with {mem} of RAM"
        nodes = f"{self.nodes} nodes x " if self.nodes > 1 else ""
        return f"{nodes}{self.gpus_per_node} GPU{'s' if self.gpus_per_node > 1 else ''} of {mem}, {self.mamba_text()}"

    def override(self, gpu_memory: str | int | None = None, gpus: int | None = None,
                 host_memory: str | int | None = None) -> Hardware:  # fmt: skip
        """This hardware with `--gpu-memory` / `--gpus` (GPUs per node) / `--host-memory` applied. Naming a GPU
        option on a machine detected as CPU-only plans for GPUs instead (e.g. a dry run on a laptop for a cluster),
        whose host memory is then unknown unless `host_memory` gives it; `host_memory` alone on a CPU-only machine
        is the memory of its one device."""
        if gpu_memory is None and gpus is None and host_memory is None:
            return self
        if gpus is not None and gpus < 1:
            raise UserError(f"--gpus must be at least 1, got {gpus}")
        changes: dict[str, object] = {}
        if gpu_memory is not None or gpus is not None:
            changes["device"] = "cuda"
            if self.device == "cpu":  # this machine's RAM and packages say nothing about the GPU machine planned for
                changes.update(host_memory=None, mamba_kernels=None, mamba_path=None)
        if gpu_memory is not None:
            changes["gpu_memory"] = parse_bytes(gpu_memory, "--gpu-memory")
        if gpus is not None:
            changes["gpus_per_node"] = gpus
        if host_memory is not None:
            changes["host_memory"] = parse_bytes(host_memory, "--host-memory")
            if changes.get("device", self.device) == "cpu":
                changes["gpu_memory"] = changes["host_memory"]
        return self.model_copy(update=changes)


def host_ram() -> int:
    """This machine's RAM in bytes: /proc/meminfo's MemTotal (os.sysconf elsewhere), lowered to the cgroup's memory
    limit when the process runs in a container that has one."""
    total = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                total = int(line.split()[1]) * 1024
                break
    except OSError:
        pass
    if not total:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for limit_file in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(limit_file).read_text().strip()
        except OSError:
            continue
        if text.isdigit():
            total = min(total, int(text))  # "max" (v2) or a huge number (v1) means no limit
    return total


def detect() -> Hardware:
    """This machine: its CUDA devices (the smallest one's memory: every rank must fit) and host RAM; with no CUDA
    device, the CPU as one device with the host's RAM."""
    import torch

    ram = host_ram()
    if torch.cuda.is_available() and torch.cuda.device_count() > 0:
        n = torch.cuda.device_count()
        mem = min(torch.cuda.get_device_properties(i).total_memory for i in range(n))
        return with_detected_kernels(Hardware(device="cuda", gpu_memory=mem, gpus_per_node=n, nodes=1, host_memory=ram))
    return Hardware(device="cpu", gpu_memory=ram, gpus_per_node=1, nodes=1, host_memory=ram)


def with_detected_kernels(hw: Hardware, cuda_available: bool | None = None) -> Hardware:
    """`hw` with the Mamba path this machine will really run (`kernels.detect_mamba_path`) when this machine has a
    CUDA device: stages run where they are planned, so what is installed here decides, whatever a recipe or
    `--mamba-kernels` assumed. Without CUDA here (a dry run on a laptop for a cluster), `hw` as it is."""

    if hw.device != "cuda":
        return hw
    if cuda_available is None:
        import torch

        cuda_available = torch.cuda.is_available()
    if not cuda_available:
        return hw
    path = detect_mamba_path(cuda_available=True)
    return hw.model_copy(update={"mamba_kernels": path.fused, "mamba_path": path.why})


# The options that only time training's collectives: commands that never train across devices leave them out.
LINK_OPTIONS = ("intra_node_bandwidth", "inter_node_bandwidth")


class HardwareOptions(BaseModel):
    """`--gpu-memory` / `--gpus` as typed to `run` and the stage commands (one option per field)."""

    gpu_memory: str | None = Field(
        None, description="Memory of one GPU to plan for, e.g. 80GiB (default: this machine's; `run` reads a "
        "recipe's hardware section first)."
    )  # fmt: skip
    gpus: int | None = Field(None, description="GPUs per node to plan for (default: as --gpu-memory).")
    host_memory: str | None = Field(
        None, description="RAM of one node to plan for, e.g. 512GiB (default: this machine's when no GPU option is "
        "given, else unchecked); on a CPU-only machine, the memory of its one device."
    )  # fmt: skip
    mamba_kernels: bool | None = Field(
        None, description="Plan GPUs with the fused Mamba kernels (mamba-ssm, causal-conv1d) or with transformers' "
        "PyTorch path, when planning from a machine without CUDA (default: the recipe's hardware section, else the "
        "PyTorch path); on a CUDA machine what is installed there decides."
    )  # fmt: skip
    intra_node_bandwidth: str | None = Field(
        None, description="What a collective reaches per GPU inside a node, e.g. 360GB/s, to time FSDP2's traffic "
        "(default: the recipe's hardware section, else 80% of H100 NVLink 4)."
    )  # fmt: skip
    inter_node_bandwidth: str | None = Field(
        None, description="What a collective reaches per GPU between nodes, e.g. 40GB/s or 320Gb/s (default: the "
        "recipe's hardware section, else 80% of one 400 Gb/s InfiniBand NIC per GPU)."
    )  # fmt: skip


def resolve(section: Hardware | None = None, options: dict | HardwareOptions | None = None) -> Hardware:
    """The hardware a command plans for: `section` (a recipe's) or, without one, this machine (`detect`), with
    the command's `--gpu-memory` / `--gpus` applied."""
    opts = options if isinstance(options, HardwareOptions) else HardwareOptions(**(options or {}))
    base = section if section is not None else detect()
    hw = base.override(opts.gpu_memory, opts.gpus, opts.host_memory)
    if opts.mamba_kernels is not None:
        hw = hw.model_copy(update={"mamba_kernels": opts.mamba_kernels, "mamba_path": None})
    links = {k: v for k, v in (("intra_node_bandwidth", opts.intra_node_bandwidth),
                               ("inter_node_bandwidth", opts.inter_node_bandwidth)) if v is not None}  # fmt: skip
    if links:
        flag = {k: "--" + k.replace("_", "-") for k in links}
        hw = hw.model_copy(update={k: parse_bandwidth(v, flag[k]) for k, v in links.items()})
    return with_detected_kernels(hw)
