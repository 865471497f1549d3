"""Run a recipe: score -> prune (search + rank + cut) -> distill -> eval -> report, each into its own folder.

RUN_DIR/run.json records the recipe and the stages that finished. A rerun skips finished stages and lets the
unfinished one resume (scoring and distillation keep their own partial state), so an interrupted run is continued
by running the same command again. Every stage writes its folder atomically, so a stage folder that exists is
complete.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from minipuzzle.checkpoint.resolve import resolve_checkpoint
from minipuzzle.errors import UserError
from minipuzzle.hardware import Hardware, resolve
from minipuzzle.recipe import STAGES, Recipe, prune_settings
from minipuzzle.settings import DistillSettings

# Imports inside functions here keep torch and transformers unloaded until a function needs them, so `--help`
# and the offline commands (dry runs, info, search) start fast.

STATE_FILE = "run.json"


@dataclasses.dataclass
class RunData:
    """Where each stage reads text from (a held-out split is materialised as folders of links)."""

    train: str
    held_out: str
    split: str = "train"
    eval_split: str = "train"
    column: str = "text"
    streaming: bool | None = None  # data.streaming: every stage reads through it

    @property
    def separate_held_out(self) -> bool:
        """The held-out text is not the training text (another source, split or set of files)."""
        return (self.held_out, self.eval_split) != (self.train, self.split)


def prepare_data(recipe: Recipe, folder: Path) -> RunData:
    """Resolve the data section. For a folder with `held_out_files`, RUN_DIR/data/{train,held_out} hold links to
    the files, so every stage can take a plain folder and the held-out files are never trained on."""
    d = recipe.data
    src = Path(d.resolved_source())
    if not d.held_out_files:
        held = d.resolved_eval_source()
        eval_split = d.eval_split if d.eval_source is not None or not src.exists() else d.split
        return RunData(str(src) if src.exists() else d.source, held, d.split, eval_split, d.text_column, d.streaming)
    if not src.is_dir():
        raise UserError(f"data.held_out_files needs data.source to be a folder, got {d.source}")
    missing = [f for f in d.held_out_files if not (src / f).is_file()]
    if missing:
        raise UserError(f"data.held_out_files: {src} has no file {missing[0]}")
    train, held = folder / "train", folder / "held_out"
    if not (train.is_dir() and held.is_dir()):
        tmp = folder.with_name(folder.name + ".tmp")

        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / "train").mkdir(parents=True)
        (tmp / "held_out").mkdir()
        from minipuzzle.data import TEXT_SUFFIXES

        for f in sorted(src.iterdir()):
            if f.is_file() and f.suffix in TEXT_SUFFIXES:
                dest = tmp / ("held_out" if f.name in d.held_out_files else "train") / f.name
                os.symlink(f.resolve(), dest)
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
    return RunData(str(train), str(held), d.split, d.split, d.text_column, d.streaming)


def _recipe_doc(recipe: Recipe) -> dict[str, Any]:
    return json.loads(recipe.model_dump_json())


def _load_state(run_dir: Path, recipe: Recipe) -> dict[str, Any]:
    f = run_dir / STATE_FILE
    if not f.is_file():
        return {"recipe": _recipe_doc(recipe), "done": []}
    state = json.loads(f.read_text())
    if state.get("recipe") != _recipe_doc(recipe):
        raise UserError(f"{run_dir} holds a run of a different recipe: use another --output, or remove it")
    return state


def _save_state(run_dir: Path, state: dict[str, Any]) -> None:
    tmp = run_dir / (STATE_FILE + ".tmp")
    tmp.write_text(json.dumps(state, indent=2) + "\n")
    os.replace(tmp, run_dir / STATE_FILE)


def run(recipe: Recipe, run_dir: str | Path, *, log: Callable[[str], None] = print, progress: bool = True,
        hardware: Hardware | None = None) -> Path:  # fmt: skip
    """Execute `recipe` into `run_dir`; returns the path of the run's HTML report.

    Before anything is written, every stage still to run is planned on `hardware` (default: the recipe's hardware
    section, else this machine): one that cannot fit is refused (`UserError`, one line)."""
    from minipuzzle.checkpoint.read import Checkpoint

    run_dir = Path(run_dir)
    done = _load_state(run_dir, recipe)["done"] if (run_dir / STATE_FILE).is_file() else []
    hw = hardware or resolve(recipe.hardware)
    check_memory(recipe, run_dir, done, hw)
    teacher = resolve_checkpoint(recipe.model.source, recipe.model.path)
    Checkpoint(teacher)  # fail on a bad checkpoint before creating anything
    run_dir.mkdir(parents=True, exist_ok=True)
    state = _load_state(run_dir, recipe)
    _save_state(run_dir, state)
    data = prepare_data(recipe, run_dir / "data")
    stages: dict[str, Callable[[], None]] = {
        "score": lambda: _score(recipe, teacher, data, run_dir / "score", progress, hw),
        "prune": lambda: _prune(recipe, teacher, data, run_dir, progress, hw),
        "distill": lambda: _distill(recipe, teacher, data, run_dir, log, progress, hw),
        "quantize": lambda: _quantize(recipe, data, run_dir, progress, hw),
        "eval": lambda: _eval(recipe, teacher, data, run_dir, progress, hw),
        "report": lambda: _report(run_dir),
    }
    for name in STAGES:
        if getattr(recipe, name, True) is None:  # an optional stage the recipe leaves out (distill, quantize)
            continue
        if name in state["done"]:
            log(f"[{name}] done already, skipped")
            continue
        log(f"[{name}] running")
        stages[name]()
        state["done"].append(name)
        _save_state(run_dir, state)
        log(f"[{name}] finished")
    return run_dir / "report.html"


def check_memory(recipe: Recipe, run_dir: Path, done: list[str], hardware: Hardware) -> None:
    """Raise the one-line `UserError` of the first unfinished stage that cannot fit `hardware`.

    Planned from the model's config (a preset needs no weights, so a run that cannot fit is refused before its
    weights are looked for); once prune has written the student, distillation and eval are planned for it
    rather than for the teacher's layout."""
    from minipuzzle.checkpoint.read import Checkpoint
    from minipuzzle.memory import model_facts
    from minipuzzle.recipe_memory import recipe_memory

    layout, stored = model_facts(recipe.model.source, recipe.model.path)
    pruned = run_dir / "prune"
    student = Checkpoint(pruned).layout if (pruned / "config.json").is_file() else None
    refusal = recipe_memory(recipe, prune_settings(recipe), layout, hardware, student=student, stored_bytes=stored,
                            skip=tuple(done)).refusal()  # fmt: skip
    if refusal is not None:
        raise UserError(refusal)


def final_model(recipe: Recipe, run_dir: Path) -> Path:
    return run_dir / ("distill" if recipe.distill is not None else "prune")


# ---- stages -----------------------------------------------------------------------------------------------------


def _score(recipe: Recipe, teacher: Path, data: RunData, out: Path, progress: bool, hw: Hardware | None = None) -> None:
    from minipuzzle.score.folder import score_to_folder

    m = recipe.model
    # Only the searched axes: without depth the search does not use depth scores (DamageModel counts layers equal).
    score_to_folder(teacher, data.train, out, recipe.score, axes=list(recipe.prune.axes), split=data.split,
                    text_column=data.column, streaming=data.streaming, device=m.device, dtype=m.dtype,
                    overwrite=True, progress=progress, hardware=hw)  # fmt: skip


def _prune(recipe: Recipe, teacher: Path, data: RunData, run_dir: Path, progress: bool, hw: Hardware | None = None,
           training_hardware: Hardware | None = None):  # fmt: skip
    from minipuzzle.prune.stage import prune

    settings = prune_settings(recipe)
    # Candidates are ranked on the eval text; without one, on the head of the training text (see distill_settings).
    held = data.held_out if data.separate_held_out else None
    prune(str(teacher), run_dir / "prune", settings, data.train, held_out_data=held, split=data.split,
          held_out_split=data.eval_split, column=data.column, streaming=data.streaming,
          scores_dir=str(run_dir / "score"), overwrite=True, progress=progress, hardware=hw,
          training_hardware=training_hardware)  # fmt: skip


def distill_settings(recipe: Recipe, teacher: Path, data: RunData, run_dir: Path, progress: bool,
                     hardware: Hardware | None = None) -> DistillSettings:  # fmt: skip
    """The recipe's distill section with the run's paths, data, device and teacher dtype filled in, and its
    geometry (grad_accum, activation_checkpointing, sharding) from the memory plan on `hardware` (default: the
    recipe's hardware section, else this machine) for the stage's launch, where the section leaves it unset.
    Raises `UserError` (one line) when the plan does not fit, the section's own choices included."""
    from minipuzzle.distill.launch import planned

    d = recipe.distill
    assert d is not None
    run = {"teacher": str(teacher), "student": str(run_dir / "prune"), "data": data.train,
           "output": str(run_dir / "distill"), "eval_data": data.held_out, "split": data.split,
           "text_column": data.column, "device": recipe.model.device, "teacher_dtype": recipe.model.dtype,
           "progress": progress}  # fmt: skip
    if "streaming" not in d.model_fields_set:  # the distill section's own setting wins over data.streaming
        run["streaming"] = data.streaming is not False
    if not data.separate_held_out:
        # The prune stage ranked on the head of the training text: distillation takes at least those tokens as
        # its evaluation windows, which it never trains on.
        need = -(-recipe.prune.held_out_windows * recipe.score.seq_len // d.seq_len)
        run |= {"eval_data": None, "eval_every": d.eval_every or d.max_steps,
                "held_out_windows": max(d.held_out_windows, need)}  # fmt: skip
    return planned(d.settings(**run), *_distill_hardware(recipe, hardware))[0]


def _distill_hardware(recipe: Recipe, hardware: Hardware | None) -> tuple[Hardware, int | None]:
    """(hardware, processes) the distill stage plans for: the recipe's launch where it gives one (its nodes and
    GPUs per node), else the plan's choice of the hardware's devices."""
    from minipuzzle.memory import for_device
    from minipuzzle.recipe_memory import recipe_processes

    d = recipe.distill
    assert d is not None
    hw = hardware or resolve(recipe.hardware)
    procs = recipe_processes(d, hw)
    if procs is not None and procs > 1 and hw.device == "cuda":
        per_node = d.nproc_per_node or hw.gpus_per_node
        hw = hw.model_copy(update={"gpus_per_node": per_node, "nodes": max(1, procs // per_node)})
    return for_device(hw, recipe.model.device) or hw, procs


def distill_launch(recipe: Recipe, cfg: DistillSettings, hardware: Hardware | None = None) -> tuple[int, int]:
    """(nnodes, nproc_per_node) of the distill stage: the recipe's launch where given, else the memory plan's
    devices (whole nodes beyond one)."""
    from minipuzzle.distill.launch import nodes_and_procs, plan_for

    d = recipe.distill
    assert d is not None
    if d.launcher == "local":
        return 1, 1
    hw, procs = _distill_hardware(recipe, hardware)
    if procs is not None:
        return d.nnodes or 1, procs // (d.nnodes or 1)
    return nodes_and_procs(plan_for(cfg, hw, None), hw)


def _distill(recipe: Recipe, teacher: Path, data: RunData, run_dir: Path, log, progress: bool,
             hardware: Hardware | None) -> None:  # fmt: skip
    from minipuzzle.distill.launch import launch
    from minipuzzle.distill.loop import distill

    cfg = distill_settings(recipe, teacher, data, run_dir, progress, hardware)
    nnodes, nproc = distill_launch(recipe, cfg, hardware)
    if nnodes * nproc == 1:
        distill(cfg)
        return
    launch(cfg, nnodes, nproc, run_dir / "distill_torchrun.sh", log, run_dir / "logs",
           then="rerun this command to continue with eval")  # fmt: skip


def _eval(recipe: Recipe, teacher: Path, data: RunData, run_dir: Path, progress: bool, hw: Hardware | None = None):
    """Evaluate the final model into RUN_DIR/eval; with distillation, also the pruned student before it
    (RUN_DIR/eval_pruned, same windows and tasks, no speed run: same architecture) so the report shows both; with
    quantization, the quantized model too (RUN_DIR/eval_quantized, no speed run: its simulated quantization says
    nothing about a serving engine's speed)."""
    from minipuzzle.evaluate.runner import evaluate

    e, m = recipe.eval, recipe.model
    targets = [(final_model(recipe, run_dir), run_dir / "eval", e.speed)]
    if recipe.distill is not None:
        targets.insert(0, (run_dir / "prune", run_dir / "eval_pruned", False))
    if recipe.quantize is not None:
        targets.insert(0, (run_dir / "quantize", run_dir / "eval_quantized", False))
    for model, out, speed in targets:
        evaluate(model, out, e.model_copy(update={"speed": speed}), teacher_path=teacher, data=data.held_out,
                 split=data.eval_split, column=data.column, streaming=data.streaming, device=m.device, dtype=m.dtype,
                 precision=recipe.prune.precision, context=recipe.prune.context, overwrite=True,
                 progress=progress, hardware=hw)  # fmt: skip


def _quantize(recipe: Recipe, data: RunData, run_dir: Path, progress: bool, hw: Hardware | None = None) -> None:
    """Quantize the final model into RUN_DIR/quantize, calibrated on the training text."""
    from minipuzzle.quantize.folder import quantize_to_folder

    assert recipe.quantize is not None
    m = recipe.model
    quantize_to_folder(final_model(recipe, run_dir), run_dir / "quantize", recipe.quantize, data.train,
                       split=data.split, column=data.column, streaming=data.streaming, device=m.device, dtype=m.dtype,
                       overwrite=True, progress=progress, hardware=hw)  # fmt: skip


def _report(run_dir: Path) -> None:
    from minipuzzle.report.page import build_run_report

    build_run_report(run_dir)
