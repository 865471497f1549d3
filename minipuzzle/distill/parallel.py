"""One process or many: device choice, process group, FSDP2 sharding, collective helpers.

Launched with torchrun (WORLD_SIZE > 1) the run joins a process group (NCCL on CUDA, gloo on CPU) and both
models are sharded with FSDP2 `fully_shard`: every Nemotron-H block is its own unit, and the `DistillObjective`
root owns what is left (embeddings, final norms, LM heads of both models), which it gathers once per step. Models
are built on the meta device, sharded, then filled tensor by tensor from the safetensors shards, so no process
ever holds a whole model.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

from minipuzzle.checkpoint.build import build_model, load_model
from minipuzzle.checkpoint.dtypes import weight_dtype
from minipuzzle.checkpoint.read import Checkpoint
from minipuzzle.distill.routers import routers
from minipuzzle.errors import UserError


@dataclass
class Dist:
    """Where this process runs: rank, world size and its device."""

    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def pick_device(name: str, local_rank: int = 0) -> torch.device:
    """'auto' -> cuda:LOCAL_RANK when CUDA is available, else cpu; otherwise the named device."""
    if name == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown --device {name!r}: use auto, cpu or cuda") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError("--device cuda was asked for but CUDA is not available")
        if dev.index is None:
            dev = torch.device(f"cuda:{local_rank}")
    return dev


def init(device: str = "auto") -> Dist:
    """Join the torchrun process group when there is one (idempotent)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = pick_device(device, local_rank)
    if world <= 1:
        return Dist(0, 1, dev)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", device_id=dev if dev.type == "cuda" else None)
    return Dist(dist.get_rank(), dist.get_world_size(), dev)


def shutdown(d: Dist) -> None:
    if d.enabled and dist.is_initialized():
        dist.destroy_process_group()


def barrier(d: Dist) -> None:
    if d.enabled:
        dist.barrier()


def all_sum(d: Dist, t: torch.Tensor) -> torch.Tensor:
    """Sum over processes of a small tensor (returned on the CPU)."""
    if d.enabled:
        t = t.to(d.device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.cpu()


def all_mean(d: Dist, t: torch.Tensor) -> torch.Tensor:
    """Mean over processes of a small tensor (returned on the CPU)."""
    return all_sum(d, t) / d.world if d.enabled else t.cpu()


def any_true(d: Dist, flag: bool) -> bool:
    """True on every process when it is true on any (e.g. SIGTERM seen by one rank first)."""
    if not d.enabled:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=d.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def load_local(ckpt: Checkpoint, dtype: torch.dtype, d: Dist):
    """A whole model on this process's device (single-process runs)."""
    return load_model(ckpt, dtype=dtype, device=d.device)


def build_meta(ckpt: Checkpoint, dtype: torch.dtype):
    """The model on the meta device, in `dtype`, to be sharded before any memory is allocated.

    The MoE routers' weight and correction bias stay float32, as `load_model` and transformers keep them;
    `shard` gives each router a unit of its own, so no unit mixes dtypes.
    """
    model = build_model(ckpt.layout, ckpt.config).to(dtype)
    for mod_name, mod in model.named_modules():
        for table in (mod._parameters, mod._buffers):
            for n, t in table.items():
                want = weight_dtype(f"{mod_name}.{n}", t.dtype, dtype) if t is not None else None
                if want is not None and want != t.dtype:
                    t.data = t.data.to(want)  # meta: no data is converted
    return model


def mesh(d: Dist, sharding: str = "full"):
    """FSDP2's device mesh: all ranks in one dimension ("full"), or, "per_node", nodes x LOCAL_WORLD_SIZE with
    parameters sharded within a node and replicated across nodes (HSDP: gathers stay on the node's links)."""

    local = int(os.environ.get("LOCAL_WORLD_SIZE", str(d.world)))
    if sharding == "per_node" and 1 <= local < d.world and d.world % local == 0:
        return init_device_mesh(d.device.type, (d.world // local, local), mesh_dim_names=("replicate", "shard"))
    return init_device_mesh(d.device.type, (d.world,))


def shard(objective, d: Dist, sharding: str = "full", param_dtype: torch.dtype | None = None) -> None:
    """FSDP2: one unit per block of each model, the rest owned by the objective (the root), and one per MoE
    router inside a block.

    `param_dtype` (bf16 on GPUs): the student's blocks and the root are gathered in it, so the forward and the
    saved activations are bf16 while the sharded master weights, the optimizer and the gradient reduction stay
    float32. The teacher's blocks are gathered in their own dtype. None: gathered as stored (float32 on the CPU).
    The routers are gathered as stored, float32 (as transformers keeps them): in its block's unit a router's
    weight would be gathered in bf16, and one unit holds one dtype. A router is [E, h] (1.4 MB for Nemotron 3
    Nano), so its own gather costs little.
    """


    m = mesh(d, sharding)
    student_mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    teacher_mp = MixedPrecisionPolicy(reduce_dtype=torch.float32)
    router_mp = MixedPrecisionPolicy(reduce_dtype=torch.float32)
    for model, mp in ((objective.student, student_mp), (objective.teacher, teacher_mp)):
        for layer in model.model.layers:
            for router in routers(layer):  # FSDP2 shards a submodule before the module holding it
                fully_shard(router, mesh=m, mp_policy=router_mp)
            fully_shard(layer, mesh=m, mp_policy=mp)
    fully_shard(objective, mesh=m, mp_policy=student_mp)


@torch.no_grad()
def fill_sharded(model, ckpt: Checkpoint, d: Dist) -> None:
    """Materialise a sharded meta model on the device and fill every parameter and buffer from the checkpoint.

    Each tensor is read whole from its safetensors shard (one at a time), cut the way FSDP2 cuts it (dim 0,
    torch.chunk) and only this rank's piece is kept: routed experts [E, out, in] are cut by expert. Buffers are
    not sharded (fully_shard leaves them whole on every rank) but `to_empty` leaves them uninitialised like the
    parameters, so they are copied whole: the MoE routers' `e_score_correction_bias` [E] is one.
    """

    model.to_empty(device=d.device)
    persistent = set(model.state_dict())
    names = {**dict(model.named_parameters()), **{n: b for n, b in model.named_buffers() if n in persistent}}
    sources = {n: ckpt.source_of(n) for n in names}  # a tied checkpoint's missing LM head: the embeddings
    missing = [n for n, src in sources.items() if src is None]
    if missing:
        raise UserError(f"checkpoint {ckpt.path} lacks {len(missing)} weights, e.g. {missing[0]}")
    for name, p in names.items():
        full = ckpt.get(sources[name]).to(device=d.device, dtype=p.dtype)
        if isinstance(p, DTensor):
            local = distribute_tensor(full, p.device_mesh, p.placements, src_data_rank=None).to_local()
            p.to_local().copy_(local)
        else:
            p.copy_(full)
