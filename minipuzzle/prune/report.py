"""What a prune writes: the winner's cut, prune_report.json (`PruneReport`) and its plots, in one atomic folder."""

from __future__ import annotations

import time

from minipuzzle.anatomy import AXES
from minipuzzle.artifacts import CandidateRow, LayoutDoc, PruneData, PruneReport
from minipuzzle.checkpoint.write import atomic_dir
from minipuzzle.cut import cut_checkpoint
from minipuzzle.prune.context import PruneContext
from minipuzzle.prune.windows import Windows
from minipuzzle.score.scores import Scores
from minipuzzle.search.plan import layout_document
from minipuzzle.search.report import write_plots
from minipuzzle.search.solver import Candidate
from minipuzzle.search.space import layout_axes


def build_report(ctx: PruneContext, scores: Scores, cands: list[Candidate], plans: list, rows: list[CandidateRow],
                 windows: Windows) -> PruneReport:  # fmt: skip
    """The prune report of the best measured candidate, `rows[0]`; `plans[i]` is the cut plan of `cands[i]`."""
    req, src = ctx.request, ctx.ckpt.layout
    best, held = rows[0].predicted_rank - 1, len(windows.held)
    held_source = (str(req.held_out_data) if req.held_out_data is not None
                   else f"the first {held} windows of {req.data} (not scored on; candidate distillation skips them)")  # fmt: skip
    return PruneReport(
        model=str(req.model), checkpoint=str(ctx.ckpt.path), budget=ctx.budget.to_dict(), space=ctx.space.describe(),
        chosen=LayoutDoc(**layout_document(plans[best], src, ctx.budget, cands[best])),
        source_widths={name: AXES[name].width(src) for name in layout_axes(src)},
        source_memory=ctx.budget.memory_of(src), candidates=rows,
        data=PruneData(source=str(req.data), seq_len=ctx.settings.seq_len, calibration_windows=len(windows.calib),
                       held_out_windows=held, held_out_source=held_source),
        streamed=ctx.parts["ranking"].geometry.streaming, scores=scores.meta,
    )  # fmt: skip


def write_pruned(ctx: PruneContext, plan, report: PruneReport, timing: dict, t0: float) -> None:
    """Cut `plan` from the parent into the output folder with prune_report.json and its plots, atomically, in
    output shards of the stage plan's cut part; `timing` gains the cut's and the total seconds (since `t0`)."""
    with atomic_dir(ctx.request.out, ctx.request.overwrite) as tmp:
        t = time.perf_counter()
        cut_checkpoint(ctx.ckpt, plan, tmp, overwrite=True, progress=ctx.request.progress,
                         max_shard_bytes=ctx.shard_bytes)  # fmt: skip
        timing["cut_seconds"] = round(time.perf_counter() - t, 3)
        report.timing = {**timing, "total_seconds": round(time.perf_counter() - t0, 3)}
        report.write(tmp / "prune_report.json")
        write_plots(report, ctx.ckpt.layout, tmp)
