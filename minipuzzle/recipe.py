"""Recipes: one YAML file that drives a whole run (score -> prune -> distill -> quantize -> eval -> report).

The schema is strict (pydantic, `extra="forbid"`): an unknown key or a wrong type is an error that names the key.
`plan_run` turns a recipe into the list of stages with their budgets, token counts and an estimated cost, offline;
`run` (in `minipuzzle/runner.py`) executes them, each into its own folder of RUN_DIR.
"""

from __future__ import annotations

import sysconfig
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from minipuzzle.checkpoint.resolve import describe_model
from minipuzzle.communication import H100_FLOPS
from minipuzzle.errors import UserError
from minipuzzle.hardware import Hardware, resolve
from minipuzzle.search.stage import scoring_cost
from minipuzzle.settings import (
    DeviceOptions,
    DistillSettings,
    EvalSettings,
    PruneSettings,
    QuantizeSettings,
    ScoreSettings,
    SettingsError,
)

# Imports inside functions here keep torch and transformers unloaded until a function needs them, so `--help`
# and the offline commands (dry runs, info, search) start fast.

if TYPE_CHECKING:
    from minipuzzle.arch import Layout

# The memory plan is imported inside `plan_run`: it loads torch, which reading and checking a recipe does not need.

RECIPES_DIR = Path(__file__).resolve().parents[1] / "recipes"
STAGES = ("score", "prune", "distill", "quantize", "eval", "report")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelSection(DeviceOptions):
    """The teacher: a preset (56b, 8b, demo, ...), a checkpoint folder, or a cached hub id; and the device and
    compute dtype of every stage (the student trains in float32 under bf16 autocast on a GPU)."""

    source: str
    path: str | None = Field(None, description="local weights for a preset or hub id")


class DataSection(_Section):
    """Text for calibration, distillation and held-out evaluation."""

    source: str = Field(description="file, folder, datasets hub name, or 'stdlib' (the Python standard library)")
    split: str = "train"
    text_column: str = "text"
    held_out_files: list[str] = Field(default_factory=list, description="file names of a folder kept for eval")
    eval_source: str | None = Field(None, description="held-out data (default: held_out_files of source)")
    eval_split: str = "validation"
    streaming: bool | None = Field(
        None, description="read tables and hub datasets with datasets' streaming=True (None: on); local text "
        "files are read lazily either way. false loads them whole (cached, usable offline)"
    )  # fmt: skip

    def resolved_source(self) -> str:
        return sysconfig.get_paths()["stdlib"] if self.source == "stdlib" else self.source

    def resolved_eval_source(self) -> str:
        if self.eval_source is None:
            return self.resolved_source()
        return sysconfig.get_paths()["stdlib"] if self.eval_source == "stdlib" else self.eval_source


# Prune settings a run decides itself: the windows (the score section), device and dtype (the model section) and
# the candidates' distillation steps (from candidate_distill_tokens).
PRUNE_RUN_DECIDED = ("seq_len", "depth_samples", "width_samples", "stream", "seed", "device", "dtype",
                      "candidate_distill_steps")  # fmt: skip


def _set_apart_from_default(section: BaseModel, names: tuple[str, ...]) -> list[str]:
    """The fields of `names` a section sets to something other than their default (a dumped recipe, which holds
    every field at its default, reads back)."""
    fields = type(section).model_fields
    return sorted(n for n in names if n in section.model_fields_set and getattr(section, n) != fields[n].get_default())


class PruneStage(PruneSettings):
    """The recipe's prune section: PruneSettings (budget, space, candidates, ranking), with the candidates'
    distillation given in tokens. Unless set here, their LR and batch are the distill section's."""

    candidate_distill_tokens: float = Field(0, ge=0, description="Short distillation per candidate before choosing.")

    @model_validator(mode="after")
    def _not_run_decided(self) -> PruneStage:
        given = _set_apart_from_default(self, PRUNE_RUN_DECIDED)
        if given:
            raise ValueError(f"{given[0]} is set by the run (score and model sections): remove it")
        if self.target is None and self.memory is None and self.target_active is None:
            raise ValueError("give a budget: target (parameters), target_active and/or memory")
        return self


# Distillation settings a run decides itself: paths, data (the data section) and model.dtype / model.device.
RUN_DECIDED = ("teacher", "student", "data", "output", "eval_data", "split", "text_column", "device",
               "teacher_dtype", "overwrite", "progress")  # fmt: skip


class DistillStage(DistillSettings):
    """The recipe's distill section: DistillSettings, plus how to launch it. Unset, the launch (torchrun over
    the memory plan's devices, or in process when one suffices), grad_accum, activation_checkpointing and
    sharding are the plan's (`runner.distill_settings`)."""

    launcher: Literal["auto", "local", "torchrun"] = "auto"
    nnodes: int | None = Field(None, ge=1)
    nproc_per_node: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _not_run_decided(self) -> DistillStage:
        given = _set_apart_from_default(self, RUN_DECIDED)
        if given:
            raise ValueError(f"{given[0]} is set by the run (model and data sections): remove it")
        return self

    def settings(self, **run: Any) -> DistillSettings:
        """The DistillSettings of this stage, with the run's paths and data (`run`) filled in."""
        launch = set(DistillStage.model_fields) - set(DistillSettings.model_fields)
        return DistillSettings(**(self.model_dump(exclude=launch | {"tokens"}) | run))


class Recipe(_Section):
    name: str
    description: str = ""
    model: ModelSection
    data: DataSection
    score: ScoreSettings = ScoreSettings()
    prune: PruneStage
    distill: DistillStage | None = None
    quantize: QuantizeSettings | None = Field(None, description="PTQ of the final model (Model Optimizer), then "
                                              "evaluated beside it")  # fmt: skip
    eval: EvalSettings = EvalSettings()
    hardware: Hardware | None = Field(None, description="devices and memory to plan for (default: this machine's)")

    @model_validator(mode="after")
    def _quantized_once(self) -> Recipe:
        # A QAD run (distill.quantize) ends with the quantized serving checkpoint, which the quantize stage would
        # then refuse as already quantized, after the whole distillation: refused here, before anything runs.
        if self.distill is not None and self.distill.quantize is not None and self.quantize is not None:
            raise ValueError("distill.quantize already exports the quantized student: remove the quantize section "
                             "(or distill.quantize for post-training quantization)")  # fmt: skip
        return self


def find_recipe(name_or_path: str | Path) -> Path:
    """A recipe path, or the name of a shipped recipe (`demo`, `nemotron-h-56b-to-47b`)."""
    p = Path(name_or_path)
    if p.is_file():
        return p
    for cand in (RECIPES_DIR / f"{name_or_path}.yaml", RECIPES_DIR / str(name_or_path)):
        if cand.is_file():
            return cand
    shipped = ", ".join(sorted(f.stem for f in RECIPES_DIR.glob("*.yaml")))
    raise UserError(f"recipe not found: {name_or_path} (shipped recipes: {shipped})")


def load_recipe(name_or_path: str | Path) -> Recipe:
    """Read and validate a recipe; errors name the file and the offending key."""
    path = find_recipe(name_or_path)
    try:
        doc = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise UserError(f"recipe {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(doc, dict):
        raise UserError(f"recipe {path} must be a mapping of sections")
    return parse_recipe(doc, str(path))


# Keys an older recipe used, by section (None: a section itself) -> today's name. Such a key is refused with one
# line naming the new key, rather than as an unknown key.
RENAMED_KEYS = {
    (None, "importance"): "score",
    (None, "search"): "prune",
    ("prune", "held_out_samples"): "held_out_windows",
    ("distill", "eval_windows"): "held_out_windows",
    ("eval", "samples"): "held_out_windows",
}


def _renamed_key(doc: dict[str, Any]) -> str | None:
    """The first key of `doc` that was renamed, as 'section.key: renamed to section.new' (None: there is none)."""
    for (section, old), new in RENAMED_KEYS.items():
        held = doc if section is None else doc.get(section)
        if isinstance(held, dict) and old in held:
            at = "" if section is None else f"{section}."
            return f"{at}{old}: renamed to {at}{new}"
    return None


def parse_recipe(doc: dict[str, Any], where: str = "recipe") -> Recipe:
    renamed = _renamed_key(doc)
    if renamed is not None:
        raise UserError(f"{where}: {renamed}")
    try:
        return Recipe.model_validate(doc)
    except ValidationError as e:
        err = e.errors()[0]
        inner = err.get("ctx", {}).get("error")
        if isinstance(inner, SettingsError):  # a section's own check: its record holds the key within the section
            err = {**inner.error, "loc": err["loc"] + inner.error["loc"]}
        key = ".".join(str(x) for x in err["loc"])
        msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"].removeprefix("Value error, ")
        more = f" (and {len(e.errors()) - 1} more)" if len(e.errors()) > 1 else ""
        # A check across sections (no key of its own) names the keys in its message.
        raise UserError(f"{where}: {key + ': ' if key else ''}{msg}{more}") from None


def prune_settings(recipe: Recipe) -> PruneSettings:
    """The `prune` stage's settings: the prune section, with the score section's windows and streaming
    (unset: the memory plan decides), the model section's device and dtype and the candidates' distillation steps
    from its token count.

    The dry-run plan and the runner both use this, so the plan prices exactly what the run does.
    """
    s, sc, d = recipe.prune, recipe.score, recipe.distill
    own = s.model_dump(exclude={"candidate_distill_tokens"}, exclude_unset=True)
    if d is not None:  # the candidates train like the final student unless told otherwise
        own = {"candidate_distill_lr": d.lr, "candidate_distill_batch": d.batch_size} | own
    settings = PruneSettings(**own, seq_len=sc.seq_len, depth_samples=sc.depth_samples,
                             width_samples=sc.width_samples, stream=sc.stream, seed=sc.seed,
                             device=recipe.model.device, dtype=recipe.model.dtype)  # fmt: skip
    if s.candidate_distill_tokens:
        per_step = settings.candidate_distill_batch * settings.seq_len
        settings.candidate_distill_steps = max(1, -(-int(s.candidate_distill_tokens) // per_step))
    return settings


def plan_run(recipe: Recipe, hardware: Hardware | None = None, student: Layout | None = None) -> dict[str, Any]:
    """The stages of a run with their budgets, token counts and estimated cost, and the memory plan of every stage
    on `hardware` (default: the recipe's hardware section, else this machine), computed offline. `student`: the
    pruned layout once prune has written it (distillation and eval are planned for it, as the resumed run plans
    them); before that, the teacher's own layout bounds it.

    Scoring and ranking are priced by `search.stage.scoring_cost`; training costs 6 x student + 2 x teacher
    parameters FLOPs per token, 2 x student more where the plan checkpoints activations (the recompute), plus the
    time its FSDP2 collectives add beyond the compute on every device (`communication.step_traffic` on the plan's
    launch). GPU-hours use the same assumed H100 throughput as `prune --dry-run`. The memory plan is
    `recipe_memory.recipe_memory`'s; "refusal" is the line a run would be refused with (None: it fits).
    """
    from minipuzzle.memory import model_facts
    from minipuzzle.recipe_memory import recipe_memory

    name, source = describe_model(recipe.model.source, recipe.model.path)
    hw = hardware or resolve(recipe.hardware)
    stored = model_facts(recipe.model.source, recipe.model.path)[1]  # as the run plans it (runner.check_memory)
    memory = recipe_memory(recipe, prune_settings(recipe), source, hw, student=student, stored_bytes=stored)
    training = {p.stage: p for st in memory.stages for p in st.parts if p.traffic is not None}
    stages = _plan_stages(recipe, source, training)
    for st in stages:
        st["gpu_hours"] = st["flops"] / H100_FLOPS / 3600 + st.get("communication_gpu_hours", 0.0)
    for st, planned in ((st, p) for st in stages for p in memory.stages if st["stage"] == p.stage == "distill"):
        st["gpus"] = planned.parts[0].geometry.devices  # the launch's when the recipe gives it, else the plan's
    return {
        "recipe": recipe.name,
        "model": name,
        "source_params": source.num_params(),
        "stages": stages,
        "total_gpu_hours": sum(st["gpu_hours"] for st in stages),
        "assumption": f"one H100 sustaining {H100_FLOPS / 1e12:.0f} TFLOP/s (about 40% of its bf16 peak)",
        "links": hw.bandwidth_text(),
        "communication": {p.stage: p.traffic.describe() + (f"; {p.traffic.why}" if p.traffic.why else "")
                          for p in training.values()},  # fmt: skip
        "memory": memory.model_dump(mode="json"),
        "refusal": memory.refusal(),
    }


def _training_cost(tokens: int, steps: int, student: int, source: Layout, part) -> dict[str, float]:
    """FLOPs of `tokens` of distillation of a `student`-parameter model from `source` (6 per student parameter and
    token, 2 more where `part`, the memory plan's launch, recomputes checkpointed activations, 2 per teacher
    parameter) and the GPU-hours `steps` of its launch spend on communication its compute does not hide, every
    device counted."""
    ckpt = part is not None and bool(part.geometry.activation_checkpointing)
    flops = tokens * ((6 + (2 if ckpt else 0)) * student + 2 * source.num_params())
    comm = steps * part.geometry.devices * part.traffic.exposed_seconds / 3600 if part is not None else 0.0
    return {"flops": flops, "communication_gpu_hours": comm}


def _plan_stages(recipe: Recipe, source, training: dict | None = None) -> list[dict[str, Any]]:
    """One row per stage: what it does and its FLOPs; `training`: the memory plan's training parts by stage
    (their launches price recompute and communication)."""
    sc, pr, d, e = recipe.score, recipe.prune, recipe.distill, recipe.eval
    settings = prune_settings(recipe)
    budget = settings.budget_for(source)
    cost = scoring_cost(source, settings)
    # The student is not known before the search: bound it by the budget's parameter count when given.
    student = min(source.num_params(), budget.params or source.num_params())
    training = training or {}
    cand_steps = cost["candidates_measured"] * settings.candidate_distill_steps
    cand_tokens = cand_steps * settings.candidate_distill_batch * sc.seq_len
    cand = _training_cost(cand_tokens, cand_steps, student, source, training.get("prune"))
    stages: list[dict[str, Any]] = [
        {"stage": "score", "samples": {"depth": sc.depth_samples, "width": sc.width_samples},
         "seq_len": sc.seq_len, "depth_metric": sc.depth_metric, "flops": cost["flops_depth"] + cost["flops_width"]},
        {"stage": "prune", "budget": budget.describe(), "axes": list(pr.axes),
         "candidates": cost["candidates_measured"], "rank_tokens": pr.held_out_windows * sc.seq_len,
         "candidate_distill_tokens": cand_tokens, "flops": cost["flops_ranking"] + cand["flops"],
         "communication_gpu_hours": cand["communication_gpu_hours"]},
    ]  # fmt: skip
    if d is not None:
        tokens = d.max_steps * d.batch_size * d.seq_len
        stages.append({"stage": "distill", "steps": d.max_steps, "tokens": tokens, "seq_len": d.seq_len,
                       "batch_size": d.batch_size, "launcher": d.launcher,
                       **_training_cost(tokens, d.max_steps, student, source, training.get("distill"))})  # fmt: skip
    if recipe.quantize is not None:
        q = recipe.quantize
        stages.append({"stage": "quantize", "precision": q.precision, "calibration_tokens": q.samples * q.seq_len,
                       "flops": 2 * student * q.samples * q.seq_len})  # fmt: skip
    fwd = source.flops_per_token(e.seq_len)["prefill"]
    stages.append({"stage": "eval", "tasks": list(e.tasks), "limit": e.limit,
                   "flops": 2 * fwd * e.held_out_windows * e.seq_len})  # fmt: skip
    stages.append({"stage": "report", "flops": 0})
    return stages
