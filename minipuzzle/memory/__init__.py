"""Memory plans: what every stage of a run holds on each device, and the launch geometry that makes it fit,
computed from the layouts and the hardware before anything runs.

A `RunMemory` has one `StageMemory` per stage (score, prune, distill, quantize, eval). A stage has one `Part` per
phase that runs on its own (prune: candidate ranking, candidate distillation, the cut): a part's memory is freed
before the next starts, so a stage fits when each part does. A part says how it is launched (`Geometry`: devices,
FSDP2 sharding, micro-batch and grad-accum, streaming, activation checkpointing, row and logits chunks) and what one
device holds at the part's peak (`Memory`, bytes): weights, float32 master weights, optimizer state, gradients,
activations (for training, with and without checkpointing), logits chunks; and the host buffers of streaming (bytes
per node). It fits when the device total is within `USABLE` of a device's memory and the host buffers within
`USABLE` of a node's RAM (when known). On a CPU-only machine device and host are one memory, so both count against
it. The stages run the geometry their part gives: scoring, candidate ranking, candidate distillation, distillation
and eval take their device, dtype, streaming, batch and launch from it.

Modules, one job each: `parts` (the models), `fitting` (hardware terms, process baselines, what fits, the batch
search), `terms` (bytes per token of each layer kind, per model), and one planner per stage (`score`, `prune`,
`train`, `eval`); `source` reads a model's layout and stored bytes. A term that counts another module's buffers
takes its constant from that module (`distill.losses.KL_CHUNK_LOGIT_BUFFERS`, `metrics.EVAL_LOGIT_BUFFERS`,
`score.depth.DEPTH_LOGITS_SLICE`, `kernels.MAMBA_CHUNK`, `checkpoint.SHARD_BYTES`), so a change there changes
the plan. The recipe's whole run is planned outside this package (`recipe_memory`), which reads a recipe.

Assumptions, each stated where its term is computed: activations follow transformers' NemotronH blocks; the Mamba
path is the hardware's (`Hardware.fused_mamba`, detected on a CUDA machine by `kernels.detect_mamba_path`): with the
fused kernels of the `gpu` extra, mamba-ssm keeps only the in_proj output and the scan output for the backward;
otherwise (the CPU, or GPUs without the kernels) transformers' PyTorch chunked scan keeps every [chunk x chunk]
segment sum and its float32 temporaries.

A training part also carries its `Traffic` (`communication.step_traffic`): what FSDP2 gathers and reduces per
rank per step and the step's time with it; of the launches that fit, the plan takes the fastest (HSDP or full
sharding, checkpointing or not, the micro-batch). `distill.loop` runs the geometry `distill_memory` chooses, and
candidates are distilled through the same launcher, always in processes of their own (a child process, or torchrun
when the plan needs more devices), so the prune process's parts hold no training.
"""

from minipuzzle.checkpoint.dtypes import dtype_bytes
from minipuzzle.memory.eval import OFFLOAD_SPEED, EvalShape, eval_memory, eval_stage, eval_weight_share
from minipuzzle.memory.fitting import (
    CUDA_CONTEXT_BYTES,
    LAUNCHER_BYTES,
    PROCESS_BYTES,
    TOOL_BYTES,
    USABLE,
    check,
    compute_hardware,
    default_dtype,
    for_device,
    host_device,
    usable,
)
from minipuzzle.memory.parts import Geometry, Memory, Part, RunMemory, StageMemory
from minipuzzle.memory.prune import cut_memory, cut_shard_bytes, prune_stage, ranking_memory
from minipuzzle.memory.score import score_launch, score_memory, score_stage
from minipuzzle.memory.source import model_facts
from minipuzzle.memory.terms import forward_bytes_per_token, largest_block, largest_tensor, saved_bytes_per_token
from minipuzzle.memory.train import (
    Fixed,
    candidate_distill_memory,
    data_parallel_ranks,
    distill_memory,
    distill_stage,
    train_memory,
)

__all__ = [
    "CUDA_CONTEXT_BYTES", "LAUNCHER_BYTES", "OFFLOAD_SPEED", "PROCESS_BYTES", "TOOL_BYTES", "USABLE", "EvalShape",
    "Fixed", "Geometry", "Memory", "Part", "RunMemory", "StageMemory", "candidate_distill_memory", "check",
    "compute_hardware", "cut_memory", "cut_shard_bytes", "data_parallel_ranks", "default_dtype", "distill_memory",
    "distill_stage", "dtype_bytes", "eval_memory", "eval_stage", "eval_weight_share", "for_device",
    "forward_bytes_per_token", "host_device", "largest_block", "largest_tensor", "model_facts", "prune_stage",
    "ranking_memory", "saved_bytes_per_token", "score_launch", "score_memory", "score_stage", "train_memory", "usable",
]  # fmt: skip
