"""Gradient accumulation under FSDP2 keeps each rank's gradients sharded (a full gradient per rank would not fit at
56B): with grad-accum 4 on 2 and 4 gloo ranks (full sharding, and HSDP as 2 "nodes" x 2), every rank's gradient
bytes after every micro-batch are its shard of the student's parameters, within one FSDP unit, and within the
memory plan's gradient term. Unsharded accumulation (2 ranks, one reduce-scatter per step) holds the whole
gradient after every micro-batch but the last, within the plan's term for it. Every run's final weights equal one
process's on the same global batch.

Gradient bytes are measured, not read from FSDP's bookkeeping: every tensor storage alive in the process (found
through the garbage collector, plus the `.grad` autograd keeps outside Python) after a micro-batch's backward,
minus those alive when the step began. Whatever holds gradients (sharded `.grad`, unsharded accumulators, FSDP's
partial reductions) is counted.
"""

import gc
import json
import os
import socket
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

SEQ, BATCH, ACCUM, STEPS = 32, 16, 4, 2


pytestmark = pytest.mark.usefixtures("one_thread")


def _settings(pair, out: Path, batch: int, **more):
    from minipuzzle.settings import DistillSettings

    teacher, student, data = pair
    return DistillSettings(teacher=str(teacher), student=str(student), data=str(data), output=str(out),
                           max_steps=STEPS, seq_len=SEQ, batch_size=batch, lr=1e-3, warmup=0, save_every=0,
                           eval_every=0, device="cpu", **more)  # fmt: skip


def _live_bytes() -> int:
    """Bytes of every distinct tensor storage alive in this process."""
    from torch.distributed.tensor import DTensor

    storages: dict[int, int] = {}

    def add(t: torch.Tensor) -> None:
        if isinstance(t, DTensor):
            add(t._local_tensor)
            return
        try:
            s = t.untyped_storage()
        except (RuntimeError, NotImplementedError):  # wrapper subclasses without storage of their own
            return
        if s.data_ptr():
            storages[s.data_ptr()] = max(storages.get(s.data_ptr(), 0), s.nbytes())

    for o in gc.get_objects():
        if issubclass(type(o), torch.Tensor):  # type(): a deprecated module's __class__ would warn
            add(o)
            if o.is_leaf and o.grad is not None:  # made by autograd in C++: not a gc object until read
                add(o.grad)
    return sum(storages.values())


def _student_bytes(student) -> tuple[int, int, int]:
    """(this rank's shard, the whole student, the largest FSDP unit) in float32 bytes of trainable parameters. The
    units are the blocks and the root (what is not in a block: embeddings, final norm, LM head)."""
    from torch.distributed.tensor import DTensor

    def local(p):
        return (p.to_local() if isinstance(p, DTensor) else p).numel() * p.element_size()

    params = [(n, p) for n, p in student.named_parameters() if p.requires_grad]
    shard = sum(local(p) for _, p in params)
    whole = sum(p.numel() * p.element_size() for _, p in params)
    units: dict[str, int] = {}
    for n, p in params:
        unit = ".".join(n.split(".")[:3]) if n.startswith("model.layers.") else "root"
        units[unit] = units.get(unit, 0) + p.numel() * p.element_size()
    return shard, whole, max(units.values())


# (name, processes, processes per "node", sharding, accumulation): full sharding over 2 and 4 ranks, HSDP over
# 2 x 2, and unsharded accumulation over 2 ranks.
CONFIGS = [("full-2", 2, 2, "full", "sharded"), ("full-4", 4, 4, "full", "sharded"),
           ("hsdp-2x2", 4, 2, "per_node", "sharded"), ("unsharded-2", 2, 2, "full", "unsharded")]  # fmt: skip


def _worker(rank: int, runs: list[tuple[str, int, int, int, str]], out_dir: str) -> None:
    """One process of each torchrun-like launch in `runs` (name, world, local world, port, settings JSON) that has
    this rank, one after the other: distill, recording the gradient bytes after every backward."""
    # What the interpreter and libraries made so far is not scanned again (the scans then take milliseconds): the
    # runs' tensors, gradients included, are all made later.
    gc.freeze()
    torch.set_num_threads(1)
    from minipuzzle.distill import loop
    from minipuzzle.settings import DistillSettings

    steps: list[dict] = []
    train_step, backward = loop._Trainer.train_step, torch.Tensor.backward

    def measured_step(self):
        steps.append({"baseline": _live_bytes(), "after": [], "sizes": _student_bytes(self.objective.student)})
        return train_step(self)

    def measured_backward(self, *a, **k):
        backward(self, *a, **k)
        steps[-1]["after"].append(_live_bytes() - steps[-1]["baseline"])

    loop._Trainer.train_step, torch.Tensor.backward = measured_step, measured_backward
    for name, world, local_world, port, cfg_json in runs:
        if rank >= world:
            continue
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank % local_world),
                          LOCAL_WORLD_SIZE=str(local_world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))  # fmt: skip
        steps.clear()
        loop.distill(DistillSettings.model_validate_json(cfg_json))
        Path(out_dir, f"{name}-rank{rank}.json").write_text(json.dumps(steps))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(pair, tmp_path_factory):
    """Every configuration run by one set of 4 spawned processes (the imports, most of the cost, happen once), and
    the reference: the student distilled by one process on the same global batches."""
    import torch.multiprocessing as mp

    from minipuzzle.distill.loop import distill

    root = tmp_path_factory.mktemp("accum")
    distill(_settings(pair, root / "one", BATCH))
    todo = [(name, world, local, _free_port(),
             _settings(pair, root / name, BATCH, grad_accum=ACCUM, sharding=sharding, accumulation=accumulation,
                       activation_checkpointing=False).model_dump_json())
            for name, world, local, sharding, accumulation in CONFIGS]  # fmt: skip
    mp.start_processes(_worker, args=(todo, str(root)), nprocs=max(c[1] for c in CONFIGS), start_method="spawn")
    return root


@pytest.mark.parametrize("name,world,local_world,sharding,accumulation", CONFIGS)
def test_accumulated_gradients_match_the_plan_and_one_process(pair, runs, name, world, local_world, sharding,
                                                              accumulation):  # fmt: skip
    from minipuzzle.distill.launch import plan_for
    from minipuzzle.hardware import Hardware

    shards = world if sharding == "full" else local_world
    # The memory plan of this launch ("nodes" of `local_world` devices): its gradient term is a shard plus one
    # block's transients, which must cover what a rank holds between micro-batches.
    hw = Hardware(device="cpu", gpu_memory="64GiB", gpus_per_node=local_world, nodes=world // local_world)
    cfg = _settings(pair, runs / name, BATCH, grad_accum=ACCUM, sharding=sharding, accumulation=accumulation,
                    activation_checkpointing=False)  # fmt: skip
    plan = plan_for(cfg, hw, world)
    assert plan.fits and (plan.geometry.micro_batch, plan.geometry.grad_accum) == (BATCH // world // ACCUM, ACCUM)
    assert plan.geometry.accumulation == accumulation
    for rank in range(world):
        steps = json.loads((runs / f"{name}-rank{rank}.json").read_text())
        assert len(steps) == STEPS and all(len(s["after"]) == ACCUM for s in steps)
        shard, whole, unit = steps[0]["sizes"]
        assert abs(shard - whole / shards) <= unit  # FSDP2 cuts each parameter into `shards` pieces (dim 0)
        # Unsharded accumulation would hold `whole`: far above shard + unit here.
        assert whole > shard + unit
        if accumulation == "sharded":
            assert whole > plan.memory.gradients  # ... and above the plan's term
        for k, s in enumerate(steps):
            for i, grads in enumerate(s["after"]):
                if accumulation == "unsharded" and i < ACCUM - 1:  # the whole gradient, no shard of it yet
                    assert whole <= grads <= whole + unit, (rank, k, i, grads, whole, unit)
                else:
                    assert shard <= grads <= shard + unit, (rank, k, i, grads, shard, unit, whole)
                assert grads <= plan.memory.gradients, (rank, k, i, grads, plan.memory.gradients)

    a, b = load_file(runs / "one" / "model.safetensors"), load_file(runs / name / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:  # float32 sums in another order: ~1e-7 relative, up to ~2e-6 after AdamW's two steps of 1e-3
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=2e-5, msg=k)
