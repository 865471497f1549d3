"""What the prune stage works on, opened once and passed down: the request (what the user asked), the checkpoint
(its headers read once), the budget parsed once with its search space, the hardware and the stage's memory plan
(computed once: the command's refusal and every part's launch read the same plan)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from minipuzzle.checkpoint.dtypes import resolve_device
from minipuzzle.checkpoint.read import Checkpoint
from minipuzzle.checkpoint.resolve import resolve_checkpoint
from minipuzzle.checkpoint.write import check_output_dir
from minipuzzle.errors import UserError
from minipuzzle.hardware import Hardware, resolve
from minipuzzle.memory import Part, StageMemory, prune_stage
from minipuzzle.search.budget import Budget
from minipuzzle.search.space import SearchSpace
from minipuzzle.search.stage import build_space, check_budget
from minipuzzle.settings import PruneSettings


@dataclass(frozen=True)
class PruneRequest:
    """A prune as asked: the source `model` (preset, folder or hub id; `model_path`: its local weights), the
    output folder `out`, the settings, and the text.

    Candidates are ranked on `held_out_data` (split `held_out_split`, default `split`), or, without it, on the
    first windows of `data`, which scoring and candidate distillation never see. `streaming` (None: on) reads
    tables and hub datasets with `datasets` streaming (`data.iter_documents`). `scores_dir`: scores of
    `minipuzzle score` (nothing is scored here). Scoring and ranking are planned for `hardware` (default: this
    machine); candidate distillation for `training_hardware` (default: `hardware`; another where this node scores
    and ranks and the training is meant for more memory than it has)."""

    model: str
    out: Path
    settings: PruneSettings
    data: str | None
    held_out_data: str | None = None
    split: str = "train"
    held_out_split: str | None = None
    column: str = "text"
    streaming: bool | None = None
    model_path: str | None = None
    scores_dir: str | None = None
    overwrite: bool = False
    progress: bool = True
    hardware: Hardware | None = None
    training_hardware: Hardware | None = None

    @property
    def scoring(self) -> bool:
        """The stage scores here (no scores folder given)."""
        return self.scores_dir is None


@dataclass
class PruneContext:
    """The opened prune: `settings` are the request's with the device resolved on this machine; `memory` is the
    stage's memory plan on `hardware` (`parts` by name: "depth pass", "width pass", "ranking", ...)."""

    request: PruneRequest
    ckpt: Checkpoint
    settings: PruneSettings
    budget: Budget
    space: SearchSpace
    hardware: Hardware
    memory: StageMemory
    parts: dict[str, Part] = field(init=False)

    def __post_init__(self):
        self.parts = {p.name: p for p in self.memory.parts}

    @property
    def training_hardware(self) -> Hardware:
        return self.request.training_hardware or self.hardware

    @property
    def shard_bytes(self) -> int:
        """The largest output shard of a cut (the plan's cut part): a shard is buffered whole."""
        return self.parts["cut"].geometry.shard_bytes


def open_context(request: PruneRequest) -> PruneContext:
    """Check the inputs (every user error is raised before anything is written) and open the prune: the output
    folder may be written, the checkpoint exists, a layout of the space fits the budget, the device exists, there
    is calibration text. The memory plan is computed here, once; the command refuses it when it does not fit
    (`memory.check`)."""
    check_output_dir(request.out, request.overwrite)
    ckpt = Checkpoint(resolve_checkpoint(request.model, request.model_path))
    hw = request.hardware or resolve()
    memory = stage_memory(ckpt, request.settings, hw, request.scoring)
    space = build_space(ckpt.layout, request.settings)
    budget = request.settings.budget_for(ckpt.layout)
    check_budget(space, budget)
    dev, _ = resolve_device(request.settings.device, request.settings.dtype)
    settings = request.settings.model_copy(update={"device": str(dev)})
    if request.data is None:
        raise UserError("prune needs calibration text: pass --data FILE|FOLDER|DATASET")
    return PruneContext(request, ckpt, settings, budget, space, hw, memory)


def stage_memory(ckpt: Checkpoint, settings: PruneSettings, hardware: Hardware, scoring: bool) -> StageMemory:
    """The prune stage's memory plan for `ckpt` on `hardware`: its scoring (`scoring`), ranking, candidate
    distillation and cut, planned for the device the settings name (auto: the hardware's own)."""
    return prune_stage(ckpt.layout, hardware, settings, stored_bytes=ckpt.dtype().itemsize, scoring=scoring)


def launch_plan(ckpt: Checkpoint, settings: PruneSettings, hardware: Hardware | None, scoring: bool):
    """(settings with the device resolved on this machine, {part name: `memory.Part`}) of the prune stage
    on `hardware` (default: this machine): what scoring and ranking run with."""
    dev, _ = resolve_device(settings.device, settings.dtype)
    memory = stage_memory(ckpt, settings, hardware or resolve(), scoring)
    return settings.model_copy(update={"device": str(dev)}), {p.name: p for p in memory.parts}
