"""Settings of one distillation run, as a plain dataclass (the CLI and the recipe runner both fill it).

Only the fields in `TRAJECTORY_FIELDS` decide the weights a run ends with; a resumed run checks them against the
run it continues, so a changed command cannot silently splice two different runs together.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from minipuzzle.checkpoint import DTYPES
from minipuzzle.errors import UserError

LOSSES = ("forward_kl", "reverse_kl", "topk_kl")

# A warmup may take at most this share of the run. A longer one (the default 100 steps on a 60-step run) leaves
# the LR rising to the end with no decay; 10 % is what this project's own short runs use (candidate distillation
# warms up for steps // 10, the demo benchmark for steps // 16) and the usual warmup ratio of published recipes.
MAX_WARMUP_SHARE = 0.1

# Fields that change the training trajectory; everything else (logging, device, progress) may differ on resume.
TRAJECTORY_FIELDS = (
    "teacher",
    "student",
    "data",
    "split",
    "text_column",
    "eval_data",
    "eval_windows",
    "max_steps",
    "seq_len",
    "batch_size",
    "grad_accum",
    "lr",
    "min_lr_ratio",
    "warmup",
    "weight_decay",
    "beta1",
    "beta2",
    "grad_clip",
    "temperature",
    "loss",
    "top_k",
    "lm_weight",
    "hidden_weight",
    "hidden_map",
    "seed",
)


@dataclass
class DistillConfig:
    """One distillation run: teacher -> student on `data`, written to `output`.

    Sizes: `batch_size` is the global batch in sequences (all processes, all accumulation steps together) of
    `seq_len` tokens; each optimizer step sees batch_size x seq_len tokens. `tokens`, when set, fixes max_steps
    to ceil(tokens / (batch_size x seq_len)).
    """

    teacher: str
    student: str
    data: str
    output: str
    max_steps: int | None = None
    tokens: int | None = None
    seq_len: int = 8192
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 1e-4
    min_lr_ratio: float = 0.1
    warmup: int = 100
    weight_decay: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    temperature: float = 1.0
    loss: str = "forward_kl"
    top_k: int = 64
    lm_weight: float = 0.0
    hidden_weight: float = 0.0
    hidden_map: str | None = None  # "student_layer:teacher_layer,..." e.g. "0:0,1:2,2:4"
    loss_chunk: int = 4096  # tokens per chunk of the logit loss (flattened batch x sequence)
    save_every: int = 500
    eval_every: int = 100
    eval_windows: int = 16
    eval_data: str | None = None
    split: str = "train"
    text_column: str = "text"
    streaming: bool = False
    seed: int = 0
    device: str = "auto"
    teacher_dtype: str = "auto"  # auto: bfloat16 on CUDA, float32 on CPU
    autocast: bool = True  # bf16 autocast for the student on CUDA (weights stay float32)
    activation_checkpointing: bool = False
    attn_implementation: str = "sdpa"
    overwrite: bool = False
    progress: bool = False

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise `UserError` naming the first bad setting."""

        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise UserError(msg)

        need(self.seq_len >= 2, f"--seq-len must be at least 2, got {self.seq_len}")
        need(self.batch_size >= 1, f"--batch-size must be at least 1, got {self.batch_size}")
        need(self.grad_accum >= 1, f"--grad-accum must be at least 1, got {self.grad_accum}")
        need(
            self.batch_size % self.grad_accum == 0,
            f"--batch-size {self.batch_size} is not a multiple of --grad-accum {self.grad_accum}",
        )
        if self.tokens is not None:
            need(self.tokens >= 1, f"--tokens must be positive, got {self.tokens}")
            steps = math.ceil(self.tokens / (self.batch_size * self.seq_len))
            need(
                self.max_steps is None or self.max_steps == steps,
                f"--tokens {self.tokens} means {steps} steps but --max-steps is {self.max_steps}: give one of them",
            )
            self.max_steps = steps
        need(self.max_steps is not None, "give --max-steps or --tokens")
        need(self.max_steps >= 1, f"--max-steps must be at least 1, got {self.max_steps}")
        need(math.isfinite(self.lr) and self.lr > 0, f"--lr must be positive, got {self.lr}")
        need(0 <= self.min_lr_ratio <= 1, f"--min-lr-ratio must be in [0, 1], got {self.min_lr_ratio}")
        need(self.warmup >= 0, f"--warmup must be >= 0, got {self.warmup}")
        need(self.weight_decay >= 0, f"--weight-decay must be >= 0, got {self.weight_decay}")
        need(0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, "AdamW betas must be in [0, 1)")
        need(self.grad_clip >= 0, f"--grad-clip must be >= 0 (0 turns it off), got {self.grad_clip}")
        need(
            math.isfinite(self.temperature) and self.temperature > 0,
            f"--temperature must be positive, got {self.temperature}",
        )
        need(self.loss in LOSSES, f"unknown --loss {self.loss!r}: choose {', '.join(LOSSES)}")
        need(self.top_k >= 1, f"--top-k must be at least 1, got {self.top_k}")
        need(self.lm_weight >= 0, f"--lm-weight must be >= 0, got {self.lm_weight}")
        need(self.hidden_weight >= 0, f"--hidden-weight must be >= 0, got {self.hidden_weight}")
        if self.hidden_map is not None:
            self.layer_pairs()
        need(self.loss_chunk >= 1, f"--loss-chunk must be at least 1, got {self.loss_chunk}")
        need(self.save_every >= 0, f"--save-every must be >= 0 (0: only on SIGTERM), got {self.save_every}")
        need(self.eval_every >= 0, f"--eval-every must be >= 0 (0: off), got {self.eval_every}")
        need(self.eval_windows >= 0, f"--eval-windows must be >= 0, got {self.eval_windows}")
        need(
            self.teacher_dtype == "auto" or self.teacher_dtype.lower() in DTYPES,
            f"unknown --teacher-dtype {self.teacher_dtype!r}: choose auto or one of {', '.join(DTYPES)}",
        )

    def layer_pairs(self) -> list[tuple[int, int]]:
        """`hidden_map` as [(student_layer, teacher_layer), ...]; empty when unset."""
        if not self.hidden_map:
            return []
        pairs = []
        for item in self.hidden_map.split(","):
            parts = item.strip().split(":")
            try:
                s, t = (int(p) for p in parts)
            except ValueError:
                raise UserError(f"cannot read --hidden-map item {item!r}: use student:teacher, e.g. 0:0,1:2") from None
            if s < 0 or t < 0:
                raise UserError(f"--hidden-map layer indices must be >= 0, got {item!r}")
            pairs.append((s, t))
        return pairs

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
        return Path(self.output)

    @property
    def run_dir(self) -> Path:
        """Where the unfinished run lives (checkpoints, live metrics) until OUT is written."""
        out = self.output_path
        return out.with_name(out.name + ".partial")

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def trajectory(self) -> dict[str, Any]:
        """The settings that decide the final weights (compared on resume)."""
        d = self.as_dict()
        return {k: d[k] for k in TRAJECTORY_FIELDS}
