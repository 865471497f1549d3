"""`minipuzzle prune` as one composition over one opened context: score (or load scores) -> search the measured
candidates -> rank them on held-out tokens (after a short distillation each, when asked) -> cut the best measured.

    prune(model, out, settings, data, **options)   # = run(open_context(PruneRequest(...)))
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from pathlib import Path

from minipuzzle.prune.candidates import distill_candidates
from minipuzzle.prune.context import PruneContext, PruneRequest, launch_plan, open_context
from minipuzzle.prune.ranking import rank, ranked_rows
from minipuzzle.prune.report import build_report, write_pruned
from minipuzzle.prune.scoring import load_or_score
from minipuzzle.prune.windows import read_windows
from minipuzzle.search.damage import DamageModel
from minipuzzle.search.diversity import measured_set
from minipuzzle.search.plan import choose_units
from minipuzzle.settings import PruneSettings


def prune(model: str, out, settings: PruneSettings, data: str | None, **options) -> dict:
    """Score, search, rank and cut `model` to the settings' budget: write a standard checkpoint plus
    prune_report.json (`PruneReport`) and plots to `out`. `options`: the rest of `PruneRequest` (held-out text,
    split, column, streaming, model_path, scores_dir, overwrite, progress, hardware, training_hardware). Every
    user error is raised before anything is written. Returns the report as a dict."""
    return run(open_context(PruneRequest(model, out, settings, data, **options)))


def run(ctx: PruneContext) -> dict:
    """The prune of an opened context (see `prune`). Scoring and ranking run as its memory plan says: on the
    settings' device in the plan's dtype, streamed or in memory, at the planned batch and row chunks; candidate
    distillation runs in processes of its own, planned and launched for the training hardware."""
    t0, timing, st = time.perf_counter(), {}, ctx.settings
    windows = read_windows(ctx)
    with _timed(timing, "scoring_seconds" if ctx.request.scoring else None):
        scores = load_or_score(ctx, windows.calib)
    with _timed(timing, "search_seconds"):
        damage = DamageModel(scores, ctx.space)
        cands = measured_set(ctx.space, ctx.budget, damage, st.candidates, st.method)
    plans = [choose_units(c, damage, scores, st.norm_compensation, st.expert_channels) for c in cands]
    with _timed(timing, "ranking_seconds"):
        stats = rank(ctx, plans, windows.held)
    if st.candidate_distill_steps > 0:
        with _timed(timing, "candidate_distill_seconds"):
            after = distill_candidates(ctx, plans, windows.held, work_dir=Path(str(ctx.request.out) + ".candidates"))
        stats = [{**a, "before_distill": b} for a, b in zip(after, stats)]  # rank on the distilled figures
    rows = ranked_rows(cands, stats)
    report = build_report(ctx, scores, cands, plans, rows, windows)
    write_pruned(ctx, plans[rows[0].predicted_rank - 1], report, timing, t0)
    return report.model_dump(mode="json")


@contextmanager
def _timed(timing: dict, key: str | None):
    t = time.perf_counter()
    yield
    if key is not None:
        timing[key] = round(time.perf_counter() - t, 3)


__all__ = ["PruneContext", "PruneRequest", "PruneSettings", "launch_plan", "open_context", "prune", "rank", "run"]
