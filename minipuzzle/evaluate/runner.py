"""`evaluate`: one model (and optionally its teacher) -> a report folder with report.json, report.md and plots.

Everything is measured in the same process and run: held-out text (perplexity, and against the teacher KL and
greedy-token agreement), lm-eval tasks, speed and memory of both models; next to them the architecture model's
parameters, memory and FLOPs. Inputs are all checked before the first model is loaded, and the folder is written
atomically at the end, so a failed or interrupted run leaves nothing at `out`.
"""

from __future__ import annotations

import platform
import time
from pathlib import Path
from typing import Any

import torch

from minipuzzle.artifacts import DistillSummary, EvalReport, EvalSettingsUsed, Quality, SpeedResult, read_metrics
from minipuzzle.checkpoint import resolve_device
from minipuzzle.errors import UserError
from minipuzzle.evaluate.harness import parse_tasks, run_tasks
from minipuzzle.progress import track
from minipuzzle.settings import EvalSettings


def _checkpoint_dir(model: str | Path) -> Path:
    from minipuzzle.checkpoint import resolve_checkpoint

    path = resolve_checkpoint(str(model))
    if not (path / "config.json").is_file():
        raise UserError(f"checkpoint not found: {model} (no config.json)")
    return path


def _tokenizer(*paths: Path):
    from minipuzzle.data import load_tokenizer

    err = None
    for p in paths:
        try:
            return load_tokenizer(p)
        except UserError as e:
            err = e
    raise err  # type: ignore[misc]


@torch.no_grad()
def held_out_stats(model, windows: torch.Tensor, teacher=None, batch_size: int = 8, progress: bool = False) -> dict:
    """`metrics.token_stats` over windows [N, T] with a progress bar. With a teacher, its own loss, accuracy and
    perplexity come back under "teacher", from the same forward passes that give the KL (one teacher pass)."""
    from minipuzzle.metrics import TokenStats, final_states

    stats, own = TokenStats(), TokenStats()
    device = next(model.parameters()).device
    label = "held-out text" + (" (with teacher)" if teacher is not None else "")
    t_head = getattr(teacher, "lm_head", None)
    for start in track(range(0, len(windows), batch_size), label, progress):
        ids = windows[start : start + batch_size].to(device)
        t_states = final_states(teacher, ids) if teacher is not None else None
        stats.add_states(final_states(model, ids), model.lm_head, ids, t_states, t_head)
        if t_states is not None:
            own.add_states(t_states, t_head, ids)
    out = stats.result()
    if teacher is not None:
        out["teacher"] = own.result()
    return out


def _architecture(model, precision: str, context: int, batch: int, name: str) -> dict:
    from minipuzzle.arch import Layout, LayoutReport

    layout = Layout.from_config(model.config)
    return LayoutReport(layout, precision, None, context, batch, name).as_dict()


def _versions() -> dict[str, str]:
    import transformers

    import minipuzzle

    out = {"minipuzzle": minipuzzle.__version__, "torch": torch.__version__, "transformers": transformers.__version__}
    try:
        import lm_eval

        out["lm_eval"] = getattr(lm_eval, "__version__", "?")
    except ImportError:
        pass
    out["python"] = platform.python_version()
    return out


def evaluate(
    model_path: str | Path,
    out: str | Path,
    settings: EvalSettings,
    *,
    teacher_path: str | Path | None = None,
    data: str | Path | None = None,
    split: str = "train",
    column: str = "text",
    streaming: bool | None = None,
    device: str | None = None,
    dtype: str | torch.dtype | None = None,
    precision: str = "bf16",
    context: int = 8192,
    overwrite: bool = False,
    progress: bool = False,
    hardware=None,
) -> dict[str, Any]:
    """Evaluate `model_path` (and `teacher_path`) and write the report folder `out` (report.json is an
    `artifacts.EvalReport`); returns the report as a dict.

    data: held-out text (file, folder or datasets name; `split` and `column` of a table or hub dataset) cut into
    `settings.samples` windows [N, seq_len] with the model's tokenizer (`streaming`: see `data.iter_documents`;
    only the text the windows need is read). settings.tasks: lm-eval task names / YAML
    files / folders (see `harness.parse_tasks`), `settings.limit` examples each. Speed is measured on
    [speed_batch, speed_len] random tokens plus `decode_tokens` generated ones. precision/context: the setting the
    architecture memory and FLOPs figures are given for.
    """
    from minipuzzle.checkpoint import check_output_dir
    from minipuzzle.data import token_windows
    from minipuzzle.evaluate.report import write_report

    st, t0, specs = settings, time.time(), parse_tasks(settings.task_specs())
    check_output_dir(out, overwrite)
    if data is None and not specs and not st.speed:
        raise UserError("nothing to evaluate: pass --data, --tasks, or leave the speed measurement on")
    dev, dt = resolve_device(device, dtype)
    mpath, tpath = _checkpoint_dir(model_path), _checkpoint_dir(teacher_path) if teacher_path is not None else None
    tok = _tokenizer(mpath, *([tpath] if tpath else []))
    windows = None if data is None else token_windows(data, tok, st.seq_len, st.samples, st.seed, split=split,
                                                      column=column, streaming=streaming)  # fmt: skip
    model, teacher = _load_pair(mpath, tpath, dt, dev)
    rep = EvalReport(
        model=str(model_path), teacher=str(teacher_path) if teacher_path is not None else None,
        **(_held_out(model, teacher, windows, st.batch_size, progress) if windows is not None else {}),
        **_tasks(model, teacher, tok, specs, st.limit, st.batch_size, st.seed),
        speed=_speeds(model, teacher, st),
        architecture=_architectures(model, teacher, model_path, teacher_path, precision, context, st.speed_batch),
        distill=_distill_summary(mpath),
        settings=_settings_used(st, data, split, column, windows, specs, dev, dt, precision, context),
        elapsed_s=round(time.time() - t0, 3),  # keyword arguments run in order: this one comes last
    )  # fmt: skip
    rep.params = rep.architecture["model"]["params"]
    write_report(rep, out, overwrite=overwrite)
    return rep.model_dump(mode="json")


def _settings_used(st: EvalSettings, data, split, column, windows, specs, dev, dt, precision, context):
    """The report's record of what was measured how: the settings, the windows [N, T] read, device and versions."""
    return EvalSettingsUsed(
        data=str(data) if data is not None else None, split=split, column=column, seq_len=st.seq_len,
        num_samples=st.samples, windows=0 if windows is None else len(windows), seed=st.seed,
        tasks=[s.text + (f":{s.shots}" if s.shots is not None else "") for s in specs], limit=st.limit,
        batch_size=st.batch_size, device=str(dev), dtype=str(dt).removeprefix("torch."), speed_batch=st.speed_batch,
        speed_prompt_len=st.speed_len or st.seq_len, decode_tokens=st.decode_tokens, precision=precision,
        context=context, versions=_versions(),
    )  # fmt: skip


def _load_pair(mpath: Path, tpath: Path | None, dt, dev):
    """(model, teacher or None); a non-Nemotron-H config or a vocabulary mismatch fails before loading."""
    from minipuzzle.arch import Layout, load_config
    from minipuzzle.checkpoint import load_model

    Layout.from_config(load_config(mpath))
    model = load_model(mpath, dt, dev)
    teacher = load_model(tpath, dt, dev) if tpath is not None else None
    if teacher is not None and teacher.config.vocab_size != model.config.vocab_size:
        raise UserError(
            f"teacher vocabulary ({teacher.config.vocab_size}) differs from the model's ({model.config.vocab_size}): "
            "KL and agreement need the same tokenizer"
        )
    return model, teacher


def _held_out(model, teacher, windows: torch.Tensor, batch_size: int, progress: bool) -> dict[str, Any]:
    """EvalReport's held-out text fields from windows [N, T]."""
    stats = held_out_stats(model, windows, teacher, batch_size, progress)
    out = {k: stats.get(k) for k in ("perplexity", "loss", "accuracy", "kl_to_teacher", "agreement", "tokens")}
    if teacher is not None:
        out["teacher_quality"] = Quality(**{k: stats["teacher"][k] for k in ("perplexity", "loss", "accuracy")})
    return out


def _tasks(model, teacher, tok, specs, limit, batch_size: int, seed: int) -> dict[str, Any]:
    """EvalReport's lm-eval fields; the teacher runs the same tasks when there is one."""
    res = run_tasks(model, tok, specs, limit=limit, batch_size=batch_size, seed=seed)
    out = {"tasks": res["tasks"], "tasks_stderr": res["stderr"], "n_shot": res["n_shot"],
           "task_samples": res["samples"]}  # fmt: skip
    if teacher is not None and specs:
        out["teacher_tasks"] = run_tasks(teacher, tok, specs, limit=limit, batch_size=batch_size, seed=seed)["tasks"]
    return out


def _speeds(model, teacher, st: EvalSettings) -> dict[str, SpeedResult]:
    from minipuzzle.evaluate.speed import measure_speed

    if not st.speed:
        return {}
    args = (st.speed_batch, st.speed_len or st.seq_len, st.decode_tokens, st.speed_repeats, st.seed)
    pairs = (("model", model), ("teacher", teacher))
    return {n: SpeedResult(**measure_speed(m, *args)) for n, m in pairs if m is not None}


def _architectures(model, teacher, model_path, teacher_path, precision: str, context: int, batch: int):
    out = {"model": _architecture(model, precision, context, batch, str(model_path))}
    if teacher is not None:
        out["teacher"] = _architecture(teacher, precision, context, batch, str(teacher_path))
    return out


def _distill_summary(mpath: Path) -> DistillSummary | None:
    """The distillation log a distilled checkpoint carries, summed up (its last row)."""
    f = mpath / "metrics.jsonl"
    rows = read_metrics(f) if f.is_file() else []
    return DistillSummary(metrics_file=str(f), points=len(rows), last=rows[-1].model_dump()) if rows else None
