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

from minipuzzle.checkpoint import parse_dtype
from minipuzzle.errors import UserError
from minipuzzle.evaluate.harness import parse_tasks, run_tasks
from minipuzzle.progress import track


def _device(device: str | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {device}: no CUDA device on this machine")
    return dev


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
    from minipuzzle.metrics import TokenStats

    stats, own = TokenStats(), TokenStats()
    device = next(model.parameters()).device
    label = "held-out text" + (" (with teacher)" if teacher is not None else "")
    for start in track(range(0, len(windows), batch_size), label, progress):
        ids = windows[start : start + batch_size].to(device)
        t_logits = teacher(ids, use_cache=False).logits if teacher is not None else None
        stats.add(model(ids, use_cache=False).logits, ids, t_logits)
        if t_logits is not None:
            own.add(t_logits, ids)
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
    teacher_path: str | Path | None = None,
    data: str | Path | None = None,
    tasks=(),
    limit: int | float | None = None,
    seq_len: int = 512,
    out: str | Path = "eval",
    *,
    num_samples: int = 64,
    seed: int = 0,
    batch_size: int = 8,
    split: str = "train",
    column: str = "text",
    device: str | None = None,
    dtype: str | torch.dtype | None = None,
    speed: bool = True,
    speed_batch: int = 1,
    speed_prompt_len: int | None = None,
    decode_tokens: int = 32,
    speed_repeats: int = 3,
    precision: str = "bf16",
    context: int = 8192,
    overwrite: bool = False,
    progress: bool = False,
) -> dict[str, Any]:
    """Evaluate `model_path` (and `teacher_path`) and write the report folder `out`; returns the report dict.

    data: held-out text (file, folder or datasets name) cut into `num_samples` windows of `seq_len` tokens with
    the model's tokenizer. tasks: lm-eval task names / YAML files / folders (see `harness.parse_tasks`), `limit`
    examples each. Speed is measured on [speed_batch, speed_prompt_len] random tokens plus `decode_tokens`
    generated ones. precision/context: the setting the architecture memory and FLOPs figures are given for.
    """
    from minipuzzle.checkpoint import check_output_dir, load_model
    from minipuzzle.data import token_windows

    t0 = time.time()
    specs = parse_tasks(tasks)
    check_output_dir(out, overwrite)
    if seq_len < 2:
        raise UserError(f"--seq-len must be at least 2, got {seq_len}")
    for name, v in (("--num-samples", num_samples), ("--batch-size", batch_size), ("--speed-batch", speed_batch)):
        if v < 1:
            raise UserError(f"{name} must be at least 1, got {v}")
    if limit is not None and limit <= 0:
        raise UserError(f"--limit must be positive, got {limit}")
    if data is None and not specs and not speed:
        raise UserError("nothing to evaluate: pass --data, --tasks, or leave the speed measurement on")
    dev = _device(device)
    dt = parse_dtype(dtype, dev)
    mpath = _checkpoint_dir(model_path)
    tpath = _checkpoint_dir(teacher_path) if teacher_path is not None else None
    from minipuzzle.arch import Layout, load_config

    Layout.from_config(load_config(mpath))  # a non-Nemotron-H config fails here, before any loading
    tok = _tokenizer(mpath, *([tpath] if tpath else []))
    windows = None
    if data is not None:
        windows = token_windows(data, tok, seq_len, num_samples, seed, split=split, column=column)

    model = load_model(mpath, dt, dev)
    teacher = load_model(tpath, dt, dev) if tpath is not None else None
    if teacher is not None and teacher.config.vocab_size != model.config.vocab_size:
        raise UserError(
            f"teacher vocabulary ({teacher.config.vocab_size}) differs from the model's ({model.config.vocab_size}): "
            "KL and agreement need the same tokenizer"
        )

    rep: dict[str, Any] = {
        "model": str(model_path),
        "teacher": str(teacher_path) if teacher_path is not None else None,
        "perplexity": None,
        "loss": None,
        "accuracy": None,
        "kl_to_teacher": None,
        "agreement": None,
        "tokens": 0,
        "teacher_quality": None,
    }
    if windows is not None:
        stats = held_out_stats(model, windows, teacher, batch_size, progress)
        rep.update({k: stats.get(k) for k in ("perplexity", "loss", "accuracy", "kl_to_teacher", "agreement")})
        rep["tokens"] = stats["tokens"]
        if teacher is not None:
            rep["teacher_quality"] = {k: stats["teacher"][k] for k in ("perplexity", "loss", "accuracy")}

    task_out = run_tasks(model, tok, specs, limit=limit, batch_size=batch_size, seed=seed)
    rep["tasks"] = task_out["tasks"]
    rep["tasks_stderr"] = task_out["stderr"]
    rep["n_shot"] = task_out["n_shot"]
    rep["task_samples"] = task_out["samples"]
    rep["teacher_tasks"] = None
    if teacher is not None and specs:
        rep["teacher_tasks"] = run_tasks(teacher, tok, specs, limit=limit, batch_size=batch_size, seed=seed)["tasks"]

    from minipuzzle.evaluate.speed import measure_speed

    plen = speed_prompt_len or seq_len
    rep["speed"] = {}
    if speed:
        for name, m in (("model", model), ("teacher", teacher)):
            if m is not None:
                rep["speed"][name] = measure_speed(m, speed_batch, plen, decode_tokens, speed_repeats, seed)
    rep["architecture"] = {"model": _architecture(model, precision, context, speed_batch, str(model_path))}
    if teacher is not None:
        rep["architecture"]["teacher"] = _architecture(teacher, precision, context, speed_batch, str(teacher_path))
    rep["params"] = rep["architecture"]["model"]["params"]

    metrics_file = mpath / "metrics.jsonl"
    from minipuzzle.evaluate.plots import read_metrics

    rows = read_metrics(metrics_file) if metrics_file.is_file() else []
    rep["distill"] = {"metrics_file": str(metrics_file), "points": len(rows), "last": rows[-1]} if rows else None

    rep["settings"] = {
        "data": str(data) if data is not None else None,
        "split": split,
        "column": column,
        "seq_len": seq_len,
        "num_samples": num_samples,
        "windows": 0 if windows is None else len(windows),
        "seed": seed,
        "tasks": [s.text + (f":{s.shots}" if s.shots is not None else "") for s in specs],
        "limit": limit,
        "batch_size": batch_size,
        "device": str(dev),
        "dtype": str(dt).removeprefix("torch."),
        "speed_batch": speed_batch,
        "speed_prompt_len": plen,
        "decode_tokens": decode_tokens,
        "precision": precision,
        "context": context,
        "versions": _versions(),
    }
    rep["elapsed_s"] = round(time.time() - t0, 3)
    from minipuzzle.evaluate.report import write_report

    write_report(rep, out, overwrite=overwrite, metrics_rows=rows)
    return rep
