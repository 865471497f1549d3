"""`minipuzzle prune`: score -> search -> rank candidates on held-out tokens -> cut the winner. And the offline
plan (`--dry-run`): the space, how many layouts fit, and what scoring would cost."""

from __future__ import annotations

import time
from contextlib import contextmanager
from pathlib import Path

import torch

from minipuzzle.anatomy import AXES
from minipuzzle.arch import Layout
from minipuzzle.artifacts import CandidateRow, LayoutDoc, PruneData, PruneReport
from minipuzzle.communication import H100_FLOPS  # the GPU-hour price, defined once
from minipuzzle.errors import UserError
from minipuzzle.hardware import Hardware
from minipuzzle.search.budget import Budget
from minipuzzle.search.damage import DamageModel
from minipuzzle.search.solver import (
    Candidate,
    count_feasible,
    count_pool,
    no_layout_fits,
    search,
    smallest_layout,
)
from minipuzzle.search.space import SearchSpace, layout_axes
from minipuzzle.settings import PruneSettings


def measured_count(layout: Layout, settings: PruneSettings) -> int:
    """The most candidates prune measures: `--candidates`, or one per structural family of the space when there
    are more families (`diversity.measured_set`; a family with no layout under the budget measures none)."""
    from minipuzzle.search.diversity import families

    return max(settings.candidates, len(families(build_space(layout, settings))))


def scoring_cost(layout: Layout, settings: PruneSettings) -> dict:
    """FLOPs and H100-hours of scoring and candidate ranking, and of measuring one candidate.

    Depth scoring runs the model once plus, with prefix reuse, about half a model per dropped layer: ~L/2 + 1
    full passes over the depth tokens. Width scoring is one pass. Ranking runs the parent once and each candidate
    once (counted at the parent's cost, an upper bound) over the held-out tokens. One measurement is that pass,
    plus, with candidate distillation, its tokens at 6 x student + 2 x teacher parameters FLOPs per token (the
    student bounded by the parameter budget), as `recipe.plan_run` prices training; `flops_ranking` and
    `flops_total` leave the distillation out.
    """
    per_token = layout.flops_per_token(settings.seq_len)["prefill"]
    passes_depth = layout.num_layers / 2 + 1 if "depth" in settings.axes else 0
    width_axes = [a for a in settings.axes if a != "depth"]
    depth = per_token * settings.depth_samples * settings.seq_len * passes_depth
    width = per_token * settings.width_samples * settings.seq_len * (1 if width_axes else 0)
    measured = measured_count(layout, settings)
    one_rank = per_token * settings.held_out_samples * settings.seq_len
    rank = one_rank * (1 + measured)
    total = depth + width + rank
    student = min(layout.num_params(), settings.budget_for(layout).params or layout.num_params())
    distill_tokens = settings.candidate_distill_steps * settings.candidate_distill_batch * settings.seq_len
    one = one_rank + distill_tokens * (6 * student + 2 * layout.num_params())
    return {
        "flops_depth": depth,
        "flops_width": width,
        "flops_ranking": rank,
        "flops_total": total,
        "depth_passes": passes_depth,
        "gpu_hours_h100": total / H100_FLOPS / 3600,
        "assumed_flops_per_second": H100_FLOPS,
        "tokens": (settings.depth_samples + settings.width_samples + settings.held_out_samples) * settings.seq_len,
        "candidates_measured": measured,
        "flops_per_measurement": one,
        "gpu_hours_per_measurement": one / H100_FLOPS / 3600,
    }


def build_space(layout: Layout, settings: PruneSettings) -> SearchSpace:
    """The search space the settings describe over `layout`."""
    return SearchSpace.build(
        layout, settings.axes, settings.steps, settings.min_width, settings.min_layers, widths=settings.widths
    )


def dry_run(layout: Layout, settings: PruneSettings) -> dict:
    """The plan for `prune` without weights: search space, feasible layouts, smallest layout, scoring cost."""
    from minipuzzle.search.diversity import families

    space = build_space(layout, settings)
    small = smallest_layout(space)
    b = settings.budget_for(layout)
    return {
        "source": {"params": layout.num_params(), "pattern": layout.pattern, **_costs(b, layout)},
        "budget": b.to_dict(),
        "space": space.describe(),
        "feasible_layouts": count_feasible(space, b),
        "band": settings.band,
        "pool_layouts": count_pool(space, b, settings.band),
        "families": list(families(space)),
        "smallest_layout": {"params": small.num_params(), **_costs(b, small)},
        "cost": scoring_cost(layout, settings),
    }


def _costs(b: Budget, lay: Layout) -> dict:
    """The active parameters of an MoE layout and the memory of a memory budget, where they apply."""
    out = {"active_params": lay.num_active_params()} if lay.is_moe else {}
    return out | ({"memory_bytes": b.memory_of(lay)["total"]} if b.memory is not None else {})


def run_search(layout: Layout, scores, settings: PruneSettings, k: int | None = None):
    """(space, damage model, candidates best first) for `layout` under the settings' budget."""
    space = build_space(layout, settings)
    model = DamageModel(scores, space)
    cands = search(space, settings.budget_for(layout), model, k or settings.candidates, settings.method, band=settings.band)
    return space, model, cands


def measured_candidates(layout: Layout, scores, settings: PruneSettings):
    """(space, damage model, the candidates prune measures, best predicted first): no layout that another fitting
    one dominates, and the best of every structural family (`diversity.measured_set`)."""
    from minipuzzle.search.diversity import measured_set

    space = build_space(layout, settings)
    model = DamageModel(scores, space)
    budget = settings.budget_for(layout)
    return space, model, measured_set(space, budget, model, settings.candidates, settings.method)


def prune(
    model: str,
    out: str | Path,
    settings: PruneSettings,
    data: str | None,
    *,
    held_out_data: str | None = None,
    split: str = "train",
    held_out_split: str | None = None,
    column: str = "text",
    streaming: bool | None = None,
    model_path: str | None = None,
    scores_dir: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
    hardware: Hardware | None = None,
    training_hardware: Hardware | None = None,
) -> dict:
    """Score, search, rank and cut: write a standard checkpoint plus prune_report.json (`PruneReport`) and plots
    to `out`.

    Scoring and ranking run as the memory plan on `hardware` (default: this machine) says (`launch_plan`): on
    `settings.device` in its dtype, streamed or in memory, at the planned batch and row chunks. Candidate
    distillation runs in processes of its own, planned and launched for `training_hardware` (default: `hardware`;
    another where this node scores and ranks and the training is meant for more memory than it has).

    Candidates are ranked on `held_out_data` (split `held_out_split`, default `split`), or, without it, on the
    first windows of `data`, which scoring and candidate distillation never see. `streaming` (None: on) reads
    tables and hub datasets with `datasets` streaming (`data.iter_documents`). Returns the report as a dict.
    Every user error is raised before anything is written.
    """
    from minipuzzle.checkpoint.read import Checkpoint
    from minipuzzle.checkpoint.resolve import resolve_checkpoint
    from minipuzzle.checkpoint.write import check_output_dir
    from minipuzzle.data import load_tokenizer
    from minipuzzle.search.plan import choose_units

    t0, timing = time.perf_counter(), {}
    check_output_dir(out, overwrite)
    path = resolve_checkpoint(model, model_path)
    ckpt = Checkpoint(path)
    check_budget(ckpt.layout, settings)
    settings, launch = launch_plan(ckpt, settings, hardware, scoring=scores_dir is None)
    if data is None:
        raise UserError("prune needs calibration text: pass --data FILE|FOLDER|DATASET")
    held_split = held_out_split or split
    tok = load_tokenizer(path)
    held, calib = _windows(data, held_out_data, tok, settings, split, held_split, column, scores_dir is None, streaming)
    with _timed(timing, "scoring_seconds" if scores_dir is None else None):
        scores = load_or_score(path, calib, settings, scores_dir, progress, launch)
    with _timed(timing, "search_seconds"):
        space, dmodel, cands = measured_candidates(ckpt.layout, scores, settings)
    plans = [choose_units(c, dmodel, scores, settings.norm_compensation, settings.expert_channels) for c in cands]
    with _timed(timing, "ranking_seconds"):
        stats = rank(path, ckpt, plans, held, settings, progress, launch["ranking"])
    if settings.candidate_distill_steps > 0:
        from minipuzzle.candidates import distill_candidates

        skip = 0 if held_out_data is not None else len(held)  # the head of `data` that distillation must skip
        with _timed(timing, "candidate_distill_seconds"):
            after = distill_candidates(path, ckpt, plans, held, data, settings, progress, skip, split, column,
                                       streaming=streaming, work_dir=Path(str(out) + ".candidates"),
                                       hardware=training_hardware or hardware, ranking=launch["ranking"],
                                       shard_bytes=launch["cut"].geometry.shard_bytes)  # fmt: skip
        stats = [{**a, "before_distill": b} for a, b in zip(after, stats)]  # rank on the distilled figures
    rows = ranked_rows(cands, stats)
    windows = {"calibration": len(calib), "held_out": len(held)}
    report = build_report(model, ckpt, settings, space, scores, cands, plans, rows, data, held_out_data, windows,
                          streamed=launch["ranking"].geometry.streaming)  # fmt: skip
    write_pruned(out, ckpt, plans[rows[0].predicted_rank - 1], report, timing, t0, overwrite, progress,
                 shard_bytes=launch["cut"].geometry.shard_bytes)  # fmt: skip
    return report.model_dump(mode="json")


def check_budget(source: Layout, settings: PruneSettings) -> None:
    """Raise the user error of a budget that even the smallest layout of the search space misses."""
    space = build_space(source, settings)
    budget = settings.budget_for(source)
    if not budget.fits(smallest_layout(space)):
        no_layout_fits(space, budget)


def launch_plan(ckpt, settings: PruneSettings, hardware: Hardware | None, scoring: bool):
    """(settings with the device resolved on this machine, {part name: `memory.Part`}) of the prune stage
    on `hardware` (default: this machine): what scoring and ranking run with."""
    from minipuzzle.checkpoint.dtypes import resolve_device
    from minipuzzle.hardware import resolve
    from minipuzzle.memory import prune_stage

    dev, _ = resolve_device(settings.device, settings.dtype)
    settings = settings.model_copy(update={"device": str(dev)})
    hw = hardware or resolve()
    stage = prune_stage(ckpt.layout, hw, settings, stored_bytes=ckpt.dtype().itemsize, scoring=scoring)
    return settings, {p.name: p for p in stage.parts}


def load_or_score(path: Path, calib: torch.Tensor, settings: PruneSettings, scores_dir, progress: bool,
                  launch: dict | None = None):  # fmt: skip
    """The scores in `scores_dir`, or, without it, scores measured here on the calibration windows [C, T], as the
    plan's scoring parts (`launch`, from `launch_plan`) say; the width statistic and expert estimator are
    `ScoreSettings`' defaults (PruneSettings has no field for them)."""
    if scores_dir is not None:
        from minipuzzle.importance.scores import Scores

        return Scores.load(scores_dir)
    from minipuzzle.checkpoint.dtypes import parse_dtype
    from minipuzzle.checkpoint.read import Checkpoint
    from minipuzzle.importance import score_checkpoint
    from minipuzzle.memory import score_launch
    from minipuzzle.settings import ScoreSettings

    if launch is None:
        settings, launch = launch_plan(Checkpoint(path), settings, None, scoring=True)
    parts = [p for name, p in launch.items() if name in ("depth pass", "width pass")]
    go = score_launch(Checkpoint(path).layout, parts, seq_len=settings.seq_len)
    defaults = ScoreSettings.model_fields
    return score_checkpoint(
        path, calib[: settings.depth_samples], calib[: settings.width_samples], axes=list(settings.axes),
        stream=go["stream"], device=settings.device, dtype=parse_dtype(go["dtype"]), progress=progress,
        batch_size=go["batch_size"], budget_bytes=go["budget_bytes"], width_agg=defaults["width_agg"].default,
        expert_estimator=defaults["expert_estimator"].default,
    )  # fmt: skip


def ranked_rows(cands: list[Candidate], stats: list[dict]) -> list[CandidateRow]:
    """Candidates best measured first; `predicted_rank` is the search's order (1-based index into `cands`)."""
    from minipuzzle.search.ranking import rank_key

    order = sorted(range(len(cands)), key=lambda i: (rank_key(stats[i]), i))
    return [
        CandidateRow(**cands[i].to_dict(), predicted_rank=i + 1, measured_rank=r + 1, **stats[i])
        for r, i in enumerate(order)
    ]


def build_report(model, ckpt, settings: PruneSettings, space, scores, cands, plans, rows, data, held_out_data,
                 windows: dict[str, int], streamed: bool = False) -> PruneReport:  # fmt: skip
    """The prune report of the best measured candidate, `rows[0]`; `streamed`: ranking streamed the layers."""
    from minipuzzle.search.plan import layout_document

    best, src = rows[0].predicted_rank - 1, ckpt.layout
    budget = settings.budget_for(src)
    held = windows["held_out"]
    held_source = (str(held_out_data) if held_out_data is not None
                   else f"the first {held} windows of {data} (not scored on; candidate distillation skips them)")  # fmt: skip
    return PruneReport(
        model=str(model), checkpoint=str(ckpt.path), budget=budget.to_dict(), space=space.describe(),
        chosen=LayoutDoc(**layout_document(plans[best], src, budget, cands[best])),
        source_widths={name: AXES[name].width(src) for name in layout_axes(src)},
        source_memory=budget.memory_of(src), candidates=rows,
        data=PruneData(source=str(data), seq_len=settings.seq_len, calibration_windows=windows["calibration"],
                       held_out_windows=held, held_out_source=held_source),
        streamed=streamed, scores=scores.meta,
    )  # fmt: skip


def write_pruned(out, ckpt, plan, report: PruneReport, timing: dict, t0: float, overwrite: bool, progress: bool,
                 shard_bytes: int | None = None):  # fmt: skip
    """Cut `plan` from `ckpt` into `out` with prune_report.json and its plots, atomically, in output shards of at
    most `shard_bytes` (the plan's; default `checkpoint.write.SHARD_BYTES`)."""
    from minipuzzle.checkpoint.write import SHARD_BYTES, atomic_dir
    from minipuzzle.search.report import write_plots
    from minipuzzle.surgery import prune_checkpoint

    with atomic_dir(out, overwrite) as tmp:
        with _timed(timing, "surgery_seconds"):
            prune_checkpoint(ckpt, plan, tmp, overwrite=True, progress=progress,
                             max_shard_bytes=shard_bytes or SHARD_BYTES)  # fmt: skip
        report.timing = {**timing, "total_seconds": round(time.perf_counter() - t0, 3)}
        report.write(tmp / "prune_report.json")
        write_plots(report, ckpt.layout, tmp)


@contextmanager
def _timed(timing: dict, key: str | None):
    t = time.perf_counter()
    yield
    if key is not None:
        timing[key] = round(time.perf_counter() - t, 3)


def _windows(data, held_out_data, tok, settings: PruneSettings, split, held_split, column, score: bool, streaming):
    """(held-out windows [H, T], calibration windows [C, T]; C = 0 when nothing is scored here)."""
    from minipuzzle.data import head_split, token_windows

    n_score = max(settings.depth_samples, settings.width_samples) if score else 0
    T, seed, kw = settings.seq_len, settings.seed, {"column": column, "streaming": streaming}
    if held_out_data is None:
        return head_split(data, tok, T, settings.held_out_samples, n_score, seed, split=split, **kw)
    if str(Path(held_out_data).resolve()) == str(Path(data).resolve()) and held_split == split:
        raise UserError(f"--held-out-data {held_out_data} is the same text as --data: rank on text not scored on")
    held = token_windows(held_out_data, tok, T, settings.held_out_samples, seed, split=held_split, **kw)
    if not score:
        return held, torch.zeros(0, T, dtype=torch.long)
    return held, token_windows(data, tok, T, n_score, seed, split=split, **kw)


def rank(path, ckpt, plans, held: torch.Tensor, settings: PruneSettings, progress: bool, part=None) -> list[dict]:
    """Measured statistics of each plan on the held-out windows, as the plan's ranking part says (`part`, default
    `launch_plan`'s): streamed or with the model loaded, in its dtype, its forward batch and row chunks, the
    parent's final states kept on the host for the planned groups of windows."""
    from minipuzzle.checkpoint.dtypes import parse_dtype
    from minipuzzle.progress import progress_bar
    from minipuzzle.search.ranking import measure_in_memory, measure_streamed

    if part is None:
        settings, launch = launch_plan(ckpt, settings, None, scoring=False)
        part = launch["ranking"]
    g = part.geometry
    dtype = parse_dtype(g.dtype)
    with progress_bar("ranking candidates", len(plans), progress) as advance:
        if g.streaming:
            return measure_streamed(ckpt, plans, held, g.micro_batch, settings.device, advance,
                                    host_bytes=g.host_group * held.shape[1] * ckpt.layout.hidden_size * dtype.itemsize,
                                    dtype=dtype, chunk_rows=g.rows_per_chunk)  # fmt: skip
        from minipuzzle.checkpoint.build import load_model

        model = load_model(ckpt, dtype=dtype, device=settings.device)
        return measure_in_memory(model, plans, held, g.micro_batch, advance)


__all__ = [
    "Candidate",
    "PruneSettings",
    "count_feasible",
    "dry_run",
    "measured_candidates",
    "prune",
    "run_search",
    "scoring_cost",
]
