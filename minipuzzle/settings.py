"""One settings model per stage, shared by the library, the CLI and the recipe.

Every stage's library function takes its model (`score_to_folder`, `prune`, `distill`, `evaluate`); a recipe
section IS that model (validated by pydantic, errors naming the key); the stage's CLI options are generated from
its fields (`minipuzzle.cli_options`), so a setting is declared once: its type, default, bounds and help text
live on the field. Constructing a model directly (library or CLI)
raises `UserError` with one line naming the option.

Only the fields in `TRAJECTORY_FIELDS` decide the weights a distillation ends with; a resumed run checks them
against the run it continues, so a changed command cannot silently splice two different runs together.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from minipuzzle.checkpoint.dtypes import DTYPE_NAMES, PRECISION_BITS
from minipuzzle.errors import UserError
from minipuzzle.search.budget import make_budget
from minipuzzle.search.space import parse_axes
from minipuzzle.units import parse_bytes, parse_context, parse_count

# Imports inside functions here keep torch and transformers unloaded until a function needs them, so `--help`
# and the offline commands (dry runs, info, search) start fast.

# score.depth.DEPTH_METRICS, named here so that the CLI and recipes check them without importing torch.
DEPTH_METRICS = ("mse_hidden", "nmse_logits", "kl_logits", "lm_loss", "block_influence")
# score.width.DEFAULT_AGG, named here for the same reason.
DEFAULT_WIDTH_AGG = "abs_mean,l2"
# score.experts.EXPERT_ESTIMATORS (its default first), named here for the same reason.
EXPERT_ESTIMATORS = ("removal", "router_load", "output_norm")

# A warmup may take at most this share of the run. A longer one (the default 100 steps on a 60-step run) leaves
# the LR rising to the end with no decay; 10 % is what this project's own short runs use (candidate distillation
# warms up for steps // 10, the demo benchmark for steps // 16) and the usual warmup ratio of published recipes.
MAX_WARMUP_SHARE = 0.1

# Fields that change the training trajectory; everything else (logging, device, progress) may differ on resume.
TRAJECTORY_FIELDS = (
    "teacher", "student", "data", "split", "text_column", "eval_data", "held_out_windows", "max_steps", "seq_len",
    "batch_size", "grad_accum", "lr", "min_lr_ratio", "warmup", "weight_decay", "beta1", "beta2", "grad_clip",
    "temperature", "loss", "top_k", "lm_weight", "hidden_weight", "hidden_map", "seed", "quantize",
)  # fmt: skip


def flag(name: str) -> str:
    """The CLI flag of a settings field: seq_len -> --seq-len."""
    return "--" + name.replace("_", "-")


class SettingsError(UserError, ValueError):
    """A bad setting, in one line naming the option. `error` is pydantic's record of it; being a ValueError, it
    reaches a recipe's validation as that record, so recipe errors name the key (distill.lr), not the flag."""

    def __init__(self, message: str, error: dict[str, Any]):
        super().__init__(message)
        self.error = error


def user_error(err: ValidationError) -> SettingsError:
    """The first problem of a validation error as one line naming the option."""
    first = err.errors()[0]
    msg = first["msg"].removeprefix("Value error, ")
    if not first["loc"] or first["type"] == "value_error":  # this module's checks name the option themselves
        return SettingsError(msg, first)
    opt = flag(str(first["loc"][0]))
    if first["type"] == "literal_error":
        return SettingsError(f"unknown {opt} {first['input']!r}: {msg[0].lower()}{msg[1:]}", first)
    if first["type"] == "extra_forbidden":
        return SettingsError(f"unknown setting {opt}", first)
    return SettingsError(f"{opt}: {msg[0].lower()}{msg[1:]}, got {first['input']!r}", first)


class Settings(BaseModel):
    """A stage's settings: strict keys; direct construction raises `UserError` naming the option."""

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as e:
            raise user_error(e) from None


def parse_tokens(text: str | int | float | None) -> int | None:
    """'63B' -> 63e9, '7e9', '500M', '1000' -> a token count; None stays None.

    A ValueError (not a UserError), so that pydantic names the field or recipe key it came from.
    """
    if text is None:
        return None
    try:
        return parse_count(text, "--tokens")
    except UserError as e:
        raise ValueError(str(e)) from None


def parse_layer_pairs(text: str | None) -> list[tuple[int, int]]:
    """'0:0,1:2' -> [(0, 0), (1, 2)] (student layer, teacher layer); empty for None or ''."""
    pairs = []
    for item in (text or "").split(","):
        if not item.strip():
            continue
        try:
            s, t = (int(p) for p in item.strip().split(":"))
        except ValueError:
            raise ValueError(f"cannot read --hidden-map item {item!r}: use student:teacher, e.g. 0:0,1:2") from None
        if s < 0 or t < 0:
            raise ValueError(f"--hidden-map layer indices must be >= 0, got {item!r}")
        pairs.append((s, t))
    return pairs


class DataOptions(Settings):
    """Where a stage's text comes from, typed alike to `score`, `prune` and `eval`."""

    data: str | None = Field(None, description="Text: .txt/.jsonl/.parquet file, folder of text files, or datasets "
                             "hub name.")  # fmt: skip
    split: str = Field("train", description="Split of a hub dataset.")
    text_column: str = Field("text", description="Text column of a table or hub dataset.")
    streaming: bool | None = Field(
        None, description="Read table files and hub datasets as a stream (default: on); text files are always read "
        "lazily."
    )  # fmt: skip


class DeviceOptions(Settings):
    """Where and in what precision a stage computes, typed alike to `score` and `eval`."""

    device: str = Field("auto", description="cpu, cuda, cuda:N or auto (cuda when available).")
    dtype: Literal[DTYPE_NAMES] = Field(  # type: ignore[valid-type]
        "auto", description="Compute dtype: float32, bfloat16, float16 or auto (bfloat16 on a GPU, float32 on the CPU)."
    )


class ScoreSettings(Settings):
    """Importance scoring: how many calibration windows of how many tokens, and which depth metric."""

    depth_samples: int = Field(128, ge=1, description="Windows for the drop-one-layer pass (paper: 128).")
    width_samples: int = Field(1024, ge=1, description="Windows for the width pass (paper: 1024).")
    seq_len: int = Field(4096, ge=2, description="Tokens per calibration window.")
    depth_metric: str = Field(
        "mse_hidden", description="Layer importance: mse_hidden (MiniPuzzle), nmse_logits, kl_logits, lm_loss, "
        "block_influence."
    )  # fmt: skip
    width_agg: str = Field(
        DEFAULT_WIDTH_AGG, description="Width statistic SEQ,ROWS: over each row's tokens, then over rows."
    )
    expert_estimator: Literal[EXPERT_ESTIMATORS] = Field(  # type: ignore[valid-type]
        "removal", description="Routed experts of MoE layers: removal (output change when the expert is removed and "
        "tokens re-routed), router_load (routing weight) or output_norm (weighted output norm)."
    )  # fmt: skip
    stream: bool | None = Field(None, description="Read layers one at a time (default: when the model does not fit).")
    seed: int = Field(0, description="Seed for choosing calibration windows.")
    batch_size: int = Field(8, ge=1, description="Rows per forward call.")

    @field_validator("depth_metric")
    @classmethod
    def _metric(cls, v: str) -> str:
        if v not in DEPTH_METRICS:
            raise ValueError(f"unknown depth metric {v!r}: choose one of {', '.join(DEPTH_METRICS)}")
        return v

    @field_validator("width_agg")
    @classmethod
    def _agg(cls, v: str) -> str:
        # Imported here, only when a statistic is given: the defaults need no torch.
        from minipuzzle.score.width import parse_agg

        try:
            parse_agg(v)
        except UserError as e:
            raise ValueError(str(e)) from None
        return v


class BudgetSettings(Settings):
    """A budget as typed: a parameter target and/or an inference-memory limit at a precision, context and batch.

    `budget_for(source)` reads it against the source's layout (a fraction is a fraction of the source).
    """

    target: str | None = Field(
        None, description="Parameter budget: a preset (47b), a count (6.5e9, 740972) or a fraction of the source "
        "(0.8, 80%)."
    )  # fmt: skip
    target_active: str | None = Field(
        None, description="Active-parameter budget of a mixture-of-experts model (what one token runs through), "
        "read as --target; combines with --target and --memory."
    )  # fmt: skip
    memory: str | None = Field(None, description="Inference-memory budget (31.7GiB), at --precision, --context and "
                               "--batch.")  # fmt: skip
    precision: Literal[tuple(PRECISION_BITS)] = Field(  # type: ignore[valid-type]
        "bf16", description="Weight precision for --memory: bf16, fp8, fp4 (NVFP4)."
    )
    kv_precision: Literal[tuple(PRECISION_BITS)] | None = Field(  # type: ignore[valid-type]
        None, description="KV-cache precision (default: the weights')."
    )
    context: int = Field(8192, ge=1, description="Context length for --memory (8192, 128k, 1M).")
    batch: int = Field(1, ge=1, description="Sequences held at once for --memory.")

    @field_validator("target", "target_active", "memory", mode="before")
    @classmethod
    def _text(cls, v: Any) -> str | None:
        # YAML reads 0.83 or 6.5e9 as a number; the parsers take the text.
        return None if v is None else str(v)

    @field_validator("memory")
    @classmethod
    def _memory(cls, v: str | None) -> str | None:
        try:
            return v if v is None else (parse_bytes(v, "--memory") and v)
        except UserError as e:
            raise ValueError(str(e)) from None

    @field_validator("context", mode="before")
    @classmethod
    def _context(cls, v: Any) -> int:

        try:
            return parse_context(v) if isinstance(v, str) else v
        except UserError as e:
            raise ValueError(str(e)) from None

    def budget_for(self, source):
        """The `search.budget.Budget` of these settings for `source` (a Layout); a `UserError` when no limit is
        given or the source already meets them."""

        return make_budget(source, self.target, self.memory, self.precision, self.context, self.batch,
                           self.kv_precision, target_active=self.target_active)  # fmt: skip


class PruneSettings(BudgetSettings):
    """Everything `prune` needs besides the model, the data and the output: the budget, the space searched, the
    calibration and held-out windows, and the candidates' short distillation."""

    axes: tuple[str, ...] = Field(
        ("depth", "ffn"), description="Comma-separated axes from: depth, ffn, mamba_heads, mamba_head_dim, "
        "attn_heads, hidden; on MoE models also experts, expert_ffn, shared_ffn. Widths stay uniform across layers "
        "and divisible as serving needs: mamba_heads a multiple of the Mamba groups (n_groups), attn_heads of the "
        "KV heads, experts of the router groups (n_group; at least the router's top-k); expert_ffn and shared_ffn "
        "in multiples of 16 by default (FP8/FP4 expert kernels); on MoE models expert_ffn and hidden must be "
        "multiples of 8 in bf16, 4 in float32 (transformers' grouped expert matmul)."
    )  # fmt: skip
    steps: dict[str, int] = Field(
        default_factory=dict, description="Width steps, e.g. ffn=1024,hidden=256 (default: scale with the model)."
    )
    widths: dict[str, list[int]] = Field(
        default_factory=dict, description="Widths listed per axis instead of a step, e.g. "
        "expert_ffn=1536,1792,1856,hidden=2048,2304 (a number belongs to the axis named before it)."
    )  # fmt: skip
    min_width: float = Field(0.5, gt=0, le=1, description="Smallest width searched, fraction of the source.")
    min_layers: float = Field(0.5, ge=0, le=1, description="Fewest layers of each kind kept, fraction.")
    candidates: int = Field(4, ge=1, description="Layouts measured for real: the best by predicted damage and "
                            "the best of each family (depth only, width only, mixed; experts only on MoE models; "
                            "all of them even when more than this), then the next best; none dominated.")  # fmt: skip
    band: float = Field(0.05, description="Candidates: every layout that fits and uses at least (1 - BAND) of a "
                        "limit (of either, with both), plus layouts that cannot grow; ranked by predicted damage. "
                        "0: only layouts that cannot grow.")  # fmt: skip
    seq_len: int = Field(512, ge=2, description="Tokens per calibration window.")
    depth_samples: int = Field(128, ge=1, description="Windows for depth scores.")
    width_samples: int = Field(1024, ge=1, description="Windows for width scores.")
    held_out_windows: int = Field(64, ge=1, description="Held-out windows for ranking.")
    stream: bool | None = Field(
        None, description="Stream layers from the shards when scoring and ranking (default: as the memory plan "
        "decides, when the model does not fit)."
    )  # fmt: skip
    method: Literal["auto", "enumerate", "mip"] = Field("auto", description="Search method: auto, enumerate or mip.")
    seed: int = Field(0, description="Seed for choosing calibration and held-out windows.")
    batch_size: int = Field(8, ge=1, description="Windows per forward pass when ranking.")
    device: str = Field("auto", description="cpu, cuda, cuda:N or auto (cuda when available).")
    dtype: Literal[DTYPE_NAMES] = Field(  # type: ignore[valid-type]
        "auto", description="Compute dtype of scoring and ranking: float32, bfloat16 or auto (bfloat16 on a GPU, "
        "float32 on the CPU)."
    )  # fmt: skip
    # MiniPuzzle distilled each candidate ~7B tokens before choosing; its ranks changed after it.
    candidate_distill_steps: int = Field(
        0, ge=0, description="Distil every candidate this many steps before choosing (0: off)."
    )
    candidate_distill_lr: float = Field(1e-4, gt=0, description="LR of the candidates' short distillation.")
    candidate_distill_batch: int = Field(8, ge=1, description="Batch (sequences) of the candidates' distillation.")
    norm_compensation: bool = Field(
        True, description="Scale RMSNorm weights by sqrt(old/new width) where a norm loses input channels."
    )
    expert_channels: Literal["shared", "per_expert"] = Field(
        "per_expert", description="MoE expert_ffn cuts: shared (one channel set for every expert of a layer, scores "
        "summed over experts) or per_expert (each expert's own top channels, the same count in every expert)."
    )  # fmt: skip

    @field_validator("axes", mode="before")
    @classmethod
    def _axes(cls, v: Any) -> tuple[str, ...]:

        try:
            return parse_axes(v)
        except UserError as e:
            raise ValueError(str(e)) from None

    @field_validator("steps", mode="before")
    @classmethod
    def _steps(cls, v: Any) -> dict[str, int]:
        return parse_steps(v) if isinstance(v, str) or v is None else v

    @field_validator("widths", mode="before")
    @classmethod
    def _widths(cls, v: Any) -> dict[str, list[int]]:
        return parse_width_lists(v) if isinstance(v, str) or v is None else v

    @field_validator("band")
    @classmethod
    def _band(cls, v: float) -> float:
        if not 0 <= v <= 1:
            raise ValueError(f"--band must be between 0 and 1 (a fraction of the budget, e.g. 0.05), got {v}")
        return v


def parse_steps(text: str | None) -> dict[str, int]:
    """'ffn=1024,hidden=256' -> {'ffn': 1024, 'hidden': 256}; empty for None or ''."""
    out = {}
    for part in (text or "").split(","):
        if not part.strip():
            continue
        key, _, val = part.partition("=")
        try:
            out[key.strip()] = int(val)
        except ValueError:
            raise ValueError(f"cannot read --steps {part!r}: use AXIS=N, e.g. ffn=1024") from None
    return out


def parse_width_lists(text: str | None) -> dict[str, list[int]]:
    """'expert_ffn=1536,1792,hidden=2048,2304' -> {'expert_ffn': [1536, 1792], 'hidden': [2048, 2304]}: a bare
    number belongs to the axis named before it; empty for None or ''."""
    out: dict[str, list[int]] = {}
    axis = None
    for part in (text or "").split(","):
        if "=" in part:
            axis, _, part = part.partition("=")
            axis = axis.strip()
            out.setdefault(axis, [])
        if not part.strip():
            continue
        if axis is None or not part.strip().isdigit():
            raise ValueError(f"cannot read --widths {part.strip()!r}: use AXIS=W,W,..., e.g. expert_ffn=1536,1792,1856")
        out[axis].append(int(part))
    return out


# quantize.configs.PRECISIONS, named here so that the CLI and recipes check them without importing modelopt.
QUANT_PRECISIONS = ("fp8", "nvfp4")


class DistillSettings(Settings):
    """One distillation run: teacher -> student on `data`, written to `output`.

    Sizes: `batch_size` is the global batch in sequences (all processes, all accumulation steps together) of
    `seq_len` tokens; each optimizer step sees batch_size x seq_len tokens. `tokens`, when set, fixes max_steps
    to ceil(tokens / (batch_size x seq_len)).
    """

    teacher: str | None = Field(None, description="Teacher checkpoint folder (or cached hub id / preset).")
    student: str | None = Field(None, description="Student checkpoint folder (e.g. the output of `prune`).")
    data: str | None = Field(None, description="Text: .txt/.jsonl/.parquet file, folder, or datasets hub name.")
    output: str | None = Field(None, description="Output folder for the distilled student.")
    max_steps: int | None = Field(None, ge=1, description="Optimizer steps (or give --tokens).")
    tokens: int | None = Field(None, ge=1, description="Token budget (63B, 7e9): sets --max-steps.")
    seq_len: int = Field(8192, ge=2, description="Tokens per sequence.")
    batch_size: int = Field(8, ge=1, description="Global batch in sequences (all processes together).")
    grad_accum: int | None = Field(
        None, ge=1, description="Micro-batches per step on each process (default: the memory plan's)."
    )
    lr: float = Field(1e-4, gt=0, allow_inf_nan=False, description="Peak learning rate (AdamW).")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="Final LR of the cosine schedule, as a fraction.")
    warmup: int = Field(100, ge=0, description="Linear warmup steps (capped at 10% of the run, with a note).")
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay (matrices only).")
    beta1: float = Field(0.9, ge=0, lt=1, description="AdamW beta1.")
    beta2: float = Field(0.95, ge=0, lt=1, description="AdamW beta2.")
    grad_clip: float = Field(1.0, ge=0, description="Clip the gradient norm (0: off).")
    temperature: float = Field(
        1.0, gt=0, allow_inf_nan=False, description="Softmax temperature of the KL (loss is scaled by T^2)."
    )
    loss: Literal["forward_kl", "reverse_kl", "topk_kl"] = Field(
        "forward_kl", description="forward_kl (default), reverse_kl or topk_kl."
    )
    top_k: int = Field(64, ge=1, description="Teacher tokens kept by topk_kl.")
    lm_weight: float = Field(0.0, ge=0, description="Weight of the next-token LM loss (0: logits only).")
    hidden_weight: float = Field(0.0, ge=0, description="Weight of (1 - cosine) on hidden states.")
    hidden_map: str | None = Field(
        None, description="Student:teacher layer pairs for the hidden loss, e.g. 0:0,1:2,2:4."
    )
    loss_chunk: int = Field(4096, ge=1, description="Tokens per chunk of the logit loss (memory bound).")
    save_every: int = Field(500, ge=0, description="Checkpoint every N steps (0: only on SIGTERM).")
    eval_every: int = Field(100, ge=0, description="Held-out KL every N steps (0: off).")
    held_out_windows: int = Field(16, ge=0, description="Held-out windows (taken from the head of --data).")
    eval_data: str | None = Field(None, description="Separate held-out data (default: head of --data).")
    split: str = Field("train", description="Dataset split for hub data.")
    text_column: str = Field("text", description="Text column of table data.")
    streaming: bool = Field(False, description="Stream hub/table data instead of loading it.")
    seed: int = Field(0, description="Random seed.")
    device: str = Field("auto", description="auto, cpu or cuda.")
    teacher_dtype: Literal[DTYPE_NAMES] = Field(  # type: ignore[valid-type]
        "auto", description="auto (bf16 on CUDA, else float32), float32, bfloat16."
    )
    autocast: bool = Field(True, description="bf16 autocast for the student on CUDA (weights stay float32).")
    activation_checkpointing: bool | None = Field(
        None, description="Recompute student activations (default: when the memory plan needs it)."
    )
    sharding: Literal["full", "per_node"] | None = Field(
        None, description="FSDP2 over all processes (full) or within each node, replicated across nodes (per_node, "
        "HSDP); default: the memory plan's."
    )  # fmt: skip
    accumulation: Literal["sharded", "unsharded"] | None = Field(
        None, description="Gradient accumulation under FSDP2: sharded (a reduce-scatter after every micro-batch; a "
        "process holds only its shard of the gradients) or unsharded (one reduce-scatter per step; every process "
        "holds the whole float32 gradient, 4 bytes per student parameter); default: the memory plan's."
    )  # fmt: skip
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = Field(
        "sdpa", description="sdpa, eager (keeps [heads x T x T] scores: the memory plan counts them) or "
        "flash_attention_2 (needs the flash-attn package and a GPU)."
    )  # fmt: skip
    overwrite: bool = Field(False, description="Replace a non-empty output folder.")
    progress: bool | None = Field(None, description="Show a progress bar (default: when stderr is a terminal).")
    quantize: Literal[QUANT_PRECISIONS] | None = Field(  # type: ignore[valid-type]
        None, description="Quantization-aware distillation: train the student through fp8 or nvfp4 fake "
        "quantizers (calibrated on the first training batch) and write the quantized serving checkpoint, as "
        "`minipuzzle quantize` does; nvfp4 needs a CUDA GPU."
    )  # fmt: skip

    @field_validator("tokens", mode="before")
    @classmethod
    def _tokens(cls, v: str | int | float | None) -> int | None:
        return parse_tokens(v)

    @field_validator("hidden_map")
    @classmethod
    def _pairs(cls, v: str | None) -> str | None:
        parse_layer_pairs(v)
        return v

    @model_validator(mode="after")
    def _steps(self) -> DistillSettings:
        if self.grad_accum is not None and self.batch_size % self.grad_accum:
            raise ValueError(f"--batch-size {self.batch_size} is not a multiple of --grad-accum {self.grad_accum}")
        if self.tokens is not None:
            steps = math.ceil(self.tokens / (self.batch_size * self.seq_len))
            if self.max_steps not in (None, steps):
                raise ValueError(
                    f"--tokens {self.tokens} means {steps} steps but --max-steps is {self.max_steps}: give one of them"
                )
            self.max_steps = steps
        if self.max_steps is None:
            raise ValueError("give --max-steps or --tokens")
        return self

    def layer_pairs(self) -> list[tuple[int, int]]:
        """`hidden_map` as [(student_layer, teacher_layer), ...]; empty when unset."""
        return parse_layer_pairs(self.hidden_map)

    def warmup_steps(self) -> int:
        """The warmup the schedule uses: `warmup`, clamped to MAX_WARMUP_SHARE of `max_steps` (rounded down)."""
        return min(self.warmup, int(self.max_steps * MAX_WARMUP_SHARE))

    def warmup_note(self) -> str | None:
        """One line saying the warmup was clamped, or None when it was not."""
        used = self.warmup_steps()
        if used == self.warmup:
            return None
        return (
            f"--warmup {self.warmup} is more than {MAX_WARMUP_SHARE:.0%} of the {self.max_steps}-step run: "
            f"warming up for {used} steps, then cosine decay"
        )

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len

    @property
    def output_path(self) -> Path:
        if self.output is None:
            raise UserError("give -o/--output")
        return Path(self.output)

    @property
    def run_dir(self) -> Path:
        """Where the unfinished run lives (checkpoints, live metrics) until OUT is written."""
        out = self.output_path
        return out.with_name(out.name + ".partial")

    def trajectory(self) -> dict[str, Any]:
        """The settings that decide the final weights (compared on resume)."""
        out = self.model_dump(include=set(TRAJECTORY_FIELDS))
        if out["quantize"] is None:
            # Runs written before QAD existed have no such key; an unquantized run must still match them.
            del out["quantize"]
        return out

    def check_paths(self) -> None:
        """Raise `UserError` when teacher, student, data or output is missing (a recipe's run fills them)."""
        for name in ("teacher", "student", "data", "output"):
            if getattr(self, name) is None:
                raise UserError(f"give {'-o/--output' if name == 'output' else flag(name)}")


class EvalSettings(Settings):
    """Evaluation of a model against its teacher: held-out windows, lm-eval tasks, speed."""

    tasks: list[str] = Field(default_factory=list, description="lm-eval tasks: names, task .yaml files or folders.")
    num_fewshot: dict[str, int] = Field(default_factory=dict, description="Few-shot count per task.")
    limit: int | float | None = Field(None, gt=0, description="Examples per lm-eval task (a fraction below 1).")
    seq_len: int = Field(2048, ge=2, description="Tokens per held-out window; also the speed prompt length.")
    held_out_windows: int = Field(64, ge=1, description="Held-out windows for perplexity / KL / agreement.")
    batch_size: int = Field(8, ge=1, description="Sequences per forward pass.")
    seed: int = Field(0, description="Seed for window choice, few-shot sampling and speed inputs.")
    speed: bool = Field(True, description="Measure prefill/decode speed and peak memory.")
    speed_batch: int = Field(1, ge=1, description="Batch for the speed measurement.")
    speed_len: int | None = Field(
        None, ge=1, description="Prompt length for the speed measurement (default --seq-len)."
    )
    decode_tokens: int = Field(32, ge=1, description="Tokens generated for the decode speed.")
    speed_repeats: int = Field(3, ge=1, description="Timed runs of prefill and of decode (their median is reported).")

    @field_validator("limit")
    @classmethod
    def _limit(cls, v: int | float | None) -> int | float | None:
        # lm-eval reads a limit below 1 as a share of each task and one from 1 up as a count of examples.
        return int(v) if v is not None and v >= 1 else v

    def task_specs(self) -> list[str]:
        """Tasks as lm-eval specs, with their few-shot counts: ['mmlu:5', 'arc_challenge']."""
        return [f"{t}:{self.num_fewshot[t]}" if t in self.num_fewshot else t for t in self.tasks]


class QuantizeSettings(Settings):
    """Post-training quantization with Model Optimizer: the precision, the calibration windows, and which modules
    stay in bf16 beyond the hybrid default (attention, Mamba conv1d, MoE routers, embeddings, LM head)."""

    precision: Literal[QUANT_PRECISIONS] = Field(  # type: ignore[valid-type]
        "fp8", description="fp8 (E4M3 weights and activations, per-tensor scales) or nvfp4 (E2M1, an FP8 scale per "
        "16 values and a float32 one per tensor; needs a CUDA GPU)."
    )  # fmt: skip
    samples: int = Field(128, ge=1, description="Calibration windows.")
    seq_len: int = Field(2048, ge=2, description="Tokens per calibration window.")
    batch_size: int = Field(8, ge=1, description="Windows per calibration forward.")
    seed: int = Field(0, description="Seed for choosing calibration windows.")
    keep: str = Field("", description="Also keep these modules in bf16: comma-separated name patterns "
                      "(fnmatch, e.g. '*layers.0.*,*out_proj').")  # fmt: skip
    quantize_modules: str = Field("", description="Quantize these modules although the default keeps them: "
                                  "comma-separated name patterns ('lm_head' quantizes the LM head).")  # fmt: skip
    stream: bool | None = Field(None, description="FP8 calibrated and exported block by block from the checkpoint, "
                                "on the CPU (default: when no node holds the model).")  # fmt: skip

    def keep_patterns(self) -> list[str]:
        return [p.strip() for p in self.keep.split(",") if p.strip()]

    def quantize_patterns(self) -> list[str]:
        return [p.strip() for p in self.quantize_modules.split(",") if p.strip()]
