"""What each stage writes and the next stage (or the run page) reads, as pydantic models.

    score/scores.json            ScoresMeta   (the tensors sit beside it in scores.safetensors)
    search's layout file,        LayoutDoc    (the chosen layout, and the cut plan that cuts it)
    prune/prune_report.json      PruneReport  (LayoutDoc + the ranked CandidateRows)
    distill/distill.json         DistillState (the settings that decide the trajectory)
    distill/metrics.jsonl        one TrainRow or EvalRow per line
    eval/report.json             EvalReport

Writers call `model_dump_json`, readers `model_validate_json`, so a key a stage stops writing (or a reader
expects in vain) fails in the tests instead of leaving a blank on the page. A file that does not validate (an
unknown key, one missing, a hand edit, another version's format) is refused with a one-line `UserError`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, model_validator

from minipuzzle.errors import UserError
from minipuzzle.settings import DistillSettings


class Artifact(BaseModel):
    model_config = ConfigDict(extra="forbid")

    def write(self, path: str | Path) -> Path:
        Path(path).write_text(self.model_dump_json(indent=2) + "\n")
        return Path(path)

    @classmethod
    def read(cls, path: str | Path):
        """The artifact in the JSON file `path`; `UserError` (one line) when the file is not one."""
        try:
            return cls.model_validate_json(Path(path).read_text())
        except ValidationError as e:
            raise UserError(f"{path} is not a {cls.__name__} this version reads: {first_problem(e)}") from None


def first_problem(err: ValidationError) -> str:
    """The first error of `err` in one line: where in the document, and what is wrong there."""
    first = err.errors()[0]
    where = ".".join(str(k) for k in first["loc"])
    what = "unknown key" if first["type"] == "extra_forbidden" else first["msg"].removeprefix("Value error, ")
    more = f" (and {err.error_count() - 1} more)" if err.error_count() > 1 else ""
    return (f"{where}: {what}" if where else what).replace("\n", " ") + more


# ---- scores ------------------------------------------------------------------------------------------------------


class ScoringInfo(Artifact):
    axes: list[str]
    depth_metric: str | None
    width_aggregation: str | None
    depth_samples: int
    width_samples: int
    seq_len: int
    streamed: bool
    device: str
    dtype: str
    # How routed experts were scored (score.experts.EXPERT_ESTIMATORS); None without MoE expert scores.
    expert_estimator: str | None = None


class ScoresMeta(Artifact):
    """scores.json: how the scores were measured, and a readable summary of the tensors.

    `settings` is None, `groups` and `timing` empty for scores that no scoring run measured as a whole (the width
    pass's resume file, scores put together by hand in tests and benchmarks)."""

    settings: ScoringInfo | None = None
    groups: dict[str, int] = Field(default_factory=dict)
    timing: dict[str, float] = Field(default_factory=dict)
    higher_is_more_important: bool = True
    pattern: str = ""
    checkpoint: str | None = None
    data: dict[str, Any] | None = None
    summary: dict[str, Any] = Field(default_factory=dict)

    @property
    def depth(self) -> list[float] | None:
        """Drop-one importance of each source layer, when depth was scored."""
        d = self.summary.get("depth")
        return d["scores"] if d else None


# ---- plan / layout ---------------------------------------------------------------------------------------------


class LayoutSummary(Artifact):
    pattern: str
    params: int


class ResultLayout(LayoutSummary):
    layers: dict[str, int]
    widths: dict[str, int]
    active_params: int | None = Field(None, exclude_if=lambda v: v is None)  # mixture-of-experts layouts only
    memory_bytes: dict[str, Any] | None = None
    predicted_damage: float | None = None


class LayoutDoc(Artifact):
    """A chosen layout: what it is (`result`), what it came from, and the cut plan (`cut.Plan.to_dict`)."""

    model_config = ConfigDict(extra="allow")  # `minipuzzle search` adds its candidate list

    source: LayoutSummary
    result: ResultLayout
    budget: dict[str, Any] | None = None
    plan: dict[str, Any]

    @property
    def kept_layers(self) -> list[int]:
        return list(self.plan["layers"])


# ---- prune -------------------------------------------------------------------------------------------------------


class TokenFigures(Artifact):
    """`metrics.token_stats` of a model against its teacher on held-out windows."""

    loss: float
    accuracy: float
    kl_to_teacher: float
    agreement: float
    perplexity: float
    tokens: int


class CandidateRow(TokenFigures):
    """One ranked candidate: the search's prediction, then what was measured on held-out text.

    With candidate distillation the measured figures are those after it, and `before_distill` holds the ones
    measured on the plain cut."""

    widths: dict[str, int]
    layers: dict[str, int]
    predicted_damage: float
    params: int
    active_params: int | None = Field(None, exclude_if=lambda v: v is None)  # mixture-of-experts layouts only
    memory: int | None = None
    method: str | None = None  # the solver that found it (search.solver)
    # Why prune measured it (search.diversity): "best predicted", "best FAMILY" or "next best predicted"; its
    # family (depth only, width only, experts only, mixed) and the share of the binding limit it uses.
    why: str | None = None
    family: str | None = None
    budget_used: float | None = None
    predicted_rank: int
    measured_rank: int
    before_distill: TokenFigures | None = None


class PruneData(Artifact):
    source: str
    seq_len: int
    calibration_windows: int
    held_out_windows: int
    held_out_source: str


class PruneReport(Artifact):
    """prune_report.json."""

    model: str
    checkpoint: str
    budget: dict[str, Any]
    space: dict[str, Any]
    chosen: LayoutDoc
    source_widths: dict[str, int]
    source_memory: dict[str, Any]
    candidates: list[CandidateRow]
    data: PruneData
    streamed: bool
    scores: ScoresMeta
    timing: dict[str, float] = Field(default_factory=dict)


# ---- distillation ------------------------------------------------------------------------------------------------


class DistillState(Artifact):
    """What a distillation run was asked to do: OUT.partial/run.json when it starts (a resume must match its
    `trajectory`), OUT/distill.json when it ends (a rerun with the same `trajectory` finds the run finished)."""

    trajectory: dict[str, Any]  # DistillSettings.trajectory(): the settings that decide the final weights
    config: DistillSettings
    teacher: str
    warmup_steps: int  # the warmup the schedule used (`warmup`, clamped to a share of the run)

    @model_validator(mode="before")
    @classmethod
    def _older_names(cls, data: Any) -> Any:
        # Runs started before the held-out window count had one name wrote `eval_windows`: read them as
        # `held_out_windows` so such a run still resumes (or is found finished) instead of being refused.
        if isinstance(data, dict):
            data = dict(data)
            for part in ("trajectory", "config"):
                d = data.get(part)
                if isinstance(d, dict) and "eval_windows" in d and "held_out_windows" not in d:
                    data[part] = {("held_out_windows" if k == "eval_windows" else k): v for k, v in d.items()}
        return data

    @classmethod
    def of(cls, cfg: DistillSettings) -> DistillState:
        return cls(trajectory=cfg.trajectory(), config=cfg, teacher=str(cfg.teacher), warmup_steps=cfg.warmup_steps())

    @model_validator(mode="after")
    def _consistent(self) -> DistillState:
        # The trajectory is derived from the settings; a file whose two halves disagree was edited by hand.
        if self.trajectory != self.config.trajectory():
            raise ValueError("trajectory differs from the trajectory fields of config")
        return self


class TrainRow(Artifact):
    type: Literal["train"] = "train"
    step: int
    loss: float
    kl: float
    lm: float
    hidden: float
    lr: float
    grad_norm: float
    tokens: int
    tokens_per_s: float


class EvalRow(Artifact):
    """Held-out figures of the student; `loss` is its LM loss, not the distillation loss."""

    type: Literal["eval"] = "eval"
    step: int
    loss: float
    kl_to_teacher: float
    accuracy: float
    agreement: float
    tokens: int
    perplexity: float


MetricsRow = Annotated[TrainRow | EvalRow, Field(discriminator="type")]
METRICS_ROW = TypeAdapter(MetricsRow)


def read_metrics(path: str | Path) -> list[TrainRow | EvalRow]:
    """The rows of a metrics.jsonl; a last line cut short by a killed run is skipped, any other line that is not a
    row is refused (`UserError`, one line)."""
    lines = Path(path).read_text(errors="replace").splitlines()
    rows = []
    for i, line in enumerate(lines):
        try:
            rows.append(METRICS_ROW.validate_json(line))
        except ValidationError as e:
            if i < len(lines) - 1 or _is_json(line):
                raise UserError(
                    f"{path} line {i + 1} is not a metrics row this version reads: {first_problem(e)}"
                ) from None
    return rows


def _is_json(line: str) -> bool:
    try:
        json.loads(line)
    except json.JSONDecodeError:
        return False
    return True


# ---- evaluation --------------------------------------------------------------------------------------------------


class Quality(Artifact):
    perplexity: float
    loss: float
    accuracy: float


class SpeedResult(Artifact):
    """`evaluate.speed.measure_speed` of one model."""

    device: str
    dtype: str
    batch: int
    prompt_len: int
    decode_tokens: int
    repeats: int
    prefill_s: float
    decode_s: float
    prefill_tokens_per_s: float
    decode_tokens_per_s: float
    prefill_tokens_per_s_range: list[float] | None = None  # [slowest, fastest] of the repeats
    decode_tokens_per_s_range: list[float] | None = None
    peak_memory_bytes: int
    baseline_memory_bytes: int
    peak_memory_kind: str
    weights_bytes: int


class DistillSummary(Artifact):
    metrics_file: str
    points: int
    last: dict[str, Any]


class EvalSettingsUsed(Artifact):
    data: str | None
    split: str
    column: str
    seq_len: int
    num_samples: int
    windows: int
    seed: int
    tasks: list[str]
    limit: int | float | None
    batch_size: int
    device: str
    dtype: str
    speed_batch: int
    speed_prompt_len: int
    decode_tokens: int
    precision: str
    context: int
    versions: dict[str, str]


class EvalReport(Artifact):
    """report.json of `minipuzzle eval`: held-out text, lm-eval tasks, speed, architecture figures."""

    model: str
    teacher: str | None = None
    perplexity: float | None = None
    loss: float | None = None
    accuracy: float | None = None
    kl_to_teacher: float | None = None
    agreement: float | None = None
    tokens: int = 0
    teacher_quality: Quality | None = None
    tasks: dict[str, dict[str, float]] = Field(default_factory=dict)
    tasks_stderr: dict[str, dict[str, float]] = Field(default_factory=dict)
    n_shot: dict[str, int | None] = Field(default_factory=dict)
    task_samples: dict[str, int | None] = Field(default_factory=dict)
    teacher_tasks: dict[str, dict[str, float]] | None = None
    speed: dict[str, SpeedResult] = Field(default_factory=dict)
    architecture: dict[str, dict[str, Any]] = Field(default_factory=dict)
    params: int | None = None
    distill: DistillSummary | None = None
    settings: EvalSettingsUsed
    elapsed_s: float = 0.0
    plots: list[str] = Field(default_factory=list)
