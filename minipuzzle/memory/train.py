"""The memory of a distillation (the distill stage, candidate distillation): states, activations, logits and host
buffers of each launch (sharding, micro-batch, checkpointing), the fastest launch that fits."""

from __future__ import annotations

from pydantic import BaseModel

from minipuzzle.arch import Layout
from minipuzzle.checkpoint.dtypes import dtype_bytes
from minipuzzle.checkpoint.write import SHARD_BYTES
from minipuzzle.communication import step_traffic
from minipuzzle.distill.losses import KL_CHUNK_LOGIT_BUFFERS
from minipuzzle.hardware import Hardware
from minipuzzle.memory.fitting import (
    LAUNCHER_BYTES,
    PROCESS_BYTES,
    _part,
    _powers_of_two,
    default_dtype,
    host_baseline,
    process_baseline,
    usable,
)
from minipuzzle.memory.parts import Geometry, Memory, Part, StageMemory
from minipuzzle.memory.terms import (
    _max_kind,
    forward_bytes_per_token,
    largest_block,
    largest_tensor,
    qad_step_bytes,
    saved_bytes_per_token,
)
from minipuzzle.settings import DistillSettings
from minipuzzle.units import gib


class Launch(BaseModel):
    """How a training part runs: `shards` FSDP2 shards (1: one process holds everything), `micro` sequences per
    forward, `gather_bytes` the dtype FSDP2 gathers the student's parameters in (it is also the residual stream's:
    the embeddings' output), `teacher_bytes` the teacher's dtype, `compute_bytes` the matmul dtype (bf16 under
    autocast on GPUs), `autocast_cache`: autocast keeps a bf16 copy of every float32 weight of an unsharded student."""

    shards: int
    micro: int
    checkpointing: bool
    gather_bytes: int
    teacher_bytes: int
    compute_bytes: int
    autocast_cache: bool = False
    unsharded: bool = False


def _train_states(teacher: Layout, student: Layout, ln: Launch) -> dict[str, int]:
    """Weights, master weights, optimizer state and gradients on one device.

    Sharded (FSDP2, `distill.parallel.shard`): the student's float32 parameters, AdamW moments and float32
    gradients are split over the shards (4 + 8 + 4 bytes per parameter / shards), the teacher's parameters too.
    Gradients stay sharded through gradient accumulation when `distill.loop` reduce-scatters after every
    micro-batch (HSDP's all-reduce across nodes waits for the last one; its partial sums are shards too); with
    `unsharded` accumulation it reduce-scatters once per step, so every rank holds the whole float32 gradient (4
    bytes per student parameter: FSDP2 accumulates in its reduce dtype) until the last micro-batch reduces it
    block by block, each block's shard replacing its whole gradient.
    Gathered at once: the root unit (embeddings, final norms and heads of both models, kept for the whole step),
    and two blocks of each model (the one running and the one prefetched); a block's unsharded gradients in the
    gathered dtype plus FSDP2's float32 reduce-scatter buffer; and the chunked loss's head-gradient accumulator
    [V, h] (`losses._HeadLoss`). Unsharded: the whole teacher, the float32 student, its moments and gradients, the
    accumulator in float32, and autocast's bf16 copy of the student's weights on a GPU.
    """
    ps, pt, vh = student.num_params(), teacher.num_params(), student.vocab_size * student.hidden_size
    if ln.shards == 1:
        weights = pt * ln.teacher_bytes + (2 * ps if ln.autocast_cache else 0)
        return {"weights": weights, "master_weights": 4 * ps, "optimizer_state": 8 * ps,
                "gradients": 4 * ps + 4 * vh}  # fmt: skip
    root = student.embedding_params() * ln.gather_bytes + teacher.embedding_params() * ln.teacher_bytes
    units = 2 * (largest_block(student) * ln.gather_bytes + largest_block(teacher) * ln.teacher_bytes)
    # Unsharded, a block's accumulated gradient is freed as its shard is reduced: the whole gradient bounds both.
    accumulated = 4 * ps if ln.unsharded else 4 * ps // ln.shards
    grads = accumulated + largest_block(student) * (ln.gather_bytes + 4) + vh * ln.gather_bytes
    return {"weights": pt * ln.teacher_bytes // ln.shards + root + units,
            "master_weights": 4 * ps // ln.shards, "optimizer_state": 8 * ps // ln.shards, "gradients": grads}  # fmt: skip


def _train_activations(teacher: Layout, student: Layout, ln: Launch, seq_len: int, kernels: bool,
                       eager: bool = False) -> tuple[int, int]:  # fmt: skip
    """(checkpointed, full) activation bytes of one micro-batch of `ln.micro` sequences; `eager`: both models run
    eager attention, which keeps (and makes in its forward) [heads, T] scores per query.

    Checkpointed (one checkpoint per block, non-reentrant): every block's input [T, h] in the residual dtype, plus
    one block recomputed in the backward: its saved tensors and as many again for their gradients. Full: every
    block's saved tensors plus one block's gradients. Both add the final hidden states of both models and the
    gradient of the student's ([T, h] each, `losses._HeadLoss`) and the teacher's forward, which runs while the
    student's activations are kept.
    """
    tokens, h, r = ln.micro * seq_len, student.hidden_size, ln.gather_bytes
    eager_len = seq_len if eager else 0
    saved = [saved_bytes_per_token(student, kind, ln.compute_bytes, kernels, eager_len) for kind in student.pattern]
    common = h * (2 * r + ln.teacher_bytes) + _max_kind(teacher, forward_bytes_per_token, ln.teacher_bytes, kernels,
                                                        eager_len)  # fmt: skip
    checkpointed = student.num_layers * h * r + 2 * max(saved)
    full = sum(saved) + max(saved)
    return tokens * (checkpointed + common), tokens * (full + common)


def _step_memory(teacher: Layout, student: Layout, ln: Launch, hw: Hardware, *, seq_len: int, loss_chunk: int,
                 host: int, interpreters: int = 0, eager: bool = False, quantize: str | None = None) -> Memory:  # fmt: skip
    """One device's memory for a training micro-step; logits: `KL_CHUNK_LOGIT_BUFFERS` float32 [chunk, V] buffers of
    the chunked loss (`losses._forward_kl_chunk`), at most the micro-batch's tokens; `interpreters`: the node's
    host baseline (`_train_interpreters`); `eager`: eager attention; `quantize`: the student is fake-quantized
    (`terms.qad_step_bytes`)."""
    ckpt, full = _train_activations(teacher, student, ln, seq_len, hw.fused_mamba, eager)
    logits = KL_CHUNK_LOGIT_BUFFERS * min(loss_chunk, ln.micro * seq_len) * student.vocab_size * 4
    states = _train_states(teacher, student, ln)
    act = ckpt if ln.checkpointing else full
    if quantize:
        act += qad_step_bytes(student, ln.micro * seq_len, ln.compute_bytes, ln.checkpointing)
    if hw.device == "cpu":
        # The host is the device: the final save's buffers (host = max(read, save)) come after the last step, when
        # gradients (set to None), activations and logits are gone, so only what exceeds them raises the peak.
        host = max(0, host - states["gradients"] - act - logits)
    return Memory(**states, activations=act, activations_checkpointed=ckpt, activations_full=full, logits=logits,
                  host_buffers=host, baseline=process_baseline(hw), host_baseline=interpreters)  # fmt: skip


def _train_interpreters(hw: Hardware, procs_per_node: int, ranks: int, child: bool) -> int:
    """Host baseline of a training's node: on GPUs every rank's interpreter; anywhere, torchrun's launcher when
    there is more than one rank, and, when the training runs in processes of its own (`child`: a candidate
    distillation, or a torchrun launch on one node), the process that started them, waiting beside them (prune's
    process, `minipuzzle run`'s stage process; a shell that ran torchrun holds far less, an over-count there).
    Over several nodes a script starts each node's torchrun (`distill.launch.write_script`)."""
    launched = child or 1 < ranks <= procs_per_node  # over several nodes each node's torchrun is started by a script
    helpers = (PROCESS_BYTES if launched else 0) + (LAUNCHER_BYTES if ranks > 1 else 0)
    return host_baseline(hw, procs_per_node, helpers)


def _train_host(student: Layout, hw: Hardware, procs_per_node: int, stored: int, quantize: str | None = None,
                ranks: int = 1) -> int:  # fmt: skip
    """Host bytes per node: each process reads every tensor whole before keeping its shard (the embeddings
    [V, h] are the largest), and the final save (`loop._write_final`) gathers the student one tensor at a time
    onto rank 0's host in float32, casts it to the stored dtype and buffers one output shard (`SHARD_BYTES`, at
    most the student). The two happen at different times. A QAD run (`quantize`) ends with Model Optimizer's
    export instead (`distill.quantized.export_student`), which gathers its exported state dict on the host (at
    most 2 bytes per parameter, `quantize.plan.exported_bytes`); sharded over `ranks`, an FP8 student is first
    gathered whole, in float32, on rank 0's host (an NVFP4 one on its GPU: `_qad_export_problem`)."""
    read = procs_per_node * student.vocab_size * student.hidden_size * stored
    shard = min(SHARD_BYTES, student.num_params() * stored)
    save = shard + largest_tensor(student) * (4 + (stored if stored != 4 else 0))
    if quantize:
        save = 2 * student.num_params() + (4 * student.num_params() if quantize == "fp8" and ranks > 1 else 0)
    return max(read, save)


def _qad_export_problem(student: Layout, hw: Hardware, mem: Memory) -> str | None:
    """Sharded NVFP4 QAD exports from one GPU (Model Optimizer packs NVFP4 on CUDA): after the last step it holds
    its states and the whole float32 student gathered beside them. The problem when that does not fit."""
    need = mem.baseline + mem.weights + mem.master_weights + mem.optimizer_state + 4 * student.num_params()
    if need <= usable(hw):
        return None
    return (f"its NVFP4 export gathers the whole float32 student on one GPU ({gib(need)} with the states beside "
            f"it, {gib(usable(hw))} usable): export FP8, or quantize the distilled bf16 student with `minipuzzle "
            f"quantize` on a machine that holds it")


def data_parallel_ranks(hw: Hardware, global_batch: int) -> int:
    """Devices a distillation uses: the most that divide the global batch, in whole nodes beyond one node (every
    rank takes the same share of each batch). The CPU is one process."""
    if hw.device == "cpu":
        return 1
    g = hw.gpus_per_node
    return next(d for d in range(hw.devices, 0, -1) if global_batch % d == 0 and (d <= g or d % g == 0))


def _sharding_options(hw: Hardware, ranks: int) -> list[str]:
    """FSDP2 over one node's GPUs, replicated across nodes (HSDP), and over all ranks, when the ranks span nodes;
    over all ranks within one node. `train_memory` takes the faster of those that fit."""
    if ranks == 1:
        return ["none"]
    return ["per_node", "full"] if ranks > hw.gpus_per_node else ["full"]


def _shards(sharding: str, hw: Hardware, ranks: int) -> int:
    return {"none": 1, "per_node": min(ranks, hw.gpus_per_node), "full": ranks}[sharding]


class Fixed(BaseModel):
    """Launch choices a user made (None: the plan chooses): processes (a torchrun launch's world size), grad_accum,
    activation checkpointing, FSDP2 sharding ("full" or "per_node")."""

    ranks: int | None = None
    grad_accum: int | None = None
    checkpointing: bool | None = None
    sharding: str | None = None
    accumulation: str | None = None

    def given(self) -> str:
        """The choices made, as the options that make them: '--grad-accum 1, --sharding per_node'."""
        flags = (("--grad-accum", self.grad_accum), ("--sharding", self.sharding),
                 ("--activation-checkpointing", self.checkpointing), ("--accumulation", self.accumulation))  # fmt: skip
        return ", ".join(f"{flag} {v}" for flag, v in flags if v is not None)


def _launch_options(hw: Hardware, ranks: int, per_rank: int, dt: str, fixed: Fixed):
    """(sharding, Launch) of every launch `fixed` allows, in the order that breaks ties in time: without
    checkpointing before with it, sharded per node before across nodes, larger micro-batches first, sharded
    accumulation before unsharded (offered where there are shards and more than one micro-batch)."""
    cuda = hw.device == "cuda"
    ckpts = (False, True) if fixed.checkpointing is None else (fixed.checkpointing,)
    shardings = _sharding_options(hw, ranks)
    if fixed.sharding is not None and ranks > 1:
        shardings = [fixed.sharding if ranks > hw.gpus_per_node else "full"]
    micros = _powers_of_two(per_rank, per_rank) if fixed.grad_accum is None else [per_rank // fixed.grad_accum]
    for ckpt in ckpts:
        for sharding in shardings:
            shards = _shards(sharding, hw, ranks)
            for micro in micros:
                for unsharded in _accumulations(fixed, shards, per_rank // micro):
                    # FSDP2 gathers the student in bf16 on GPUs (distill.parallel.shard's MixedPrecisionPolicy);
                    # one process trains its float32 student under bf16 autocast, which caches bf16 copies.
                    yield sharding, Launch(shards=shards, micro=micro, checkpointing=ckpt,
                                           teacher_bytes=dtype_bytes(dt), gather_bytes=2 if cuda and shards > 1 else 4,
                                           compute_bytes=2 if cuda else 4, autocast_cache=cuda and shards == 1,
                                           unsharded=unsharded)  # fmt: skip


def _accumulations(fixed: Fixed, shards: int, grad_accum: int) -> tuple[bool, ...]:
    """Unsharded accumulation (True) is a choice only with shards and more than one micro-batch; elsewhere the
    two are the same launch."""
    if shards == 1 or grad_accum == 1:
        return (False,)
    return {None: (False, True), "sharded": (False,), "unsharded": (True,)}[fixed.accumulation]


def train_memory(stage: str, name: str, teacher: Layout, student: Layout, hw: Hardware, *, seq_len: int,
                 global_batch: int, loss_chunk: int = 4096, dtype: str | None = None, stored_bytes: int = 2,
                 fixed: Fixed | None = None, attention: str = "sdpa", quantize: str | None = None) -> Part:  # fmt: skip
    """A distillation's geometry, as `distill.loop` runs it: every device is a data-parallel rank (one process
    per GPU, as many as divide the batch: `data_parallel_ranks`; the CPU is one process; `fixed.ranks` when the
    launch is given); FSDP2 gathers the student in bf16 on GPUs (float32 master weights, float32 gradient
    reduction); of the launches that fit (sharding per node (HSDP) or across all nodes, activation checkpointing
    or not, the micro-batch a power of two dividing global_batch / ranks, grad_accum = global_batch / (micro x
    ranks)), the one whose step takes least time with its communication and recompute
    (`communication.step_traffic`; ties go to no checkpointing, HSDP, the larger micro-batch). `fixed` holds the
    choices the user made (with a grad_accum, the ranks divide global_batch / grad_accum); `attention` the attention
    implementation both models run (`kernels.ATTENTION_PATHS`); `quantize`: the student trains fake-quantized to
    that precision (`distill --quantize`). Without a fit, the last
    option tried (the smallest micro-batch), which does not fit; a batch that does not split evenly over the ranks
    (and the grad_accum given) does not fit either.
    """
    fixed = fixed or Fixed()
    dt = default_dtype(hw, dtype)
    accum = fixed.grad_accum or 1
    ranks = fixed.ranks or data_parallel_ranks(hw, max(1, global_batch // accum))
    host = _train_host(student, hw, min(ranks, hw.gpus_per_node), stored_bytes, quantize, ranks)
    interpreters = _train_interpreters(hw, min(ranks, hw.gpus_per_node), ranks, name == "candidate distillation")
    base = Geometry(devices=ranks, nodes=-(-ranks // hw.gpus_per_node), dtype=dt, global_batch=global_batch,
                    attention=attention)  # fmt: skip
    if global_batch % (ranks * accum):
        # Every rank runs the same micro-batches (FSDP2's collectives must match): refused before any launch.
        split = f"{ranks} processes" + (f" x --grad-accum {fixed.grad_accum}" if fixed.grad_accum else "")
        geo = base.model_copy(update={"grad_accum": fixed.grad_accum})
        return Part(stage=stage, name=name, geometry=geo, memory=Memory(), device_total=0, fits=False,
                    problem=f"its batch of {global_batch} sequences does not split evenly over {split}")  # fmt: skip
    note = None if ranks in (1, hw.devices) else f"{ranks} of the {hw.devices} devices: ranks must divide the batch"
    per_rank, part, best = global_batch // ranks, None, None
    by_sharding: dict[str, Part] = {}  # the fastest fitting launch of each sharding, else its smallest
    for sharding, ln in _launch_options(hw, ranks, per_rank, dt, fixed):
        mem = _step_memory(teacher, student, ln, hw, seq_len=seq_len, loss_chunk=loss_chunk, host=host,
                           interpreters=interpreters, eager=attention == "eager", quantize=quantize)  # fmt: skip
        geo = base.model_copy(update={"sharding": sharding, "micro_batch": ln.micro, "grad_accum": per_rank // ln.micro,
                                      "activation_checkpointing": ln.checkpointing,
                                      "accumulation": ("unsharded" if ln.unsharded else "sharded")
                                      if ln.shards > 1 else None,
                                      "logits_chunk": min(loss_chunk, ln.micro * seq_len)})  # fmt: skip
        traffic = step_traffic(teacher, student, hw, ranks=ranks, shards=ln.shards, micro=ln.micro,
                               grad_accum=per_rank // ln.micro, seq_len=seq_len, checkpointing=ln.checkpointing,
                               gather_bytes=ln.gather_bytes, teacher_bytes=ln.teacher_bytes,
                               unsharded=ln.unsharded)  # fmt: skip
        this = _part(stage, name, geo, mem, hw, note=note).model_copy(update={"traffic": traffic})
        export = _qad_export_problem(student, hw, mem) if quantize == "nvfp4" and ln.shards > 1 else None
        if this.fits and export is not None:
            this = this.model_copy(update={"fits": False, "problem": export})
        if ln.unsharded and not this.fits and fixed.accumulation is None:
            continue  # unsharded accumulation only adds memory: a refusal shows the sharded launch's figures
        part = this
        # Strictly faster by more than rounding: equal times (all hidden under compute) keep the earlier option.
        if part.fits and (best is None or traffic.step_seconds < best.traffic.step_seconds * (1 - 1e-9)):
            best = part
        seen = by_sharding.get(sharding)
        if seen is None or not seen.fits or (part.fits and traffic.step_seconds < seen.traffic.step_seconds):
            by_sharding[sharding] = part
    assert part is not None
    if best is not None:
        return best.model_copy(update={"traffic": best.traffic.model_copy(update={"why": _why(best, by_sharding, hw)})})
    given = fixed.given()
    if not given:
        return part
    # The refusal names the choices the plan was not free to make: they are what to change.
    return part.model_copy(update={"problem": f"{part.problem}, with {given} as given"})


def _why(chosen: Part, by_sharding: dict[str, Part], hw: Hardware) -> str | None:
    """Why the chosen sharding beat the other (one clause), when the ranks span nodes and both were open."""
    other = next((p for s, p in by_sharding.items() if s != chosen.geometry.sharding), None)
    if other is None:
        return None
    names = {"full": "full sharding", "per_node": "HSDP"}
    mine, theirs = names[chosen.geometry.sharding], names[other.geometry.sharding]
    if not other.fits:
        return f"{mine}: {theirs} does not fit (needs {gib(other.device_total)} per device, {gib(usable(hw))} usable)"
    t, o = chosen.traffic, other.traffic
    assert t is not None and o is not None
    if t.step_seconds >= o.step_seconds * (1 - 1e-9):
        return f"{mine}: as fast as {theirs} ({other.geometry.describe()}), with less traffic between nodes"
    return f"{mine}: {t.step_seconds:.1f} s per step against {o.step_seconds:.1f} s with {theirs} ({other.geometry.describe()})"


def distill_memory(teacher: Layout, student: Layout, hw: Hardware, ds, *, processes: int | None = None,
                   stored_bytes: int = 2) -> Part:  # fmt: skip
    """The distill stage's part for `ds` (a `settings.DistillSettings`): its grad_accum, activation_checkpointing
    and sharding where set (None: the plan's), on `processes` ranks when the launch fixes them."""
    fixed = Fixed(ranks=processes, grad_accum=ds.grad_accum, checkpointing=ds.activation_checkpointing,
                  sharding=ds.sharding, accumulation=ds.accumulation)  # fmt: skip
    return train_memory("distill", "distill", teacher, student, hw, seq_len=ds.seq_len, global_batch=ds.batch_size,
                        loss_chunk=ds.loss_chunk, dtype=ds.teacher_dtype, stored_bytes=stored_bytes, fixed=fixed,
                        attention=ds.attn_implementation, quantize=ds.quantize)  # fmt: skip


def candidate_distill_memory(parent: Layout, student: Layout, hw: Hardware, ps, *, dtype: str | None = None,
                             stored_bytes: int = 2) -> Part:  # fmt: skip
    """Candidate distillation (`candidates.distill_candidates`) for `ps` (a `settings.PruneSettings`), launched
    like the distill stage, in processes of its own (the prune process holds nothing of it)."""
    return train_memory("prune", "candidate distillation", parent, student, hw, seq_len=ps.seq_len,
                        global_batch=ps.candidate_distill_batch, dtype=dtype, stored_bytes=stored_bytes,
                        loss_chunk=DistillSettings.model_fields["loss_chunk"].default)  # fmt: skip


def distill_stage(teacher: Layout, student: Layout, hw: Hardware, ds, *, processes: int | None = None,
                  stored_bytes: int = 2) -> StageMemory:  # fmt: skip
    """The distill stage for `ds` (a `settings.DistillSettings`) on `processes` ranks when the launch fixes them."""
    return StageMemory(stage="distill", parts=[distill_memory(teacher, student, hw, ds, processes=processes,
                                                          stored_bytes=stored_bytes)])  # fmt: skip
