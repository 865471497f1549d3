"""Geometry and hardware terms: what a process holds before any work, what a part may use of a device, the
compute dtype, and the search for the largest batch and row chunk that fit."""

from __future__ import annotations

from minipuzzle.checkpoint.dtypes import long_name
from minipuzzle.errors import UserError
from minipuzzle.hardware import Hardware, host_ram
from minipuzzle.memory.parts import Geometry, Memory, Part, RunMemory, StageMemory
from minipuzzle.units import gib

# A part fits when its total, the process's baseline included, is within this share of a device's memory (and its
# host bytes within this share of a node's RAM). The share stands for what grows with the work: the caching
# allocator's reserve and fragmentation and NCCL's buffers on GPUs, malloc's arenas on the CPU; it is a judgement,
# not a measurement (`benchmarks/scale_rehearsal.py` measures the plan's predictions against peaks). What does not
# grow with the work is a term of its own (`PROCESS_BYTES` ..., `CUDA_CONTEXT_BYTES`): 0.5 GiB is 0.6 % of an
# 80 GiB GPU but an interpreter is half of a 1 GB CPU limit, so no share could stand for both.
USABLE = 0.9
# What a process holds before it does any work (bytes), so that a limit (--host-memory, a GPU's memory) covers the
# whole process. CPU figures: resident memory right after the imports, measured on this project's CPU machine
# (torch 2.13, transformers 5.24; `benchmarks/scale_rehearsal.py` measures them again on every run and records them
# beside these): a stage process (python, torch, transformers with NemotronH's modeling code, datasets, minipuzzle)
# 0.43-0.49 GB; `minipuzzle cut`, which builds no model, 0.43 GB (its command line imports as much); torchrun's
# launcher (torch alone) 0.23 GB.
PROCESS_BYTES = 490 * 10**6
TOOL_BYTES = 440 * 10**6
LAUNCHER_BYTES = 230 * 10**6
# A GPU process's CUDA context (driver state, kernel images loaded lazily by CUDA 12's lazy loading) on one GPU:
# about 0.5 GiB with torch 2.x on an H100; an assumption, not measured here (no GPU was lent when it was set; the
# plan's GPU figures hold it as one term so that gpu_check.sh can replace it with a measurement).
CUDA_CONTEXT_BYTES = 2**29


def default_dtype(hw: Hardware, requested: str | None = None) -> str:
    """The compute dtype: `requested` (a recipe's model.dtype) unless auto; bfloat16 on GPUs, float32 on the CPU
    (what `checkpoint.parse_dtype` picks for "auto")."""
    if requested not in (None, "auto"):
        return long_name(requested)
    return "bfloat16" if hw.device == "cuda" else "float32"


def usable(hw: Hardware) -> int:
    return int(USABLE * hw.gpu_memory)


def process_baseline(hw: Hardware, builds_model: bool = True) -> int:
    """Bytes one process holds on `hw`'s device before any work: its CUDA context on a GPU; on the CPU its
    interpreter and libraries (`TOOL_BYTES` for a process that builds no model, the cut)."""
    if hw.device == "cuda":
        return CUDA_CONTEXT_BYTES
    return PROCESS_BYTES if builds_model else TOOL_BYTES


def host_baseline(hw: Hardware, processes: int = 1, helpers: int = 0) -> int:
    """Bytes of one node's RAM held by interpreters that `process_baseline` does not count: on a GPU node each of
    its `processes` (the CPU's own process is its device's baseline), plus `helpers` bytes of a launch's other
    processes (torchrun's launcher, the process that started it) on any node."""
    return (processes * PROCESS_BYTES if hw.device == "cuda" else 0) + helpers


def _need(mem: Memory, hw: Hardware) -> int:
    """What counts against a device: on a CPU-only machine the host buffers and interpreters share its memory."""
    return mem.device_total + (mem.host_total if hw.device == "cpu" else 0)


def _room(mem: Memory, hw: Hardware) -> int:
    return usable(hw) - _need(mem, hw)


def _problem(mem: Memory, hw: Hardware) -> str | None:
    need = _need(mem, hw)
    if need > usable(hw):
        where = "" if hw.device == "cpu" else " per device"
        return f"needs {gib(need)}{where}, the hardware has {hw.describe()} ({gib(usable(hw))} usable)"
    if hw.device == "cuda" and hw.host_memory is not None and mem.host_total > USABLE * hw.host_memory:
        return (f"needs {gib(mem.host_total)} of host memory per node, the hardware has "
                f"{gib(hw.host_memory)} ({gib(USABLE * hw.host_memory)} usable)")  # fmt: skip
    return None


def _part(stage: str, name: str, geometry: Geometry, mem: Memory, hw: Hardware, note: str | None = None) -> Part:
    problem = _problem(mem, hw)
    return Part(stage=stage, name=name, geometry=geometry, memory=mem, device_total=_need(mem, hw),
                fits=problem is None, problem=problem, note=note)  # fmt: skip


def host_device(hw: Hardware) -> Hardware | None:
    """The host as the one device: where a part told `device: cpu` runs on a GPU machine. None when the host's
    RAM is unknown (such a part is then not checked)."""
    if hw.device == "cpu":
        return hw
    if hw.host_memory is None:
        return None
    return Hardware(device="cpu", gpu_memory=hw.host_memory, host_memory=hw.host_memory)


def _powers_of_two(n: int, divisors_of: int | None = None) -> list[int]:
    """Powers of two <= n, largest first; with `divisors_of`, only those dividing it."""
    out, p = [], 1
    while p <= n:
        if divisors_of is None or divisors_of % p == 0:
            out.append(p)
        p *= 2
    return out[::-1] or [1]


def _batches(n: int) -> list[int]:
    """Forward batches to try, largest first: `n` as asked, then the powers of two below it."""
    return [n] + [p for p in _powers_of_two(n) if p < n]


def _fit_rows(make, hw: Hardware, batch: int, n_rows: int) -> tuple[Memory, int, int]:
    """(memory, micro, rows) of a layer-by-layer pass: the largest forward batch `micro` <= batch (as asked, else
    a power of two) for which `make(micro, rows=micro)` fits, then as many residual-stream rows per chunk as the
    room left holds (at most `n_rows`). Without a fit: micro = rows = 1, which the caller reports as not fitting."""
    for micro in _batches(min(batch, n_rows)):
        mem = make(micro, micro)
        if _problem(mem, hw) is None:
            per_row = max(1, _need(make(micro, micro + 1), hw) - _need(mem, hw))
            rows = min(n_rows, micro + _room(mem, hw) // per_row)
            return make(micro, rows), micro, rows
    return make(1, 1), 1, 1


def _fit_micro(make, hw: Hardware, batch: int) -> tuple[Memory, int]:
    """The largest batch <= `batch` (as asked, else a power of two) whose memory `make(batch)` fits (1 when none
    does)."""
    for micro in _batches(batch):
        mem = make(micro)
        if _problem(mem, hw) is None:
            return mem, micro
    return make(1), 1


def compute_hardware(hw: Hardware, device: str | None) -> Hardware:
    """The hardware a one-device part computes on when told `device`: the host as the one device for cpu on a GPU
    machine (this machine's RAM standing in where the hardware does not give the host's), else `hw`."""
    if not str(device).startswith("cpu") or hw.device == "cpu":
        return hw
    return host_device(hw) or Hardware(device="cpu", gpu_memory=host_ram(), host_memory=host_ram())


def for_device(hw: Hardware, device: str | None) -> Hardware | None:
    """The hardware a command runs on: the host when its --device is cpu on a GPU machine (None when the host's
    RAM is unknown), else `hw`."""
    return host_device(hw) if device == "cpu" and hw.device == "cuda" else hw


def check(hw: Hardware, *stages: StageMemory) -> None:
    """Raise `UserError` with the one line of the first part of `stages` that cannot run on `hw`."""
    refusal = RunMemory(hardware=hw, hardware_text=hw.describe(), usable_device_bytes=usable(hw),
                      stages=list(stages)).refusal()  # fmt: skip
    if refusal is not None:
        raise UserError(refusal)
