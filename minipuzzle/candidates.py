"""Short distillation of each ranked prune candidate before the final choice (MiniPuzzle distils every
candidate briefly; ranks changed after it). Lives outside `search` so that the search does not depend on
distillation.

Each candidate is distilled like the distill stage (`distill.launch`), always in processes of its own: a child
process when its memory plan needs one device, torchrun on the plan's devices on this node, or, over several nodes,
a script for every node (prune is rerun once it has run). The prune process trains nothing, so its own memory stays
what scoring and ranking need, and a training's memory is returned when its process ends. The distilled candidates
are then measured against the parent exactly as the search's candidates were ranked (`search.pipeline.rank`:
streamed layer by layer when the plan says so).
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from minipuzzle.hardware import Hardware


def distill_candidates(path, ckpt, plans, held: torch.Tensor, data: str, settings, progress: bool,
                       skip: int = 0, split: str = "train", column: str = "text", *, streaming: bool | None = None,
                       work_dir: Path | None = None, hardware: Hardware | None = None, ranking=None,
                       shard_bytes: int | None = None, log: Callable[[str], None] = print) -> list[dict]:  # fmt: skip
    """Cut each plan from `ckpt`, distil it for `settings.candidate_distill_steps` on `data`, and return its
    `metrics.token_stats` against the parent on `held` [H, T].

    `skip`: held-out windows at the head of `data` (see `data.head_split`); distillation takes them as its
    evaluation windows, which it never trains on, and evaluates on them once, at the last step. `streaming`: as
    `data.streaming` (None: on). `work_dir`: where cuts and distilled candidates are kept (a rerun reuses the
    finished ones; default: a temporary folder), and the launches' logs (`logs/`; without `work_dir`, a temporary
    folder kept when a launch fails). `hardware`: what the training is planned and launched for
    (default: this machine). `ranking`: the prune plan's ranking part, which the measurement follows (default: the
    plan on this machine). `shard_bytes`: the largest output shard of each candidate's cut (the prune plan's cut
    part; default `checkpoint.SHARD_BYTES`): a shard is buffered whole. The winner is still written undistilled:
    the final distillation stage starts from the cut weights.
    """
    from minipuzzle.hardware import detect
    from minipuzzle.memory import for_device
    from minipuzzle.search.pipeline import rank

    hw = for_device(hardware or detect(), settings.device) or Hardware(device="cpu", gpu_memory=2**62)
    # A failed launch names its log, which must outlive the temporary folder of the cuts.
    logs = Path(work_dir, "logs") if work_dir is not None else Path(tempfile.mkdtemp(prefix="minipuzzle-logs-"))
    try:
        with _folder(work_dir) as work:
            distilled = []
            for i, plan in enumerate(plans):
                _cut(ckpt, plan, work / f"cand{i}", shard_bytes)
                cfg = _settings(work / f"cand{i}", path, data, settings, progress, skip, split, column, streaming)
                _run(cfg, ckpt, hw, settings, work, log, logs)
                distilled.append(cfg.output_path)
            out = rank(path, ckpt, distilled, held, settings, progress, ranking)
    except BaseException:
        with contextlib.suppress(OSError):
            logs.rmdir()  # only when no launch logged there
        raise
    # every candidate is measured: nothing left to resume
    shutil.rmtree(work_dir if work_dir is not None else logs, ignore_errors=True)
    return out


def _cut(ckpt, plan, cut_dir: Path, shard_bytes: int | None) -> None:
    """Write the candidate's cut to `cut_dir`, unless a rerun finds it there."""
    from minipuzzle.checkpoint.write import SHARD_BYTES
    from minipuzzle.surgery import prune_checkpoint

    if not (cut_dir / "config.json").is_file():
        prune_checkpoint(ckpt, plan, cut_dir, progress=False, overwrite=True,
                         max_shard_bytes=shard_bytes or SHARD_BYTES)  # fmt: skip


def _settings(cut_dir: Path, path, data, settings, progress, skip, split, column, streaming):
    """The DistillSettings of one candidate whose cut is in `cut_dir`."""
    from minipuzzle.settings import DistillSettings

    steps = settings.candidate_distill_steps
    return DistillSettings(
        teacher=str(path), student=str(cut_dir), data=str(data), output=str(cut_dir) + "-distilled",
        max_steps=steps, seq_len=settings.seq_len, batch_size=settings.candidate_distill_batch,
        lr=settings.candidate_distill_lr, warmup=max(1, steps // 10), save_every=0,
        eval_every=steps if skip else 0, eval_windows=skip, split=split, text_column=column,
        streaming=streaming is not False, seed=settings.seed, device=settings.device, progress=progress,
    )  # fmt: skip


def _run(cfg, ckpt, hw: Hardware, settings, work: Path, log, logs: Path):
    """Distil one candidate in processes of its own, as its memory plan says, their logs under `logs`; returns
    the plan's part."""
    from minipuzzle.checkpoint.read import Checkpoint
    from minipuzzle.distill.launch import launch, nodes_and_procs, planned
    from minipuzzle.distill.loop import finished
    from minipuzzle.errors import UserError
    from minipuzzle.memory import candidate_distill_memory, default_dtype

    part = candidate_distill_memory(ckpt.layout, Checkpoint(cfg.student).layout, hw, settings, dtype=default_dtype(hw))
    if not part.fits:
        raise UserError(f"prune (candidate distillation) does not fit: {part.problem}")
    nnodes, nproc = nodes_and_procs(part, hw)
    launch_hw = hw.model_copy(update={"nodes": nnodes, "gpus_per_node": nproc})
    cfg = planned(cfg, launch_hw, nnodes * nproc)[0]
    if not finished(cfg.output_path, cfg):
        launch(cfg, nnodes, nproc, work / "candidates_torchrun.sh", log, logs, then="rerun prune to continue")
    return part


@contextlib.contextmanager
def _folder(work_dir: Path | None):
    if work_dir is not None:
        Path(work_dir).mkdir(parents=True, exist_ok=True)
        yield Path(work_dir)
        return
    with tempfile.TemporaryDirectory(prefix="minipuzzle-candidates-") as work:
        yield Path(work)
