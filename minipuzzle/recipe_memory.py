"""The memory of a whole run from a recipe: every stage's planner (`minipuzzle.memory`) called with the recipe's
sections, and the processes its distill section launches. The recipe side reads the recipe; the memory package
takes settings only."""

from __future__ import annotations

from minipuzzle.arch import Layout
from minipuzzle.hardware import Hardware
from minipuzzle.kernels import attention_text
from minipuzzle.memory import RunMemory, default_dtype, distill_stage, eval_stage, prune_stage, score_stage, usable
from minipuzzle.quantize.plan import plan_quantize
from minipuzzle.settings import PruneSettings


def recipe_memory(recipe, prune: PruneSettings, teacher: Layout, hardware: Hardware, *, student: Layout | None = None,
                  stored_bytes: int = 2, skip: tuple[str, ...] = ()) -> RunMemory:  # fmt: skip
    """The memory of every stage of `recipe` (a `recipe.Recipe`, whose prune stage runs `prune`, its
    `recipe.prune_settings`) for the teacher `teacher` on `hardware`.

    The student is not known before prune has run: until then distillation and eval are planned for the teacher's
    own layout, an upper bound (a pruned layout has at most its parent's layers and widths, so every term is at
    most the parent's). `stored_bytes`: the checkpoint's dtype (published Nemotron-H weights are bf16). `skip`:
    stages already finished.
    """
    hw, bound = hardware, student or teacher
    dt = default_dtype(hw, recipe.model.dtype)
    # The run resolves model.device "auto" on the machine it runs on: the one planned for, not this one.
    device = "cpu" if recipe.model.device == "cpu" else hw.device
    kw = {"dtype": dt, "stored_bytes": stored_bytes}
    stages = {
        "score": lambda: score_stage(teacher, hw, recipe.score, axes=recipe.prune.axes, **kw),
        "prune": lambda: prune_stage(teacher, hw, prune.model_copy(update={"device": device}), student=student,
                                     stored_bytes=stored_bytes),
        "distill": lambda: distill_stage(teacher, bound, hw, recipe.distill.model_copy(update={"teacher_dtype": dt}),
                                         processes=recipe_processes(recipe.distill, hw), stored_bytes=stored_bytes),
        "eval": lambda: eval_stage(bound, teacher, hw, recipe.eval, **kw),
    }  # fmt: skip
    if recipe.distill is None:
        del stages["distill"]
    if recipe.quantize is not None:
        quantize = lambda: plan_quantize(bound, hw, recipe.quantize, **kw)  # noqa: E731
        stages = {k: v for k, v in stages.items() if k != "eval"} | {"quantize": quantize, "eval": stages["eval"]}
    planned = [make() for name, make in stages.items() if name not in skip]
    sdpa = attention_text("sdpa")
    impl = recipe.distill.attn_implementation if recipe.distill is not None else "sdpa"
    attention = sdpa if impl == "sdpa" else f"{attention_text(impl)} in distillation; {sdpa} elsewhere"
    return RunMemory(hardware=hw, hardware_text=hw.describe(), usable_device_bytes=usable(hw), stages=planned,
                     attention=attention)  # fmt: skip


def recipe_processes(d, hw: Hardware) -> int | None:
    """The processes a recipe's distill section (a `recipe.DistillStage`) launches: 1 with the local launcher,
    nnodes x nproc_per_node where given, else None (the plan's)."""
    if d.launcher == "local":
        return 1
    if d.nnodes is None and d.nproc_per_node is None:
        return None
    return (d.nnodes or 1) * (d.nproc_per_node or hw.gpus_per_node)
