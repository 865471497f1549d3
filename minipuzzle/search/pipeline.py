"""`minipuzzle prune`: score -> search -> rank candidates on held-out tokens -> cut the winner. And the offline
plan (`--dry-run`): the space, how many layouts fit, and what scoring would cost."""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from minipuzzle.anatomy import KINDS, WIDTH_AXES
from minipuzzle.arch import Layout
from minipuzzle.errors import UserError
from minipuzzle.search.budget import Budget
from minipuzzle.search.damage import DamageModel
from minipuzzle.search.solver import (
    DEFAULT_BAND,
    Candidate,
    LayerCosts,
    budget_limits,
    check_band,
    count_pool,
    no_layout_fits,
    search,
    smallest_layout,
)
from minipuzzle.search.space import SearchSpace

# Assumed sustained throughput for the GPU-hour estimate: an H100 at ~40% of its 989 TFLOP/s dense bf16 peak.
H100_FLOPS = 400e12


def score_axes(axes) -> list[str]:
    return list(axes)  # scoring and search name the axes alike (minipuzzle.anatomy)


@dataclass
class PruneSettings:
    """Everything `prune` needs besides the model and the output (CLI options map one to one)."""

    budget: Budget
    axes: tuple[str, ...] = ("depth", "ffn")
    steps: dict[str, int] = field(default_factory=dict)
    min_width: float = 0.5
    min_layers: float = 0.5
    candidates: int = 4
    # Layouts within this fraction below the budget (or maximal) are candidates; see search.solver.
    band: float = DEFAULT_BAND
    seq_len: int = 512
    depth_samples: int = 128
    width_samples: int = 1024
    held_out_samples: int = 64
    stream: bool = False
    method: str = "auto"
    seed: int = 0
    batch_size: int = 8
    device: str = "cpu"
    # Short distillation of every ranked candidate before the final choice (MiniPuzzle: ~7B tokens each; ranks
    # changed after it). 0 turns it off.
    candidate_distill_steps: int = 0
    candidate_distill_lr: float = 1e-4
    candidate_distill_batch: int = 8
    # sqrt(old/new) scaling of RMSNorms that lose input channels (surgery.Plan.norm_compensation), for the ranked
    # candidates and the cut alike.
    norm_compensation: bool = True

    def __post_init__(self) -> None:
        check_band(self.band)


def count_feasible(space: SearchSpace, budget: Budget) -> int:
    """Number of layouts (widths x layer counts) in `space` within `budget` (no scores needed)."""
    costs = LayerCosts(space, budget)
    P, M = budget_limits(budget)
    shape = [len(space.widths[a]) for a in WIDTH_AXES]
    idx = dict(zip(WIDTH_AXES, np.unravel_index(np.arange(math.prod(shape)), shape)))
    kinds = [k for k in KINDS if space.layers[k][1] > 0]
    last, others = kinds[-1], kinds[:-1]
    grids = np.meshgrid(*[np.arange(space.layers[k][0], space.layers[k][1] + 1) for k in others], indexing="ij")
    fp, fm = costs.fixed(idx)
    used_p, used_m = fp[:, None].astype(float), fm[:, None].copy()
    for k, g in zip(others, grids):
        p, m = costs.per_layer(k, idx)
        used_p = used_p + p[:, None] * g.reshape(1, -1)
        used_m = used_m + m[:, None] * g.reshape(1, -1)
    lp, lm = costs.per_layer(last, idx)
    lo, hi = space.layers[last]
    n = np.minimum(hi, np.minimum(np.floor((P - used_p) / lp[:, None]), np.floor((M - used_m) / lm[:, None])))
    return int(np.clip(n - lo + 1, 0, None).sum())


def scoring_cost(layout: Layout, settings: PruneSettings) -> dict:
    """FLOPs and H100-hours of scoring and candidate ranking.

    Depth scoring runs the model once plus, with prefix reuse, about half a model per dropped layer: ~L/2 + 1
    full passes over the depth tokens. Width scoring is one pass. Ranking runs the parent once and each candidate
    once (counted at the parent's cost, an upper bound) over the held-out tokens.
    """
    per_token = layout.flops_per_token(settings.seq_len)["prefill"]
    passes_depth = layout.num_layers / 2 + 1 if "depth" in settings.axes else 0
    width_axes = [a for a in settings.axes if a != "depth"]
    depth = per_token * settings.depth_samples * settings.seq_len * passes_depth
    width = per_token * settings.width_samples * settings.seq_len * (1 if width_axes else 0)
    rank = per_token * settings.held_out_samples * settings.seq_len * (1 + settings.candidates)
    total = depth + width + rank
    return {
        "flops_depth": depth,
        "flops_width": width,
        "flops_ranking": rank,
        "flops_total": total,
        "depth_passes": passes_depth,
        "gpu_hours_h100": total / H100_FLOPS / 3600,
        "assumed_flops_per_second": H100_FLOPS,
        "tokens": (settings.depth_samples + settings.width_samples + settings.held_out_samples) * settings.seq_len,
    }


def dry_run(layout: Layout, settings: PruneSettings) -> dict:
    """The plan for `prune` without weights: search space, feasible layouts, smallest layout, scoring cost."""
    space = SearchSpace.build(layout, settings.axes, settings.steps, settings.min_width, settings.min_layers)
    small = smallest_layout(space)
    b = settings.budget
    return {
        "source": {"params": layout.num_params(), "pattern": layout.pattern, **_mem(b, layout)},
        "budget": b.to_dict(),
        "space": space.describe(),
        "feasible_layouts": count_feasible(space, b),
        "band": settings.band,
        "pool_layouts": count_pool(space, b, settings.band),
        "smallest_layout": {"params": small.num_params(), **_mem(b, small)},
        "cost": scoring_cost(layout, settings),
    }


def _mem(b: Budget, lay: Layout) -> dict:
    return {"memory_bytes": b.memory_of(lay)["total"]} if b.memory is not None else {}


def run_search(layout: Layout, scores, settings: PruneSettings, k: int | None = None):
    """(space, damage model, candidates best first) for `layout` under the settings' budget."""
    space = SearchSpace.build(layout, settings.axes, settings.steps, settings.min_width, settings.min_layers)
    model = DamageModel(scores, space)
    cands = search(space, settings.budget, model, k or settings.candidates, settings.method, band=settings.band)
    return space, model, cands


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
    model_path: str | None = None,
    scores_dir: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Score, search, rank and cut: write a standard checkpoint plus prune_report.json and plots to `out`.

    Candidates are ranked on `held_out_data` (split `held_out_split`, default `split`), or, without it, on the
    first windows of `data`, which scoring and candidate distillation never see. Returns the report. Every user
    error is raised before anything is written.
    """
    from minipuzzle.checkpoint import Checkpoint, atomic_dir, check_output_dir, resolve_checkpoint
    from minipuzzle.data import load_tokenizer
    from minipuzzle.search.plan import candidate_plan, layout_document

    t0 = time.perf_counter()
    check_output_dir(out, overwrite)
    path = resolve_checkpoint(model, model_path)
    ckpt = Checkpoint(path)
    src = ckpt.layout
    space = SearchSpace.build(src, settings.axes, settings.steps, settings.min_width, settings.min_layers)
    if not settings.budget.fits(smallest_layout(space)):
        no_layout_fits(space, settings.budget)
    if data is None:
        raise UserError("prune needs calibration text: pass --data FILE|FOLDER|DATASET")
    held_split = held_out_split or split
    tok = load_tokenizer(path)
    held, calib = _windows(data, held_out_data, tok, settings, split, held_split, column, scores_dir is None)
    timing = {}
    if scores_dir is not None:
        from minipuzzle.importance.scores import Scores

        scores = Scores.load(scores_dir)
    else:
        from minipuzzle.importance import score_checkpoint

        t = time.perf_counter()
        scores = score_checkpoint(
            path, calib[: settings.depth_samples], calib[: settings.width_samples], axes=score_axes(settings.axes),
            stream=settings.stream, device=settings.device, progress=progress,
        )  # fmt: skip
        timing["scoring_seconds"] = round(time.perf_counter() - t, 3)
    t = time.perf_counter()
    space, dmodel, cands = run_search(src, scores, settings)
    timing["search_seconds"] = round(time.perf_counter() - t, 3)
    plans = [candidate_plan(c, dmodel, scores, settings.norm_compensation) for c in cands]
    t = time.perf_counter()
    stats = rank(path, ckpt, plans, held, settings, progress)
    timing["ranking_seconds"] = round(time.perf_counter() - t, 3)
    if settings.candidate_distill_steps > 0:
        t = time.perf_counter()
        skip = 0 if held_out_data is not None else len(held)  # the head of `data` that distillation must skip
        after = distill_candidates(path, ckpt, plans, held, data, settings, progress, skip, split, column)
        # Rank on the distilled figures; keep the undistilled ones for the report.
        stats = [{**a, **{f"{k}_before_distill": v for k, v in b.items()}} for a, b in zip(after, stats)]
        timing["candidate_distill_seconds"] = round(time.perf_counter() - t, 3)
    from minipuzzle.search.ranking import rank_key

    order = sorted(range(len(cands)), key=lambda i: (rank_key(stats[i]), i))
    best = order[0]
    table = []
    for r, i in enumerate(order):
        row = cands[i].to_dict() | {"predicted_rank": i + 1, "measured_rank": r + 1, **stats[i]}
        table.append(row)
    report = {
        "model": str(model),
        "checkpoint": str(path),
        "budget": settings.budget.to_dict(),
        "space": space.describe(),
        "chosen": layout_document(plans[best], src, settings.budget, cands[best]),
        "source_memory": settings.budget.memory_of(src),
        "candidates": table,
        "data": {
            "source": str(data),
            "seq_len": settings.seq_len,
            "calibration_windows": len(calib),
            "held_out_windows": len(held),
            "held_out_source": str(held_out_data)
            if held_out_data is not None
            else f"the first {len(held)} windows of {data} (not scored on; candidate distillation skips them)",
        },  # fmt: skip
        "streamed": settings.stream,
        "scores": scores.meta,
    }
    from minipuzzle.search.report import write_plots
    from minipuzzle.surgery import prune_checkpoint

    with atomic_dir(out, overwrite) as tmp:
        t = time.perf_counter()
        prune_checkpoint(ckpt, plans[best], tmp, overwrite=True, progress=progress)
        timing["surgery_seconds"] = round(time.perf_counter() - t, 3)
        timing["total_seconds"] = round(time.perf_counter() - t0, 3)
        report["timing"] = timing
        (tmp / "prune_report.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
        write_plots(report, src, tmp)
    return report


def _windows(data, held_out_data, tok, settings: PruneSettings, split, held_split, column, score: bool):
    """(held-out windows [H, T], calibration windows [C, T]; C = 0 when nothing is scored here)."""
    from minipuzzle.data import head_split, token_windows

    n_score = max(settings.depth_samples, settings.width_samples) if score else 0
    T, seed = settings.seq_len, settings.seed
    if held_out_data is None:
        return head_split(data, tok, T, settings.held_out_samples, n_score, seed, split=split, column=column)
    if str(Path(held_out_data).resolve()) == str(Path(data).resolve()) and held_split == split:
        raise UserError(f"--held-out-data {held_out_data} is the same text as --data: rank on text not scored on")
    held = token_windows(held_out_data, tok, T, settings.held_out_samples, seed, split=held_split, column=column)
    if not score:
        return held, torch.zeros(0, T, dtype=torch.long)
    return held, token_windows(data, tok, T, n_score, seed, split=split, column=column)


def distill_candidates(path, ckpt, plans, held: torch.Tensor, data: str, settings: PruneSettings, progress: bool,
                       skip: int = 0, split: str = "train", column: str = "text"):  # fmt: skip
    """Cut each candidate, distil it for `candidate_distill_steps` on `data`, and measure it again on `held`.

    `skip`: held-out windows at the head of `data` (see `data.head_split`); distillation takes them as its
    evaluation windows, which it never trains on, and evaluates on them once, at the last step. The winner is
    still written undistilled: the final distillation stage starts from the cut weights.
    """
    import tempfile

    from minipuzzle.checkpoint import load_model
    from minipuzzle.distill import DistillConfig, distill
    from minipuzzle.metrics import token_stats
    from minipuzzle.surgery import prune_checkpoint

    out = []
    with tempfile.TemporaryDirectory(prefix="minipuzzle-candidates-") as work:
        teacher = load_model(ckpt, dtype=torch.float32, device=settings.device)
        for i, plan in enumerate(plans):
            cut = prune_checkpoint(ckpt, plan, Path(work) / f"cand{i}", progress=False)
            cfg = DistillConfig(
                teacher=str(path), student=str(cut), data=str(data), output=str(Path(work) / f"cand{i}-distilled"),
                max_steps=settings.candidate_distill_steps, seq_len=settings.seq_len,
                batch_size=settings.candidate_distill_batch, lr=settings.candidate_distill_lr,
                warmup=max(1, settings.candidate_distill_steps // 10), save_every=0,
                eval_every=settings.candidate_distill_steps if skip else 0, eval_windows=skip, split=split,
                text_column=column, seed=settings.seed, device=settings.device, progress=progress,
            )  # fmt: skip
            student = load_model(distill(cfg), dtype=torch.float32, device=settings.device)
            out.append(token_stats(student, held, teacher=teacher, batch_size=settings.batch_size))
            del student
    return out


def rank(path, ckpt, plans, held: torch.Tensor, settings: PruneSettings, progress: bool) -> list[dict]:
    """Measured statistics of each plan on the held-out windows (streamed or with the model loaded)."""
    from minipuzzle.importance.layerwise import progress_bar
    from minipuzzle.search.ranking import measure_in_memory, measure_streamed

    with progress_bar("ranking candidates", len(plans), progress) as advance:
        if settings.stream:
            return measure_streamed(ckpt, plans, held, settings.batch_size, settings.device, advance)
        from minipuzzle.checkpoint import load_model

        model = load_model(ckpt, dtype=torch.float32, device=settings.device)
        return measure_in_memory(model, plans, held, settings.batch_size, advance)


__all__ = ["Candidate", "PruneSettings", "count_feasible", "dry_run", "prune", "run_search", "scoring_cost"]
