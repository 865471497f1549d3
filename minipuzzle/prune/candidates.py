"""Short distillation of each ranked prune candidate before the final choice (MiniPuzzle distils every
candidate briefly; ranks changed after it).

Each candidate is distilled like the distill stage (`distill.launch`), always in processes of its own: a child
process when its memory plan needs one device, torchrun on the plan's devices on this node, or, over several nodes,
a script for every node (prune is rerun once it has run). The prune process trains nothing, so its own memory stays
what scoring and ranking need, and a training's memory is returned when its process ends. The distilled candidates
are then measured against the parent exactly as the search's candidates were ranked (`ranking.rank`: streamed
layer by layer when the plan says so).
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

import minipuzzle.distill.launch as launching  # looked up at the call: tests watch `launch.launch`
from minipuzzle.checkpoint.read import Checkpoint
from minipuzzle.cut import cut_checkpoint
from minipuzzle.distill.loop import finished
from minipuzzle.errors import UserError
from minipuzzle.hardware import Hardware
from minipuzzle.memory import candidate_distill_memory, default_dtype, for_device
from minipuzzle.prune.context import PruneContext
from minipuzzle.prune.ranking import rank
from minipuzzle.settings import DistillSettings


def distill_candidates(ctx: PruneContext, plans: list, held: torch.Tensor, work_dir: Path | None = None,
                       log: Callable[[str], None] = print) -> list[dict]:  # fmt: skip
    """Cut each plan from the parent, distil it for `candidate_distill_steps` on the request's `data`, and return
    its `metrics.token_stats` against the parent on held [H, T].

    Without `held_out_data`, the held-out windows are the head of `data` (`data.head_split`): distillation takes
    them as its evaluation windows, which it never trains on, and evaluates on them once, at the last step.
    `work_dir`: where cuts and distilled candidates are kept (a rerun reuses the finished ones; default: a
    temporary folder), and the launches' logs (`logs/`; without `work_dir`, a temporary folder kept when a launch
    fails). The training is planned and launched for the context's training hardware; each cut is written in
    shards of the plan's cut part. The winner is still written undistilled: the final distillation stage starts
    from the cut weights.
    """
    hw = for_device(ctx.training_hardware, ctx.settings.device) or Hardware(device="cpu", gpu_memory=2**62)
    # A failed launch names its log, which must outlive the temporary folder of the cuts.
    logs = Path(work_dir, "logs") if work_dir is not None else Path(tempfile.mkdtemp(prefix="minipuzzle-logs-"))
    skip = 0 if ctx.request.held_out_data is not None else len(held)  # the head of `data` to skip
    try:
        with _folder(work_dir) as work:
            distilled = []
            for i, plan in enumerate(plans):
                cut_dir = work / f"cand{i}"
                if not (cut_dir / "config.json").is_file():  # a rerun finds the finished cuts
                    cut_checkpoint(ctx.ckpt, plan, cut_dir, progress=False, overwrite=True,
                                     max_shard_bytes=ctx.shard_bytes)  # fmt: skip
                cfg = _settings(ctx, cut_dir, skip)
                _run(ctx, cfg, hw, work, log, logs)
                distilled.append(cfg.output_path)
            out = rank(ctx, distilled, held)
    except BaseException:
        with contextlib.suppress(OSError):
            logs.rmdir()  # only when no launch logged there
        raise
    # every candidate is measured: nothing left to resume
    shutil.rmtree(work_dir if work_dir is not None else logs, ignore_errors=True)
    return out


def _settings(ctx: PruneContext, cut_dir: Path, skip: int) -> DistillSettings:
    """The DistillSettings of one candidate whose cut is in `cut_dir`; `skip`: held-out windows at the head of
    the data, its evaluation windows."""
    st, req = ctx.settings, ctx.request
    steps = st.candidate_distill_steps
    return DistillSettings(
        teacher=str(ctx.ckpt.path), student=str(cut_dir), data=str(req.data), output=str(cut_dir) + "-distilled",
        max_steps=steps, seq_len=st.seq_len, batch_size=st.candidate_distill_batch,
        lr=st.candidate_distill_lr, warmup=max(1, steps // 10), save_every=0,
        eval_every=steps if skip else 0, held_out_windows=skip, split=req.split, text_column=req.column,
        streaming=req.streaming is not False, seed=st.seed, device=st.device, progress=req.progress,
    )  # fmt: skip


def _run(ctx: PruneContext, cfg: DistillSettings, hw: Hardware, work: Path, log: Callable[[str], None], logs: Path):
    """Distil one candidate in processes of its own, as its memory plan on `hw` says, their logs under `logs`;
    returns the plan's part."""
    student = Checkpoint(cfg.student).layout
    part = candidate_distill_memory(ctx.ckpt.layout, student, hw, ctx.settings, dtype=default_dtype(hw))
    if not part.fits:
        raise UserError(f"prune (candidate distillation) does not fit: {part.problem}")
    nnodes, nproc = launching.nodes_and_procs(part, hw)
    launch_hw = hw.model_copy(update={"nodes": nnodes, "gpus_per_node": nproc})
    cfg = launching.planned(cfg, launch_hw, nnodes * nproc)[0]
    if not finished(cfg.output_path, cfg):
        launching.launch(cfg, nnodes, nproc, work / "candidates_torchrun.sh", log, logs,
                         then="rerun prune to continue")  # fmt: skip
    return part


@contextlib.contextmanager
def _folder(work_dir: Path | None):
    if work_dir is not None:
        Path(work_dir).mkdir(parents=True, exist_ok=True)
        yield Path(work_dir)
        return
    with tempfile.TemporaryDirectory(prefix="minipuzzle-candidates-") as work:
        yield Path(work)
