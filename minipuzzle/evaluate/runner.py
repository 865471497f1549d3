"""`evaluate`: one model (and optionally its teacher) -> a report folder with report.json, report.md and plots.

Everything is measured in the same process and run: held-out text (perplexity, and against the teacher KL and
greedy-token agreement), lm-eval tasks, speed and memory of both models; next to them the architecture model's
parameters, memory and FLOPs. Inputs are all checked before the first model is loaded, and the folder is written
atomically at the end, so a failed or interrupted run leaves nothing at `out`.
"""

from __future__ import annotations

import gc
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers

import minipuzzle
from minipuzzle.arch import Layout, LayoutReport, load_config
from minipuzzle.artifacts import DistillSummary, EvalReport, EvalSettingsUsed, Quality, SpeedResult, read_metrics
from minipuzzle.checkpoint.dtypes import resolve_device
from minipuzzle.checkpoint.resolve import resolve_checkpoint
from minipuzzle.checkpoint.write import check_output_dir
from minipuzzle.data import load_tokenizer, token_windows
from minipuzzle.errors import UserError
from minipuzzle.evaluate.harness import parse_tasks, run_tasks
from minipuzzle.evaluate.placement import execution_device, head_copy, input_device, load_placed, resident_head
from minipuzzle.evaluate.report import write_report
from minipuzzle.evaluate.speed import measure_speed
from minipuzzle.hardware import resolve
from minipuzzle.memory import OFFLOAD_SPEED, compute_hardware, eval_stage, eval_weight_share, model_facts
from minipuzzle.metrics import TokenStats, final_states
from minipuzzle.progress import track
from minipuzzle.quantize.load import load_quantized_placed, quantized
from minipuzzle.settings import EvalSettings

# Imports inside functions here are of optional packages (Model Optimizer, lm-eval, matplotlib, the MIP solver),
# loaded only where a feature uses them.


def _checkpoint_dir(model: str | Path) -> Path:

    path = resolve_checkpoint(str(model))
    if not (path / "config.json").is_file():
        raise UserError(f"checkpoint not found: {model} (no config.json)")
    return path


def _tokenizer(*paths: Path):

    err = None
    for p in paths:
        try:
            return load_tokenizer(p)
        except UserError as e:
            err = e
    raise err  # type: ignore[misc]


@dataclass
class TeacherRecord:
    """What held-out KL needs of a teacher that is no longer loaded: its final states of every batch (on the host,
    [B, T, h] each, in its dtype), a host copy of its LM head and its own statistics."""

    states: list[torch.Tensor]
    head: torch.nn.Linear
    stats: dict


@torch.no_grad()
def record_teacher(teacher, windows: torch.Tensor, batch_size: int = 8, progress: bool = False) -> TeacherRecord:
    """Run `teacher` over windows [N, T] once, keeping what `held_out_stats` needs for the KL: its final states
    on the host (N x T x h values: 17 GB for 128 x 8192 windows of a 8192-wide model in bf16, where storing its
    log-probabilities would take V / h = 16 times more, and a top-k would change the KL)."""

    own, states = TokenStats(), []
    for start in track(range(0, len(windows), batch_size), "held-out text (teacher)", progress):
        ids = windows[start : start + batch_size].to(input_device(teacher))
        h = final_states(teacher, ids).to(execution_device(teacher.lm_head))
        with resident_head(teacher) as head:
            own.add_states(h, head, ids)
        states.append(h.cpu())
    return TeacherRecord(states, head_copy(teacher), own.result())


@torch.no_grad()
def held_out_stats(model, windows: torch.Tensor, teacher=None, batch_size: int = 8, progress: bool = False) -> dict:
    """`metrics.token_stats` over windows [N, T] with a progress bar. With a teacher (a model, or a
    `TeacherRecord` made with the same batch size), its own loss, accuracy and perplexity come back under "teacher",
    from the same forward passes that give the KL (one teacher pass). The models may be spread over devices."""

    stats, own = TokenStats(), TokenStats()
    device, head_dev = input_device(model), execution_device(model.lm_head)
    label = "held-out text" + (" (with teacher)" if teacher is not None else "")
    rec = teacher if isinstance(teacher, TeacherRecord) else None
    t_head = rec.head.to(head_dev) if rec is not None else getattr(teacher, "lm_head", None)
    for i, start in enumerate(track(range(0, len(windows), batch_size), label, progress)):
        ids = windows[start : start + batch_size].to(device)
        if rec is not None:
            t_states = rec.states[i].to(head_dev)
        else:
            t_states = final_states(teacher, ids).to(head_dev) if teacher is not None else None
        states = final_states(model, ids).to(head_dev)
        with resident_head(model) as head:
            stats.add_states(states, head, ids, t_states, t_head)
        if t_states is not None and rec is None:
            own.add_states(t_states.to(execution_device(t_head)), t_head, ids)
    out = stats.result()
    if teacher is not None:
        out["teacher"] = rec.stats if rec is not None else own.result()
    return out


def _versions() -> dict[str, str]:


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
    `settings.held_out_windows` windows [N, seq_len] with the model's tokenizer (`streaming`: see `data.iter_documents`;
    only the text the windows need is read). settings.tasks: lm-eval task names / YAML
    files / folders (see `harness.parse_tasks`), `settings.limit` examples each. Speed is measured on
    [speed_batch, speed_len] random tokens plus `decode_tokens` generated ones. precision/context: the setting the
    architecture memory and FLOPs figures are given for.

    The models are placed as the memory plan on `hardware` (default: this machine) says (`eval_launch`): whole on
    one device, or spread over several GPUs by accelerate's device map, both resident or one after the other, at
    the plan's batch per part. On the CPU that is one device, both resident.
    """

    st, t0, specs = settings, time.time(), parse_tasks(settings.task_specs())
    check_output_dir(out, overwrite)
    if data is None and not specs and not st.speed:
        raise UserError("nothing to evaluate: pass --data, --tasks, or leave the speed measurement on")
    dev, dt = resolve_device(device, dtype)
    mpath, tpath = _checkpoint_dir(model_path), _checkpoint_dir(teacher_path) if teacher_path is not None else None
    _check_vocab(mpath, tpath)
    tok = _tokenizer(mpath, *([tpath] if tpath else []))
    windows = None if data is None else token_windows(data, tok, st.seq_len, st.held_out_windows, st.seed, split=split,
                                                      column=column, streaming=streaming)  # fmt: skip
    launch = eval_launch(mpath, tpath, st, windows is not None, bool(specs), dev, dt, hardware)
    got = _measure(mpath, tpath, launch, dt, dev, windows, tok, specs, st, progress)
    rep = EvalReport(
        model=str(model_path), teacher=str(teacher_path) if teacher_path is not None else None, **got["fields"],
        speed=got["speed"], architecture=_architectures(got["layouts"], model_path, teacher_path, precision, context,
                                                       st.speed_batch),
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
        num_samples=st.held_out_windows, windows=0 if windows is None else len(windows), seed=st.seed,
        tasks=[s.text + (f":{s.shots}" if s.shots is not None else "") for s in specs], limit=st.limit,
        batch_size=st.batch_size, device=str(dev), dtype=str(dt).removeprefix("torch."), speed_batch=st.speed_batch,
        speed_prompt_len=st.speed_len or st.seq_len, decode_tokens=st.decode_tokens, precision=precision,
        context=context, versions=_versions(),
    )  # fmt: skip


def _check_vocab(mpath: Path, tpath: Path | None) -> None:
    """A non-Nemotron-H config or a teacher with another vocabulary fails before anything is loaded."""

    vocab = Layout.from_config(load_config(mpath)).vocab_size
    if tpath is not None and (t_vocab := Layout.from_config(load_config(tpath)).vocab_size) != vocab:
        raise UserError(
            f"teacher vocabulary ({t_vocab}) differs from the model's ({vocab}): KL and agreement need the same tokenizer"
        )


def eval_launch(mpath: Path, tpath: Path | None, st: EvalSettings, held_out: bool, tasks: bool, dev, dt,
                hardware=None) -> dict:  # fmt: skip
    """The eval plan (`memory.eval_memory`) on `hardware` (default: this machine) computing on `dev` in `dt`:
    {"devices", "sequential", "offload", "batch": {part: batch}, "share": {path: weight bytes per device}}.
    An offloaded plan with the speed measurement on is a `UserError` (`memory.OFFLOAD_SPEED`)."""

    hw = compute_hardware(hardware or resolve(), str(dev))
    name = str(dt).removeprefix("torch.")
    (layout, stored), t_layout = model_facts(str(mpath)), model_facts(str(tpath))[0] if tpath else None
    es = st.model_copy(update={"tasks": ["-"] if tasks else []})
    geo = {p.name: p.geometry for p in eval_stage(layout, t_layout, hw, es, held_out=held_out, dtype=name,
                                                  stored_bytes=stored).parts}  # fmt: skip
    k, offload = max(g.devices for g in geo.values()), any(g.streaming for g in geo.values())
    if offload and st.speed:
        raise UserError(f"eval (speed) does not fit: {OFFLOAD_SPEED}")
    share = {mpath: eval_weight_share(layout, k, name)} | ({tpath: eval_weight_share(t_layout, k, name)} if tpath else {})
    return {"devices": k, "sequential": any(g.sequential for g in geo.values()), "offload": offload, "share": share,
            "batch": {n: g.micro_batch for n, g in geo.items()}}  # fmt: skip


def _measure(mpath, tpath, launch: dict, dt, dev, windows, tok, specs, st: EvalSettings, progress: bool) -> dict:
    """Every figure of the report: both models resident (placed as the plan says), or, `launch["sequential"]`,
    the teacher first (its final states kept on the host for the KL, `record_teacher`), freed before the model
    is loaded; `launch["offload"]`: each model's blocks read from its checkpoint every forward.
    Returns {"fields": EvalReport's held-out and task fields, "speed", "layouts"}."""

    def place(path):
        if quantized(path):
            return load_quantized_placed(path, dt, dev, launch)
        return load_placed(path, dt, dev, launch["devices"], launch["share"][path], offload=launch["offload"])

    batch, out = launch["batch"], {"fields": {}, "speed": {}, "layouts": {}}
    teacher, rec = (place(tpath), None) if tpath is not None else (None, None)
    if teacher is not None and launch["sequential"]:
        rec = record_teacher(teacher, windows, batch["held-out"], progress) if windows is not None else None
        _per_model(teacher, "teacher", tok, specs, st, batch, out)
        teacher = None
        _release()
    model = place(mpath)
    if windows is not None:
        out["fields"] |= _held_out(model, rec or teacher, windows, batch["held-out"], progress)
    _per_model(model, "model", tok, specs, st, batch, out)
    if teacher is not None:
        _per_model(teacher, "teacher", tok, specs, st, batch, out)
    return out


def _release() -> None:
    """Give the memory of a model no longer referenced back before the next one is loaded."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _held_out(model, teacher, windows: torch.Tensor, batch_size: int, progress: bool) -> dict[str, Any]:
    """EvalReport's held-out text fields from windows [N, T]."""
    stats = held_out_stats(model, windows, teacher, batch_size, progress)
    out = {k: stats.get(k) for k in ("perplexity", "loss", "accuracy", "kl_to_teacher", "agreement", "tokens")}
    if teacher is not None:
        out["teacher_quality"] = Quality(**{k: stats["teacher"][k] for k in ("perplexity", "loss", "accuracy")})
    return out


def _per_model(m, role: str, tok, specs, st: EvalSettings, batch: dict, out: dict) -> None:
    """Into `out`: `m`'s lm-eval tasks, speed and layout (`role`: "model" or "teacher")."""

    out["layouts"][role] = Layout.from_config(m.config)
    if role == "model" or specs:
        res = run_tasks(m, tok, specs, limit=st.limit, batch_size=batch.get("tasks", st.batch_size), seed=st.seed)
        if role == "model":
            out["fields"] |= {"tasks": res["tasks"], "tasks_stderr": res["stderr"], "n_shot": res["n_shot"],
                              "task_samples": res["samples"]}  # fmt: skip
        else:
            out["fields"]["teacher_tasks"] = res["tasks"]
    if st.speed:
        args = (st.speed_batch, st.speed_len or st.seq_len, st.decode_tokens, st.speed_repeats, st.seed)
        out["speed"][role] = SpeedResult(**measure_speed(m, *args))


def _architectures(layouts: dict, model_path, teacher_path, precision: str, context: int, batch: int) -> dict:

    names = {"model": str(model_path), "teacher": str(teacher_path)}
    return {r: LayoutReport(lay, precision, None, context, batch, names[r]).as_dict() for r, lay in layouts.items()}


def _distill_summary(mpath: Path) -> DistillSummary | None:
    """The distillation log a distilled checkpoint carries, summed up (its last row)."""
    f = mpath / "metrics.jsonl"
    rows = read_metrics(f) if f.is_file() else []
    return DistillSummary(metrics_file=str(f), points=len(rows), last=rows[-1].model_dump()) if rows else None
