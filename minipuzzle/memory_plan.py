"""Memory plans: what every stage of a run holds on each device, and the launch geometry that makes it fit,
computed from the layouts and the hardware before anything runs.

A `RunPlan` has one `StagePlan` per stage (score, prune, distill, eval). A stage has one `Part` per phase that runs
on its own (prune: candidate ranking, candidate distillation, the cut): a part's memory is freed before the next
starts, so a stage fits when each part does. A part says how it is launched (`Geometry`: devices, FSDP2 sharding,
micro-batch and grad-accum, streaming, activation checkpointing, row and logits chunks) and what one device holds
at the part's peak (`Memory`, bytes): weights, float32 master weights, optimizer state, gradients, activations
(for training, with and without checkpointing), logits chunks; and the host buffers of streaming (bytes per node).
It fits when the device total is within `USABLE` of a device's memory and the host buffers within `USABLE` of a
node's RAM (when known). On a CPU-only machine device and host are one memory, so both count against it.

The plan is the geometry each stage runs: scoring, candidate ranking, candidate distillation, distillation and
eval take their device, dtype, streaming, batch and launch from it (issue 12 item 3). A part may still carry
`today`, the accounting of what the code does where it departs from the plan; `RunPlan.refusal()` refuses such a
part when it does not fit (no stage departs from its plan at present).

Assumptions, each stated where its term is computed: activations follow transformers' NemotronH blocks; the Mamba
path is the hardware's (`Hardware.fused_mamba`, detected on a CUDA machine by `kernels.detect_mamba_path`): with the
fused kernels of the `gpu` extra, mamba-ssm keeps only the in_proj output and the scan output for the backward;
otherwise (the CPU, or GPUs without the kernels) transformers' PyTorch chunked scan keeps every [chunk x chunk]
segment sum and its float32 temporaries.

A training part also carries its `Traffic` (`communication.step_traffic`): what FSDP2 gathers and reduces per
rank per step and the step's time with it; of the launches that fit, the plan takes the fastest (HSDP or full
sharding, checkpointing or not, the micro-batch).

Distillation and candidate distillation have no `today`: `distill.loop` runs the geometry `plan_distill` chooses
(its micro-batch, grad-accum, checkpointing and FSDP2 sharding, parameters gathered in bf16 on GPUs), and
candidates are distilled through the same launcher, always in processes of their own (a child process, or torchrun
when the plan needs more devices), so the prune process's parts hold no training.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field, computed_field

from minipuzzle.anatomy import ATTENTION, MAMBA, MLP, MOE
from minipuzzle.arch import Layout
from minipuzzle.checkpoint.dtypes import dtype_bytes, long_name, short_name
from minipuzzle.communication import Traffic, step_traffic
from minipuzzle.hardware import Hardware
from minipuzzle.metrics import LOGIT_CHUNK
from minipuzzle.units import gib

# A part fits when its total, the process's baseline included, is within this share of a device's memory (and its
# host bytes within this share of a node's RAM). The share stands for what grows with the work: the caching
# allocator's reserve and fragmentation and NCCL's buffers on GPUs, malloc's arenas on the CPU; it is a judgement,
# not a measurement (issue 12 item 5 measures the plan's predictions against peaks). What does not grow with the
# work is a term of its own (`PROCESS_BYTES` ..., `CUDA_CONTEXT_BYTES`): 0.5 GiB is 0.6 % of an 80 GiB GPU but an
# interpreter is half of a 1 GB CPU limit, so no share could stand for both.
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
# transformers' NemotronHConfig.chunk_size, which NVIDIA's Nemotron-H configs keep: the PyTorch scan's chunk.
MAMBA_CHUNK = 128
# Float32 [tokens, vocab] buffers alive at once in distill.losses._forward_kl_chunk: student and teacher logits,
# both log-softmaxes, p, then exp(s_logp) - p and its scaled copy while the previous ones are still referenced.
TRAIN_LOGIT_BUFFERS = 7
# Float32 [tokens, vocab] buffers alive in metrics.next_token_sums with a teacher: both logits, both log-softmaxes,
# and the two temporaries of kl_from_log_probs.
EVAL_LOGIT_BUFFERS = 6
# importance.depth._logit_sums sizes each logits slice to 2**26 values (256 MiB in float32).
DEPTH_LOGITS_SLICE = 2**26
# search.ranking.measure_streamed's default `host_bytes`: the parent's final states kept per group of windows.
RANK_HOST_BYTES = 8 * 2**30
# The largest output shard a cut writes (safetensors writes a shard from memory, so one is buffered whole); the plan
# makes it smaller where the host is small (`cut_shard_bytes`): shards are an on-disk convenience, smaller ones cost
# nothing but a longer index.
SHARD_BYTES = 5 * 10**9
# Of the memory a cut may use, the share its output shard takes (the rest: the tensor read and its cut copy).
CUT_SHARD_SHARE = 0.25


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
    today: Part | None = None
    traffic: Traffic | None = Field(None, description="training: one rank's collectives and time per step")

    @computed_field
    @property
    def runnable(self) -> bool:
        """The plan fits and so does what today's code holds (when that differs)."""
        return self.fits and (self.today is None or self.today.fits)


class StagePlan(BaseModel):
    stage: str
    parts: list[Part]

    @computed_field
    @property
    def fits(self) -> bool:
        return all(p.fits for p in self.parts)


class RunPlan(BaseModel):
    """The plan of every stage of a run on `hardware` (stages already finished may be left out)."""

    hardware: Hardware
    hardware_text: str
    usable_device_bytes: int
    stages: list[StagePlan]

    def refusal(self) -> str | None:
        """One line naming the first part that cannot run (its stage, what it needs, what the hardware has), or
        None when every part fits."""
        for st in self.stages:
            for p in st.parts:
                if not p.fits:
                    return f"{_label(p)} does not fit: {p.problem}"
                if p.today is not None and not p.today.fits:
                    return (f"{_label(p)} does not fit as the code runs it today ({p.today.note}): "
                            f"{p.today.problem}; the plan ({p.geometry.describe()}) needs {gib(p.device_total)}")  # fmt: skip
        return None


Part.model_rebuild()


def _label(p: Part) -> str:
    return p.stage if p.name == p.stage else f"{p.stage} ({p.name})"


# ---- per-layer terms ----------------------------------------------------------------------------------------------


def largest_block(layout: Layout) -> int:
    """Parameters of the largest layer: the unit FSDP2 gathers at once, the layer a streamed pass holds."""
    return max(layout.layer_params(kind) for kind in set(layout.pattern))


def _scan_fallback(layout: Layout) -> int:
    """Bytes per token transformers' PyTorch chunked scan (`mamba2_chunk_scan`) keeps, all float32: the segment
    sums L, the C.B scores G and their product M ([chunk x heads] each), B and C repeated to every head and cut into
    chunks (and their einsum copies: 5 x heads x state), the chunk states (2 x heads x head_dim x state / chunk),
    x, dt.x, Y_diag, Y_off, the output and the gated norm's float32 tensors (9 x I), and per-head dt and A terms.
    Counted from the tensors autograd saves for one block (tests/test_memory_plan.py measures them)."""
    hp, n, p, i = layout.mamba_num_heads, layout.ssm_state_size, layout.mamba_head_dim, layout.mamba_intermediate
    return 4 * (3 * MAMBA_CHUNK * hp + 5 * hp * n + 2 * hp * p * n // MAMBA_CHUNK + 9 * i + 5 * hp)


def saved_bytes_per_token(layout: Layout, kind: str, b: int = 2, kernels: bool = True) -> int:
    """Bytes per token autograd keeps for the backward of one block of `kind`, computing in `b`-byte floats.

    Every block: RMSNorm keeps its float32 input and normalised output (8 h) and the projection its input (b h).
    MLP: relu's output and its square (down_proj's input), b x 2 x ffn. MoE: `_moe_saved`. Attention (SDPA's
    flash/efficient path): q, k, v, the output (read by o_proj as is) and a float32 log-sum-exp per head. Mamba
    with the fused kernels
    (mamba_ssm's split-conv1d-scan): in_proj's output [z|xBC|dt] and the scan output (I), a float32 rstd per group;
    the conv, the gated norm and out_proj's input are recomputed. Mamba without them: in_proj's output, the conv
    output twice (padded, then activated) and the PyTorch scan's tensors (`_scan_fallback`).
    """
    q, kv = _attention_widths(layout)
    mixer = {
        MLP: lambda: 2 * b * layout.intermediate_size,
        MOE: lambda: _moe_saved(layout, b),
        ATTENTION: lambda: b * (2 * q + 2 * kv) + 4 * layout.num_attention_heads,
        MAMBA: lambda: b * (layout.mamba_in_proj_rows + layout.mamba_intermediate) + 4 * layout.n_groups
        if kernels else b * (layout.mamba_in_proj_rows + 2 * layout.mamba_conv_dim) + _scan_fallback(layout),
    }  # fmt: skip
    return (8 + b) * layout.hidden_size + mixer[kind]()


def forward_bytes_per_token(layout: Layout, kind: str, b: int = 2, kernels: bool = True) -> int:
    """Peak bytes per token alive inside one block's forward without autograd (scoring, ranking, eval, the
    teacher): the block's input and output (2 b h), RMSNorm's float32 temporaries and output ((8 + b) h), then
    MLP: up_proj's output, relu and its square (3 b ffn); MoE: `_moe_forward`; attention: q, k, v, the SDPA
    output and its reshaped copy; Mamba with kernels: in_proj's output, the conv output, the scan output
    (b (rows + conv + I)), the scan's float32 chunk states and the gated norm's float32 temporaries (three [T, I]
    at once: 12 I); without kernels, the PyTorch scan's tensors, which stay referenced until it returns."""
    base = (2 * b + 8 + b) * layout.hidden_size
    if kind in (MLP, MOE, ATTENTION):
        q, kv = _attention_widths(layout)
        return base + {MLP: lambda: 3 * b * layout.intermediate_size, MOE: lambda: _moe_forward(layout, b),
                       ATTENTION: lambda: b * (3 * q + 2 * kv)}[kind]()  # fmt: skip
    i = layout.mamba_intermediate
    if kernels:
        states = 4 * layout.mamba_num_heads * layout.mamba_head_dim * layout.ssm_state_size // MAMBA_CHUNK
        return base + b * (layout.mamba_in_proj_rows + layout.mamba_conv_dim + i) + states + 12 * i
    return base + b * (layout.mamba_in_proj_rows + 2 * layout.mamba_conv_dim) + _scan_fallback(layout)


def _attention_widths(layout: Layout) -> tuple[int, int]:
    """(query width, key/value width) of an attention layer: heads x head_dim."""
    return layout.num_attention_heads * layout.head_dim, layout.num_key_value_heads * layout.head_dim


def _moe_saved(layout: Layout, b: int) -> int:
    """Bytes per token a mixture-of-experts mixer keeps for the backward beyond its RMSNorm (transformers'
    `NemotronHExperts` runs each routed expert on the tokens that chose it): per routed expert a token runs, its
    gathered input and weighted output (2 x expert input width) and relu's output and its square (2 x width); the
    shared expert's two (2 x its width); the router's float32 scores and mask (5 E), its float32 copy of the
    input when computing in bf16, and its int64 choices; with a latent space, fc2's input."""
    d, k, e = layout.moe_expert_input, layout.num_experts_per_tok, layout.n_routed_experts
    routed = k * (2 * d + 2 * layout.moe_intermediate_size) + 2 * layout.moe_shared_expert_intermediate_size
    latent = d if layout.moe_latent_size is not None else 0
    router = 5 * e + 40 * k + (4 * layout.hidden_size if b != 4 else 0)
    return b * (routed + latent) + router


def _moe_forward(layout: Layout, b: int) -> int:
    """Peak bytes per token of a mixture-of-experts mixer's forward without autograd beyond its RMSNorm: the
    router's float32 input copy, scores (3 E) and int64 one-hot choices (k x (E + 1)), the float32 sum of the
    experts' outputs (one expert input width), and the larger of one expert's pass (at most every token: its
    input, relu's output, its square and its output) and the shared expert's (3 x its width)."""
    d, k, e, w = (
        layout.moe_expert_input,
        layout.num_experts_per_tok,
        layout.n_routed_experts,
        layout.moe_intermediate_size,
    )
    router = 4 * layout.hidden_size + 12 * e + 8 * k * (e + 1)
    return router + 4 * d + b * max(2 * d + 2 * w, 3 * layout.moe_shared_expert_intermediate_size)


def _max_kind(layout: Layout, per_token, b: int, kernels: bool) -> int:
    return max(per_token(layout, kind, b, kernels) for kind in set(layout.pattern))


# ---- fitting ------------------------------------------------------------------------------------------------------


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


def _with_today(plan: Part, today: Part) -> Part:
    """Attach what today's code holds when the plan fits and that does not (a difference that fits does not
    matter here, and a plan that does not fit is refused for itself)."""
    return plan if today.fits or not plan.fits else plan.model_copy(update={"today": today})


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


def _read_host(layout: Layout, stored: int, streamed: bool, *, compute: int | None = None,
               hw: Hardware | None = None) -> int:  # fmt: skip
    """Host bytes of reading a checkpoint: a streamed pass reads one layer whole from the shards (and the
    embeddings when it opens); a load reads one tensor at a time, the largest being the embeddings [V, h]. Nothing
    when the weights are used as read (`compute` bytes equal to `stored` on a CPU `hw`): a tensor read from a shard
    is a view of its mapping and becomes the weight itself, with no copy beside it."""
    if hw is not None and hw.device == "cpu" and compute == stored:
        return 0
    emb = layout.vocab_size * layout.hidden_size
    return stored * (max(largest_block(layout), emb) if streamed else emb)


def _layerwise(layout: Layout, hw: Hardware, *, b: int, streamed: bool, rows: int, micro: int, seq_len: int,
               states: int, hooks: dict[str, int] | None = None, after: int = 0, logits: int = 0, host: int = 0,
               copies: int = 1) -> Memory:  # fmt: skip
    """A pass that runs windows through the layers one layer at a time (`importance.layerwise.iter_layerwise`,
    depth scores): `rows` windows of residual stream in `states` copies of [T, h] each, plus the largest of one
    block's forward over `micro` rows (with `hooks[kind]` bytes per token of the hooks it runs) and `after`, the
    bytes per token of what the pass computes once the walk is done. Streamed, the weights are the resident
    embeddings, final norm and head (`copies` of them: a pruned candidate cuts its own) and one block; otherwise
    the whole model (`copies` times: ranking in memory builds each candidate next to its parent)."""
    h, kernels, hooks = layout.hidden_size, hw.fused_mamba, hooks or {}
    if streamed:
        weights = (copies * layout.embedding_params() + largest_block(layout)) * b
    else:
        weights = copies * layout.num_params() * b
    block = max(forward_bytes_per_token(layout, kind, b, kernels) + hooks.get(kind, 0) for kind in set(layout.pattern))
    act = rows * states * seq_len * h * b + micro * seq_len * max(block, after)
    return Memory(weights=weights, activations=act, logits=logits, host_buffers=host, baseline=process_baseline(hw),
                  host_baseline=host_baseline(hw))


# ---- score --------------------------------------------------------------------------------------------------------


def _score_passes(layout: Layout, axes, metric: str, depth_samples: int, width_samples: int, b: int):
    """(name, rows, residual states per row, hook bytes per token by kind, bytes per token after the walk,
    logits bytes) of each scoring pass.

    Depth (`importance.depth`): the full state plus one per dropped layer (L + 1; block_influence keeps one).
    mse_hidden compares final norms: the full model's (b h), a float32 difference (4 h), its float64 copy and
    square (16 h); block_influence compares each block's input and output in float32; the logit metrics keep the
    final norms of every dropped state of a batch (L x h) and 2**26-value logits slices (`EVAL_LOGIT_BUFFERS`).
    Width (`importance.width`): the state and its final norm (2); each hook copies the tensor it reads to float32
    and takes its absolute value (two float32 copies): the norm output (hidden), down_proj's input (ffn), the x
    block of in_proj's output (Mamba axes), o_proj's input (attention heads).
    """
    h, n = layout.hidden_size, layout.num_layers
    out = []
    if "depth" in axes:
        after = {"mse_hidden": (b + 20) * h, "block_influence": (b + 8) * h}.get(metric, n * h * b)
        logits = 0 if metric in ("mse_hidden", "block_influence") else EVAL_LOGIT_BUFFERS * DEPTH_LOGITS_SLICE * 4
        out.append(("depth pass", depth_samples, 1 if metric == "block_influence" else n + 1, {}, after, logits))
    width = [a for a in axes if a != "depth"]
    if width:
        hidden = 8 * h if "hidden" in width else 0
        read = {MLP: ("ffn", layout.intermediate_size), MAMBA: ("mamba_heads", layout.mamba_intermediate),
                ATTENTION: ("attn_heads", layout.num_attention_heads * layout.head_dim)}  # fmt: skip
        if "mamba_head_dim" in width:  # reads the same x block as mamba_heads
            width.append("mamba_heads")
        hooks = {kind: hidden + (8 * c if axis in width else 0) for kind, (axis, c) in read.items()}
        out.append(("width pass", width_samples, 2, hooks, hidden, 0))
    return out


def plan_score(layout: Layout, hw: Hardware, *, seq_len: int, depth_samples: int, width_samples: int,
               batch_size: int = 8, depth_metric: str = "mse_hidden", axes=("depth", "ffn"),
               stream: bool | None = None, dtype: str | None = None, stored_bytes: int = 2,
               stage: str = "score") -> list[Part]:  # fmt: skip
    """Importance scoring on one device (`score_to_folder` runs one process): streamed from the shards when the
    whole model and one window's residual states would not fit (`stream` forces either), the largest forward batch
    <= `batch_size` that fits, and as many rows per chunk as the rest of the memory holds. One part per pass; the
    scoring code runs what `score_launch` reads from them."""
    dt = default_dtype(hw, dtype)
    b = dtype_bytes(dt)
    windows = max(depth_samples if "depth" in axes else 0, width_samples) * seq_len * 8

    def maker(streamed: bool, pas):
        _, _, states, hooks, after, logits = pas
        host = _read_host(layout, stored_bytes, streamed, compute=b, hw=hw) + windows
        return lambda micro, rows: _layerwise(layout, hw, b=b, streamed=streamed, rows=rows, micro=micro,
                                              seq_len=seq_len, states=states, hooks=hooks, after=after, logits=logits,
                                              host=host)  # fmt: skip

    passes = _score_passes(layout, axes, depth_metric, depth_samples, width_samples, b)
    whole_fits = all(_problem(maker(False, pas)(1, 1), hw) is None for pas in passes)
    streamed = stream if stream is not None else not whole_fits
    parts = []
    for pas in passes:
        mem, micro, rows = _fit_rows(maker(streamed, pas), hw, batch_size, pas[1])
        geo = Geometry(dtype=dt, streaming=streamed, micro_batch=micro, rows_per_chunk=rows)
        parts.append(_part(stage, pas[0], geo, mem, hw))
    return parts


def score_launch(layout: Layout, parts: list[Part], *, seq_len: int, depth_metric: str = "mse_hidden") -> dict:
    """What scoring takes from its plan's passes: {"stream", "batch_size", "budget_bytes", "dtype"}. The budget is
    the residual-stream bytes of each pass's planned rows (`layerwise.rows_per_chunk` divides it by a row's
    states again), the smallest over the passes, so no pass holds more rows than planned."""
    dt = parts[0].geometry.dtype
    states = {name: n for name, _, n, *_ in _score_passes(layout, ("depth", "ffn"), depth_metric, 1, 1, 2)}
    row = seq_len * layout.hidden_size * dtype_bytes(dt)
    budget = min(p.geometry.rows_per_chunk * states[p.name] * row for p in parts)
    return {"stream": parts[0].geometry.streaming, "batch_size": min(p.geometry.micro_batch for p in parts),
            "budget_bytes": budget, "dtype": dt}  # fmt: skip


# ---- prune: ranking and the cut -----------------------------------------------------------------------------------


def plan_ranking(layout: Layout, hw: Hardware, *, seq_len: int, samples: int, batch_size: int = 8,
                 dtype: str | None = None, stored_bytes: int = 2, stream: bool | None = None) -> Part:  # fmt: skip
    """Candidate ranking (`search.pipeline.rank`) on one device in the compute dtype, logits `LOGIT_CHUNK` tokens
    at a time. In memory (`ranking.measure_in_memory`: the parent whole plus each cut candidate, the parent's final
    states of every window on the host) when that fits, else streamed layer by layer (`ranking.measure_streamed`:
    each candidate cuts its own embeddings and head, so two sets are resident; the parent's final states
    [group, T, h] kept on the host for groups of windows within `RANK_HOST_BYTES`, fewer when that does not fit);
    `stream` forces either. The
    largest forward batch <= `batch_size` that fits, and as many rows per chunk as the rest holds."""
    dt = default_dtype(hw, dtype)
    b = dtype_bytes(dt)
    t, v, h, windows = seq_len, layout.vocab_size, layout.hidden_size, samples * seq_len * 8

    def make_for(streamed: bool, group: int):
        host = group * t * h * b + _read_host(layout, stored_bytes, streamed) + windows
        return lambda micro, rows: _layerwise(
            layout, hw, b=b, streamed=streamed, rows=rows, micro=micro, seq_len=t, states=2, copies=2, host=host,
            logits=min(LOGIT_CHUNK, micro * t) * v * (EVAL_LOGIT_BUFFERS * 4 + b))  # fmt: skip

    in_memory = make_for(False, samples)
    streamed = stream if stream is not None else _problem(in_memory(1, 1), hw) is not None
    if not streamed:
        mem, micro = _fit_micro(lambda m: in_memory(m, m), hw, min(batch_size, samples))
        geo = Geometry(dtype=dt, micro_batch=micro, logits_chunk=min(LOGIT_CHUNK, t))
        return _part("prune", "ranking", geo, mem, hw)
    group = max(1, min(samples, RANK_HOST_BYTES // (t * h * b)))
    while True:  # on the CPU the host's share competes with the rows: halve the group until both fit
        mem, micro, rows = _fit_rows(make_for(True, group), hw, batch_size, group)
        if group == 1 or _problem(mem, hw) is None:
            break
        group //= 2
    geo = Geometry(dtype=dt, streaming=True, micro_batch=micro, rows_per_chunk=rows, host_group=group,
                   logits_chunk=min(LOGIT_CHUNK, t))  # fmt: skip
    return _part("prune", "ranking", geo, mem, hw)


def largest_tensor(layout: Layout) -> int:
    """Elements of the largest single tensor a checkpoint of `layout` stores: the embeddings or LM head [V, h], or
    a layer's largest matrix (Mamba in_proj, an MLP or attention projection, one expert, the shared expert)."""
    h, kinds = layout.hidden_size, set(layout.pattern)
    sizes = [layout.vocab_size * h]
    if "M" in kinds:
        sizes.append(h * layout.mamba_in_proj_rows)
    if "-" in kinds:
        sizes.append(h * layout.intermediate_size)
    if "*" in kinds:
        sizes.append(h * max(layout.num_attention_heads * layout.head_dim, layout.num_key_value_heads * layout.head_dim))
    if "E" in kinds:
        sizes.append(h * max(layout.moe_intermediate_size, layout.moe_shared_expert_intermediate_size))
    return max(sizes)


def _cut_memory(hw: Hardware) -> int | None:
    """Bytes a cut may use beside its interpreter: it runs on the host (the device itself on a CPU-only machine);
    None when unknown."""
    host = host_device(hw)
    return max(0, usable(host) - TOOL_BYTES) if host is not None else None


def cut_shard_bytes(layout: Layout, hw: Hardware, stored_bytes: int = 2) -> int:
    """The output shard size a cut on `hw` writes: `CUT_SHARD_SHARE` of the memory it may use, at least the largest
    tensor (a shard holds whole tensors), at most `SHARD_BYTES` and the model."""
    room = _cut_memory(hw)
    share = SHARD_BYTES if room is None else int(CUT_SHARD_SHARE * room)
    # No shard is larger than the whole model (a cut of a small model buffers all of it, not a 5 GB shard).
    return min(SHARD_BYTES, layout.num_params() * stored_bytes, max(largest_tensor(layout) * stored_bytes, share))


def plan_cut(layout: Layout, hw: Hardware, *, stored_bytes: int = 2) -> Part:
    """Cutting the chosen layout (`surgery.prune_checkpoint`) on the host: the output shard being filled
    (`cut_shard_bytes`), plus the tensor read and its cut copy (at most the largest tensor each; a tensor read is
    a view of the shard's mapping, resident while it is used)."""
    shard = cut_shard_bytes(layout, hw, stored_bytes)
    host = shard + 2 * largest_tensor(layout) * stored_bytes
    geo = Geometry(devices=0 if hw.device == "cuda" else 1, dtype=_stored_name(stored_bytes), streaming=True,
                   shard_bytes=shard)  # fmt: skip
    # The cut runs on the host and builds no model: its interpreter is the CPU's device baseline, a host one on GPUs.
    mem = Memory(host_buffers=host, baseline=TOOL_BYTES if hw.device == "cpu" else 0,
                 host_baseline=0 if hw.device == "cpu" else TOOL_BYTES)  # fmt: skip
    return _part("prune", "cut", geo, mem, hw, note=f"output shards of {gib(shard)}")


def _stored_name(stored_bytes: int) -> str:
    return "float32" if stored_bytes == 4 else "bfloat16"


# ---- training: distillation and candidate distillation ------------------------------------------------------------


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


def _train_states(teacher: Layout, student: Layout, ln: Launch) -> dict[str, int]:
    """Weights, master weights, optimizer state and gradients on one device.

    Sharded (FSDP2, `distill.parallel.shard`): the student's float32 parameters, AdamW moments and float32
    gradients are split over the shards (4 + 8 + 4 bytes per parameter / shards), the teacher's parameters too.
    Gradients stay sharded through gradient accumulation because `distill.loop` reduce-scatters after every
    micro-batch (HSDP's all-reduce across nodes waits for the last one; its partial sums are shards too):
    accumulating unsharded would hold 4 bytes per student parameter on every rank.
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
    grads = 4 * ps // ln.shards + largest_block(student) * (ln.gather_bytes + 4) + vh * ln.gather_bytes
    return {"weights": pt * ln.teacher_bytes // ln.shards + root + units,
            "master_weights": 4 * ps // ln.shards, "optimizer_state": 8 * ps // ln.shards, "gradients": grads}  # fmt: skip


def _train_activations(teacher: Layout, student: Layout, ln: Launch, seq_len: int, kernels: bool) -> tuple[int, int]:
    """(checkpointed, full) activation bytes of one micro-batch of `ln.micro` sequences.

    Checkpointed (one checkpoint per block, non-reentrant): every block's input [T, h] in the residual dtype, plus
    one block recomputed in the backward: its saved tensors and as many again for their gradients. Full: every
    block's saved tensors plus one block's gradients. Both add the final hidden states of both models and the
    gradient of the student's ([T, h] each, `losses._HeadLoss`) and the teacher's forward, which runs while the
    student's activations are kept.
    """
    tokens, h, r = ln.micro * seq_len, student.hidden_size, ln.gather_bytes
    saved = [saved_bytes_per_token(student, kind, ln.compute_bytes, kernels) for kind in student.pattern]
    common = h * (2 * r + ln.teacher_bytes) + _max_kind(teacher, forward_bytes_per_token, ln.teacher_bytes, kernels)
    checkpointed = student.num_layers * h * r + 2 * max(saved)
    full = sum(saved) + max(saved)
    return tokens * (checkpointed + common), tokens * (full + common)


def _train_memory(teacher: Layout, student: Layout, ln: Launch, hw: Hardware, *, seq_len: int, loss_chunk: int,
                  host: int, interpreters: int = 0) -> Memory:  # fmt: skip
    """One device's memory for a training micro-step; logits: `TRAIN_LOGIT_BUFFERS` float32 [chunk, V] buffers of
    the chunked loss (`losses._forward_kl_chunk`), at most the micro-batch's tokens; `interpreters`: the node's
    host baseline (`_train_interpreters`)."""
    ckpt, full = _train_activations(teacher, student, ln, seq_len, hw.fused_mamba)
    logits = TRAIN_LOGIT_BUFFERS * min(loss_chunk, ln.micro * seq_len) * student.vocab_size * 4
    states = _train_states(teacher, student, ln)
    act = ckpt if ln.checkpointing else full
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


def _train_host(student: Layout, hw: Hardware, procs_per_node: int, stored: int) -> int:
    """Host bytes per node: each process reads every tensor whole before keeping its shard (the embeddings
    [V, h] are the largest), and the final save (`loop._write_final`) gathers the student one tensor at a time
    onto rank 0's host in float32, casts it to the stored dtype and buffers one output shard (`SHARD_BYTES`, at
    most the student). The two happen at different times."""
    read = procs_per_node * student.vocab_size * student.hidden_size * stored
    shard = min(SHARD_BYTES, student.num_params() * stored)
    save = shard + largest_tensor(student) * (4 + (stored if stored != 4 else 0))
    return max(read, save)


def data_parallel_ranks(hw: Hardware, global_batch: int) -> int:
    """Devices a distillation uses: the most that divide the global batch, in whole nodes beyond one node (every
    rank takes the same share of each batch). The CPU is one process."""
    if hw.device == "cpu":
        return 1
    g = hw.gpus_per_node
    return next(d for d in range(hw.devices, 0, -1) if global_batch % d == 0 and (d <= g or d % g == 0))


def _sharding_options(hw: Hardware, ranks: int) -> list[str]:
    """FSDP2 over one node's GPUs, replicated across nodes (HSDP), and over all ranks, when the ranks span nodes;
    over all ranks within one node. `plan_training` takes the faster of those that fit."""
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

    def given(self) -> str:
        """The choices made, as the options that make them: '--grad-accum 1, --sharding per_node'."""
        flags = (("--grad-accum", self.grad_accum), ("--sharding", self.sharding),
                 ("--activation-checkpointing", self.checkpointing))  # fmt: skip
        return ", ".join(f"{flag} {v}" for flag, v in flags if v is not None)


def _launch_options(hw: Hardware, ranks: int, per_rank: int, dt: str, fixed: Fixed):
    """(sharding, Launch) of every launch `fixed` allows, in the order that breaks ties in time: without
    checkpointing before with it, sharded per node before across nodes, larger micro-batches first."""
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
                # FSDP2 gathers the student in bf16 on GPUs (distill.parallel.shard's MixedPrecisionPolicy);
                # one process trains its float32 student under bf16 autocast, which caches bf16 copies.
                yield sharding, Launch(shards=shards, micro=micro, checkpointing=ckpt, teacher_bytes=dtype_bytes(dt),
                                       gather_bytes=2 if cuda and shards > 1 else 4, compute_bytes=2 if cuda else 4,
                                       autocast_cache=cuda and shards == 1)  # fmt: skip


def plan_training(stage: str, name: str, teacher: Layout, student: Layout, hw: Hardware, *, seq_len: int,
                  global_batch: int, loss_chunk: int = 4096, dtype: str | None = None, stored_bytes: int = 2,
                  fixed: Fixed | None = None) -> Part:  # fmt: skip
    """A distillation's geometry, as `distill.loop` runs it: every device is a data-parallel rank (one process
    per GPU, as many as divide the batch: `data_parallel_ranks`; the CPU is one process; `fixed.ranks` when the
    launch is given); FSDP2 gathers the student in bf16 on GPUs (float32 master weights, float32 gradient
    reduction); of the launches that fit (sharding per node (HSDP) or across all nodes, activation checkpointing
    or not, the micro-batch a power of two dividing global_batch / ranks, grad_accum = global_batch / (micro x
    ranks)), the one whose step takes least time with its communication and recompute
    (`communication.step_traffic`; ties go to no checkpointing, HSDP, the larger micro-batch). `fixed` holds the
    choices the user made (with a grad_accum, the ranks divide global_batch / grad_accum). Without a fit, the last
    option tried (the smallest micro-batch), which does not fit; a batch that does not split evenly over the ranks
    (and the grad_accum given) does not fit either.
    """
    fixed = fixed or Fixed()
    dt = default_dtype(hw, dtype)
    accum = fixed.grad_accum or 1
    ranks = fixed.ranks or data_parallel_ranks(hw, max(1, global_batch // accum))
    host = _train_host(student, hw, min(ranks, hw.gpus_per_node), stored_bytes)
    interpreters = _train_interpreters(hw, min(ranks, hw.gpus_per_node), ranks, name == "candidate distillation")
    base = Geometry(devices=ranks, nodes=-(-ranks // hw.gpus_per_node), dtype=dt, global_batch=global_batch)
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
        mem = _train_memory(teacher, student, ln, hw, seq_len=seq_len, loss_chunk=loss_chunk, host=host,
                            interpreters=interpreters)  # fmt: skip
        geo = base.model_copy(update={"sharding": sharding, "micro_batch": ln.micro, "grad_accum": per_rank // ln.micro,
                                      "activation_checkpointing": ln.checkpointing,
                                      "logits_chunk": min(loss_chunk, ln.micro * seq_len)})  # fmt: skip
        traffic = step_traffic(teacher, student, hw, ranks=ranks, shards=ln.shards, micro=ln.micro,
                               grad_accum=per_rank // ln.micro, seq_len=seq_len, checkpointing=ln.checkpointing,
                               gather_bytes=ln.gather_bytes, teacher_bytes=ln.teacher_bytes)  # fmt: skip
        part = _part(stage, name, geo, mem, hw, note=note).model_copy(update={"traffic": traffic})
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


def plan_distill(teacher: Layout, student: Layout, hw: Hardware, ds, *, processes: int | None = None,
                 stored_bytes: int = 2) -> Part:  # fmt: skip
    """The distill stage's part for `ds` (a `settings.DistillSettings`): its grad_accum, activation_checkpointing
    and sharding where set (None: the plan's), on `processes` ranks when the launch fixes them."""
    fixed = Fixed(ranks=processes, grad_accum=ds.grad_accum, checkpointing=ds.activation_checkpointing,
                  sharding=ds.sharding)  # fmt: skip
    return plan_training("distill", "distill", teacher, student, hw, seq_len=ds.seq_len, global_batch=ds.batch_size,
                         loss_chunk=ds.loss_chunk, dtype=ds.teacher_dtype, stored_bytes=stored_bytes, fixed=fixed)  # fmt: skip


def plan_candidate_distill(parent: Layout, student: Layout, hw: Hardware, ps, *, dtype: str | None = None,
                           stored_bytes: int = 2) -> Part:  # fmt: skip
    """Candidate distillation (`candidates.distill_candidates`) for `ps` (a `settings.PruneSettings`), launched
    like the distill stage, in processes of its own (the prune process holds nothing of it)."""
    from minipuzzle.settings import DistillSettings

    return plan_training("prune", "candidate distillation", parent, student, hw, seq_len=ps.seq_len,
                         global_batch=ps.candidate_distill_batch, dtype=dtype, stored_bytes=stored_bytes,
                         loss_chunk=DistillSettings.model_fields["loss_chunk"].default)  # fmt: skip


# ---- eval ---------------------------------------------------------------------------------------------------------


def _fit_micro(make, hw: Hardware, batch: int) -> tuple[Memory, int]:
    """The largest batch <= `batch` (as asked, else a power of two) whose memory `make(batch)` fits (1 when none
    does)."""
    for micro in _batches(batch):
        mem = make(micro)
        if _problem(mem, hw) is None:
            return mem, micro
    return make(1), 1


class EvalShape(BaseModel):
    """The eval settings a plan needs (`settings.EvalSettings` plus whether there are lm-eval tasks)."""

    seq_len: int
    samples: int
    batch_size: int
    held_out: bool = True
    tasks: bool = False
    speed: bool = True
    speed_batch: int = 1
    speed_len: int | None = None
    decode_tokens: int = 32


# Why an offloaded eval refuses its speed part: timing a model that reads its blocks from disk times the disk.
OFFLOAD_SPEED = ("speed cannot be measured on a model whose blocks are read from disk every forward (it does not "
                 "fit the device): turn speed off (--no-speed, or eval.speed: false in a recipe) or give eval more "
                 "memory")  # fmt: skip


def eval_weight_share(layout: Layout, k: int, dtype: str, offload: bool = False) -> int:
    """Bytes of `layout`'s weights one of `k` devices holds under a device map: its share, plus one block (a device
    map places whole blocks, so a device may hold one more than its share); the whole model when k = 1.
    Offloaded (`evaluate.placement.load_offloaded`), the largest unit read at once: a block, or the embeddings or
    LM head [V, h]."""
    b = dtype_bytes(dtype)
    if offload:
        return max(largest_block(layout), layout.vocab_size * layout.hidden_size) * b
    return layout.num_params() * b if k == 1 else -(-layout.num_params() * b // k) + largest_block(layout) * b


def _eval_parts(models: list[Layout], hw: Hardware, ev: EvalShape, dt: str, k: int, sequential: bool,
                host: int, offload: bool = False) -> list[tuple[str, Memory, int]]:  # fmt: skip
    """(name, memory, batch) of each eval part over `k` devices: both models resident (each spread by
    `eval_weight_share`) or, `sequential`, one at a time (the teacher's final states [N, T, h] kept on the host and
    its LM head [V, h] next to the student for the KL); `offload`: one unit of a model read from disk at a time
    (the speed part is left to the caller). The largest batch <= eval.batch_size that fits. Held-out statistics
    come from final hidden states, logits `LOGIT_CHUNK` positions at a time (`metrics.TokenStats.add_states`). lm-eval (HFLM) builds [batch, T, V] logits and their float32 log-softmax;
    requests are counted at eval.seq_len tokens, an upper bound (most tasks are far shorter)."""
    b, kernels = dtype_bytes(dt), hw.fused_mamba
    shares = [eval_weight_share(m, k, dt, offload) for m in models]
    v, h, t = models[0].vocab_size, models[0].hidden_size, ev.seq_len
    weights = max(shares) if sequential else sum(shares)
    fwd = max(_max_kind(m, forward_bytes_per_token, b, kernels) for m in models)
    kl_host = ev.samples * t * h * b if sequential and len(models) > 1 else 0
    base = {"baseline": process_baseline(hw), "host_baseline": host_baseline(hw)}  # one process, on every GPU it uses

    def held_out(micro: int) -> Memory:  # the student's states and the teacher's (computed or read back)
        n = min(LOGIT_CHUNK, micro * t)
        return Memory(weights=weights + (v * h * b if kl_host else 0), host_buffers=host + kl_host,
                      activations=micro * t * (len(models) * h * b + fwd), logits=n * v * (EVAL_LOGIT_BUFFERS * 4 + b),
                      **base)  # fmt: skip

    def tasks(micro: int) -> Memory:
        return Memory(weights=weights, activations=micro * t * fwd, logits=micro * t * v * (b + 8), host_buffers=host,
                      **base)  # fmt: skip

    out = [("held-out", *_fit_micro(held_out, hw, min(ev.batch_size, ev.samples)))] if ev.held_out else []
    if ev.tasks:
        out.append(("tasks", *_fit_micro(tasks, hw, ev.batch_size)))
    if ev.speed and not offload:
        sl, sb = ev.speed_len or t, ev.speed_batch
        mems = [m.memory(short_name(dt), sl + ev.decode_tokens, sb) for m in models]
        cache = max(m["kv_cache"] + m["ssm_state"] + m["conv_state"] for m in mems)
        out.append(("speed", Memory(weights=weights, activations=sb * sl * fwd + cache, host_buffers=host, **base,
                                    logits=sb * sl * v * (b + 4)), sb))  # fmt: skip
    return out


def plan_eval(model: Layout, teacher: Layout | None, hw: Hardware, ev: EvalShape, *, dtype: str | None = None,
              stored_bytes: int = 2) -> StagePlan:  # fmt: skip
    """Evaluation of `model` against `teacher` (`evaluate.runner.evaluate` runs this plan): both resident and
    spread over as few of one node's GPUs as hold every part (accelerate's device map), else one model at a time
    over as few as hold it (`Geometry.sequential`); the largest batch that fits, held-out logits in chunks. When
    nothing holds a whole model, one model at a time on one device with its blocks read from the checkpoint every
    forward (`Geometry.streaming`), whose speed part is refused (`OFFLOAD_SPEED`)."""
    dt = default_dtype(hw, dtype)
    models = [model] + ([teacher] if teacher is not None else [])
    host = _read_host(model, stored_bytes, False, compute=dtype_bytes(dt), hw=hw) + ev.samples * ev.seq_len * 8
    most = hw.gpus_per_node if hw.device == "cuda" else 1
    options = [(k, seq) for seq in ((False, True) if teacher is not None else (False,)) for k in range(1, most + 1)]
    offload = False
    for k, sequential in options:
        parts = _eval_parts(models, hw, ev, dt, k, sequential, host)
        if all(_problem(mem, hw) is None for _, mem, _ in parts):
            break
    else:
        k, sequential, offload = 1, teacher is not None, True
        parts = _eval_parts(models, hw, ev, dt, 1, sequential, host, offload=True)
    note = "blocks are read from the checkpoint on disk every forward: nothing else fits" if offload else None
    out = []
    for name, mem, micro in parts:
        geo = Geometry(devices=k, sharding="device_map" if k > 1 else "none", dtype=dt, micro_batch=micro,
                       sequential=sequential, streaming=offload,
                       logits_chunk=min(LOGIT_CHUNK, ev.seq_len) if name == "held-out" else None)  # fmt: skip
        out.append(_part("eval", name, geo, mem, hw, note=note))
    if offload and ev.speed:
        geo = Geometry(dtype=dt, micro_batch=ev.speed_batch, sequential=sequential, streaming=True)
        out.append(Part(stage="eval", name="speed", geometry=geo, memory=Memory(), device_total=0, fits=False,
                        problem=OFFLOAD_SPEED, note=note))  # fmt: skip
    return StagePlan(stage="eval", parts=out)


# ---- stages from their settings, a recipe ---------------------------------------------------------------------------


def score_stage(
    layout: Layout, hw: Hardware, st, *, axes, dtype: str | None = None, stored_bytes: int = 2
) -> StagePlan:
    """The score stage for `st` (a `settings.ScoreSettings`) over `axes`."""
    return StagePlan(stage="score", parts=plan_score(
        layout, hw, seq_len=st.seq_len, depth_samples=st.depth_samples, width_samples=st.width_samples,
        batch_size=st.batch_size, depth_metric=st.depth_metric, axes=tuple(axes), stream=st.stream, dtype=dtype,
        stored_bytes=stored_bytes))  # fmt: skip


def prune_stage(layout: Layout, hw: Hardware, ps, *, student: Layout | None = None, dtype: str | None = None,
                stored_bytes: int = 2, scoring: bool = False) -> StagePlan:  # fmt: skip
    """The prune stage for `ps` (a `settings.PruneSettings`): its own scoring when it has no scores folder
    (`scoring`), candidate ranking, candidate distillation when it has steps, the cut. Scoring and ranking
    compute on `ps.device` (`compute_hardware`: the host when told cpu on a GPU machine) in `dtype` (default
    `ps.dtype`; auto: bf16 on GPUs, float32 on the CPU), as `search.pipeline.prune` runs them from this plan.
    `student` bounds the candidates (default: the source itself)."""

    chw = compute_hardware(hw, ps.device)
    kw = {"dtype": dtype or ps.dtype, "stored_bytes": stored_bytes, "stream": ps.stream}
    parts = []
    if scoring:
        parts += plan_score(layout, chw, seq_len=ps.seq_len, depth_samples=ps.depth_samples,
                            width_samples=ps.width_samples, batch_size=ps.batch_size, axes=tuple(ps.axes),
                            stage="prune", **kw)  # fmt: skip
    parts.append(plan_ranking(layout, chw, seq_len=ps.seq_len, samples=ps.held_out_samples, batch_size=ps.batch_size,
                              **kw))  # fmt: skip
    if ps.candidate_distill_steps:
        train_hw = for_device(hw, ps.device)
        if train_hw is not None:
            parts.append(plan_candidate_distill(layout, student or layout, train_hw, ps, dtype=kw["dtype"],
                                                stored_bytes=stored_bytes))  # fmt: skip
    parts.append(plan_cut(layout, hw, stored_bytes=stored_bytes))
    return StagePlan(stage="prune", parts=parts)


def compute_hardware(hw: Hardware, device: str | None) -> Hardware:
    """The hardware a one-device part computes on when told `device`: the host as the one device for cpu on a GPU
    machine (this machine's RAM standing in where the hardware does not give the host's), else `hw`."""
    if not str(device).startswith("cpu") or hw.device == "cpu":
        return hw
    from minipuzzle.hardware import host_ram

    return host_device(hw) or Hardware(device="cpu", gpu_memory=host_ram(), host_memory=host_ram())


def distill_stage(teacher: Layout, student: Layout, hw: Hardware, ds, *, processes: int | None = None,
                  stored_bytes: int = 2) -> StagePlan:  # fmt: skip
    """The distill stage for `ds` (a `settings.DistillSettings`) on `processes` ranks when the launch fixes them."""
    return StagePlan(stage="distill", parts=[plan_distill(teacher, student, hw, ds, processes=processes,
                                                          stored_bytes=stored_bytes)])  # fmt: skip


def eval_stage(model: Layout, teacher: Layout | None, hw: Hardware, es, *, held_out: bool = True,
               dtype: str | None = None, stored_bytes: int = 2) -> StagePlan:  # fmt: skip
    """The eval stage for `es` (a `settings.EvalSettings`); `held_out`: there is held-out text."""
    ev = EvalShape(seq_len=es.seq_len, samples=es.samples, batch_size=es.batch_size, held_out=held_out,
                   tasks=bool(es.tasks), speed=es.speed, speed_batch=es.speed_batch, speed_len=es.speed_len,
                   decode_tokens=es.decode_tokens)  # fmt: skip
    return plan_eval(model, teacher, hw, ev, dtype=dtype, stored_bytes=stored_bytes)


def model_facts(model: str, model_path: str | None = None) -> tuple[Layout, int]:
    """(layout, bytes per stored weight) of a preset, checkpoint folder or cached hub id, read from its config, so
    a preset needs no weights; 2 (bf16, as NVIDIA publishes) where the weights are not here."""
    from minipuzzle.checkpoint.read import Checkpoint
    from minipuzzle.checkpoint.resolve import describe_model, resolve_checkpoint
    from minipuzzle.errors import UserError

    _, layout = describe_model(model, model_path)
    try:
        path = resolve_checkpoint(model, model_path)
        return layout, Checkpoint(path).dtype().itemsize if (path / "config.json").is_file() else 2
    except UserError:
        return layout, 2


def for_device(hw: Hardware, device: str | None) -> Hardware | None:
    """The hardware a command runs on: the host when its --device is cpu on a GPU machine (None when the host's
    RAM is unknown), else `hw`."""
    return host_device(hw) if device == "cpu" and hw.device == "cuda" else hw


def check(hw: Hardware, *stages: StagePlan) -> None:
    """Raise `UserError` with the one line of the first part of `stages` that cannot run on `hw`."""
    from minipuzzle.errors import UserError

    refusal = RunPlan(hardware=hw, hardware_text=hw.describe(), usable_device_bytes=usable(hw),
                      stages=list(stages)).refusal()  # fmt: skip
    if refusal is not None:
        raise UserError(refusal)


def plan_recipe(recipe, teacher: Layout, hardware: Hardware, *, student: Layout | None = None,
                stored_bytes: int = 2, skip: tuple[str, ...] = ()) -> RunPlan:  # fmt: skip
    """The plan of every stage of `recipe` (a `recipe.Recipe`) for the teacher `teacher` on `hardware`.

    The student is not known before prune has run: until then distillation and eval are planned for the teacher's
    own layout, an upper bound (a pruned layout has at most its parent's layers and widths, so every term is at
    most the parent's). `stored_bytes`: the checkpoint's dtype (published Nemotron-H weights are bf16). `skip`:
    stages already finished.
    """
    from minipuzzle.recipe import prune_settings

    hw, bound = hardware, student or teacher
    dt = default_dtype(hw, recipe.model.dtype)
    # The run resolves model.device "auto" on the machine it runs on: the one planned for, not this one.
    device = "cpu" if recipe.model.device == "cpu" else hw.device
    kw = {"dtype": dt, "stored_bytes": stored_bytes}
    stages = {
        "score": lambda: score_stage(teacher, hw, recipe.importance, axes=recipe.search.axes, **kw),
        "prune": lambda: prune_stage(teacher, hw, prune_settings(recipe).model_copy(update={"device": device}),
                                     student=bound, stored_bytes=stored_bytes),
        "distill": lambda: distill_stage(teacher, bound, hw, recipe.distill.model_copy(update={"teacher_dtype": dt}),
                                         processes=recipe_processes(recipe.distill, hw), stored_bytes=stored_bytes),
        "eval": lambda: eval_stage(bound, teacher, hw, recipe.eval, **kw),
    }  # fmt: skip
    if recipe.distill is None:
        del stages["distill"]
    if recipe.quantize is not None:
        from minipuzzle.quantize.plan import plan_quantize

        quantize = lambda: plan_quantize(bound, hw, recipe.quantize, **kw)  # noqa: E731
        stages = {k: v for k, v in stages.items() if k != "eval"} | {"quantize": quantize, "eval": stages["eval"]}
    planned = [make() for name, make in stages.items() if name not in skip]
    return RunPlan(hardware=hw, hardware_text=hw.describe(), usable_device_bytes=usable(hw), stages=planned)


def recipe_processes(d, hw: Hardware) -> int | None:
    """The processes a recipe's distill section (a `recipe.DistillStage`) launches: 1 with the local launcher,
    nnodes x nproc_per_node where given, else None (the plan's)."""
    if d.launcher == "local":
        return 1
    if d.nnodes is None and d.nproc_per_node is None:
        return None
    return (d.nnodes or 1) * (d.nproc_per_node or hw.gpus_per_node)
