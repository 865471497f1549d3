"""What a distillation's FSDP2 collectives move per rank per optimizer step, and how long the step takes with them.

    step_traffic(teacher, student, hw, ranks=64, shards=64, micro=1, grad_accum=12, seq_len=8192, ...) -> Traffic

The collectives `distill.parallel.shard` and `distill.loop` run, per micro-batch, over the `shards` ranks that
share a copy of the weights (all ranks with full sharding; one node's GPUs with HSDP):
- all-gather of every student block before its forward and again before its backward (FSDP2 frees a block's
  gathered weights after its forward; activation checkpointing's recompute runs inside the backward, after that
  gather, so it gathers nothing more); of every teacher block once (the teacher has no backward); of the root
  unit (both models' embeddings, final norms and LM heads) once, as FSDP2 keeps the root gathered from its forward
  to the end of its backward;
- reduce-scatter of every student gradient in float32, after every micro-batch (sharded accumulation: a rank never
  holds unsharded gradients) or once per step, in the last micro-batch's backward (unsharded accumulation).
Per step, HSDP adds one all-reduce of each rank's float32 gradient shard across the node copies.

A ring collective over n ranks moves (n - 1) / n of the gathered (or reduced) tensor through each rank, and an
all-reduce twice that. A group inside one node runs at the hardware's intra-node bandwidth; a group that spans
nodes at the slower of the two (its ring crosses the network). Small collectives (the loss and gradient-norm
reductions: a few numbers per step) are left out.

Time: FSDP2 prefetches the next block's gather and reduce-scatters the previous block's gradients while a block
computes, so a micro-batch is counted as the longer of its compute and its gathers and reduce-scatters (perfect
overlap: an optimistic bound; the first gather and the last reduce-scatter of each micro-batch, one block each,
are left out). HSDP's all-reduce across nodes runs in the last micro-batch's backward, after each block's
reduce-scatter: that micro-batch is counted as the longer of its compute and all of its communication. Compute:
6 FLOPs per student parameter per token (forward and backward), 2 more with activation checkpointing (the recompute
is one more forward: a third of 6N), 2 per teacher parameter (its forward), at `flops_per_s` per GPU.
"""

from __future__ import annotations

from pydantic import BaseModel, Field

from minipuzzle.anatomy import MOE
from minipuzzle.arch import Layout
from minipuzzle.hardware import Hardware

# The sustained throughput every GPU-hour estimate is priced at (the search's and the recipe's too): an H100 at
# ~40 % of its 989 TFLOP/s dense bf16 peak.
H100_FLOPS = 400e12
# FSDP2 reduces the student's gradients in float32 (`distill.parallel.shard`'s reduce_dtype).
REDUCE_BYTES = 4
# Routers keep float32 and are gathered as stored (their own FSDP2 units).
ROUTER_BYTES = 4


class Traffic(BaseModel):
    """One rank's collectives in one optimizer step, and the step's time. Bytes are what pass through one rank
    (received for a gather, sent for a reduction); seconds are per step."""

    shards: int
    replicas: int
    link: str
    bandwidth: float
    gathered: int
    reduced: int
    all_reduced: int
    gather_seconds: float
    reduce_seconds: float
    all_reduce_seconds: float
    compute_seconds: float
    step_seconds: float
    why: str | None = Field(None, description="why this sharding rather than the other (the memory plan's choice)")

    @property
    def exposed_seconds(self) -> float:
        """What communication adds to the step beyond its compute."""
        return max(0.0, self.step_seconds - self.compute_seconds)

    def describe(self) -> str:
        """'gathers 4.0 TB, reduce-scatters 2.7 TB per rank per step; 170 s over the network (40 GB/s); compute
        138 s; step 170 s (32 s of communication not hidden)' (one line)."""
        parts = [f"gathers {_tb(self.gathered)}, reduce-scatters {_tb(self.reduced)}"]
        if self.all_reduced:
            parts.append(f"all-reduces {_tb(self.all_reduced)} across {self.replicas} nodes")
        comm = self.gather_seconds + self.reduce_seconds
        out = f"{', '.join(parts)} per rank per step; {comm:.1f} s over {self.link} ({self.bandwidth / 1e9:.0f} GB/s)"
        if self.all_reduced:
            out += f" + {self.all_reduce_seconds:.1f} s over the network"
        return (f"{out}; compute {self.compute_seconds:.1f} s; step {self.step_seconds:.1f} s "
                f"({self.exposed_seconds:.1f} s of communication not hidden)")  # fmt: skip


def _tb(n: float) -> str:
    return f"{n / 1e12:.2f} TB" if n >= 1e11 else f"{n / 1e9:.2f} GB"


def router_params(layout: Layout) -> int:
    """Parameters of the MoE routers ([experts, hidden] per MoE layer), which FSDP2 gathers in float32."""
    return layout.count(MOE) * layout.n_routed_experts * layout.hidden_size if layout.is_moe else 0


def train_flops_per_token(teacher: Layout, student: Layout, checkpointing: bool) -> float:
    """6 x student parameters (forward and backward), + 2 x student with activation checkpointing (the recompute:
    one more forward), + 2 x teacher parameters (its forward)."""
    return (6 + (2 if checkpointing else 0)) * student.num_params() + 2 * teacher.num_params()


def step_traffic(teacher: Layout, student: Layout, hw: Hardware, *, ranks: int, shards: int, micro: int,
                 grad_accum: int, seq_len: int, checkpointing: bool, gather_bytes: int, teacher_bytes: int,
                 unsharded: bool = False, flops_per_s: float = H100_FLOPS) -> Traffic:  # fmt: skip
    """One optimizer step of `ranks` data-parallel ranks, parameters sharded over groups of `shards` (replicated
    over ranks / shards groups: HSDP when that is more than 1), `grad_accum` micro-batches of `micro` sequences of
    `seq_len` tokens per rank; the student gathered in `gather_bytes` floats, the teacher in `teacher_bytes`;
    `unsharded`: gradients reduce-scattered once per step instead of after every micro-batch."""
    replicas = max(1, ranks // shards)
    root_s, root_t = student.embedding_params(), teacher.embedding_params()
    r_s, r_t = router_params(student), router_params(teacher)
    blocks_s = student.num_params() - root_s - r_s
    blocks_t = teacher.num_params() - root_t - r_t
    ring = (shards - 1) / shards
    # The student's last block, gathered a third time (measured with an MLP block last; a MoE block's router is a
    # unit of its own, counted like the other routers, which is not measured).
    last = student.layer_params(student.pattern[-1]) - (router_params(student) // student.count(MOE)
                                                        if student.pattern[-1] == MOE else 0)  # fmt: skip
    # The root is gathered in the student's gather dtype (it owns both models' embeddings and heads).
    per_micro_gather = (2 * (blocks_s * gather_bytes + r_s * ROUTER_BYTES) + last * gather_bytes
                        + blocks_t * teacher_bytes + r_t * ROUTER_BYTES + (root_s + root_t) * gather_bytes)  # fmt: skip
    per_micro_reduce = student.num_params() * REDUCE_BYTES
    gathered = int(ring * per_micro_gather * grad_accum)
    reduced = int(ring * per_micro_reduce * (1 if unsharded else grad_accum))
    # HSDP: each rank's float32 gradient shard, all-reduced over the node copies once per step.
    all_reduced = int(2 * (replicas - 1) / replicas * per_micro_reduce / shards) if replicas > 1 else 0
    spans_nodes = shards > hw.gpus_per_node
    bw = min(hw.intra_node_bytes_per_s, hw.inter_node_bytes_per_s) if spans_nodes else hw.intra_node_bytes_per_s
    link = "the network" if spans_nodes else "a node's links"
    gather_s, reduce_s = (gathered / bw, reduced / bw) if shards > 1 else (0.0, 0.0)
    all_reduce_s = all_reduced / hw.inter_node_bytes_per_s
    compute = micro * seq_len * train_flops_per_token(teacher, student, checkpointing) / flops_per_s
    if unsharded:  # the micro-batches before the last reduce nothing; the last reduces the whole step's sum
        early = gather_s / grad_accum
        last_micro = early + reduce_s
    else:
        early = last_micro = (gather_s + reduce_s) / grad_accum
    step = (grad_accum - 1) * max(compute, early) + max(compute, last_micro + all_reduce_s)
    return Traffic(shards=shards, replicas=replicas, link=link, bandwidth=bw, gathered=gathered, reduced=reduced,
                   all_reduced=all_reduced, gather_seconds=gather_s, reduce_seconds=reduce_s,
                   all_reduce_seconds=all_reduce_s, compute_seconds=grad_accum * compute, step_seconds=step)  # fmt: skip
