"""lm-eval harness tasks on a model held in memory: registered task names and local task YAML files or folders.

A task spec is `NAME`, `NAME:SHOTS`, `path/to/task.yaml` or `path/to/folder/` (optionally with `:SHOTS`). Local
YAML files are read with lm-eval's own loader and handed over as config dicts, with relative `data_files` resolved
against the YAML's folder, so a task over a local jsonl runs offline from any working directory. The built-in task
index is only scanned when a registered name is asked for (scanning it takes tens of seconds).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from minipuzzle.errors import UserError

# Imports inside functions here keep torch and transformers unloaded until a function needs them, so `--help`
# and the offline commands (dry runs, info, search) start fast.
# The others are of optional packages (Model Optimizer, lm-eval, matplotlib, the MIP solver),
# loaded only where a feature uses them.

# Few-shot counts of the Minitron reports' base-model table (MMLU 5, PIQA 0, HellaSwag 10, Winogrande 5,
# ARC-Challenge 25, GSM8K 5, TruthfulQA 0); `NAME:SHOTS` overrides, unlisted tasks keep their YAML default.
DEFAULT_FEWSHOT: dict[str, int] = {
    "mmlu": 5,
    "piqa": 0,
    "hellaswag": 10,
    "winogrande": 5,
    "arc_challenge": 25,
    "arc_easy": 0,
    "gsm8k": 5,
    "truthfulqa_mc2": 0,
}
YAML_SUFFIXES = (".yaml", ".yml")


@dataclass(frozen=True)
class TaskSpec:
    """One `--tasks` entry: a registered name, a YAML file or a folder of YAML files, with optional shots."""

    text: str
    kind: str  # "name" | "file" | "folder"
    shots: int | None = None

    @property
    def path(self) -> Path:
        return Path(self.text)


def parse_tasks(items: Iterable[str] | str | None) -> list[TaskSpec]:
    """Split comma-separated task entries into specs; a missing local file is a `UserError`."""
    if items is None:
        return []
    if isinstance(items, str):
        items = [items]
    specs: list[TaskSpec] = []
    for item in items:
        for raw in str(item).split(","):
            raw = raw.strip()
            if not raw:
                continue
            text, shots = raw, None
            head, sep, tail = raw.rpartition(":")
            if sep and tail.isdigit() and head:
                text, shots = head, int(tail)
            p = Path(text).expanduser()
            if p.is_dir():
                specs.append(TaskSpec(str(p), "folder", shots))
            elif p.is_file():
                if p.suffix not in YAML_SUFFIXES:
                    raise UserError(f"task file {p} is not a .yaml task config")
                specs.append(TaskSpec(str(p), "file", shots))
            elif p.suffix in YAML_SUFFIXES or "/" in text or text.startswith("."):
                raise UserError(f"task file or folder not found: {text}")
            else:
                specs.append(TaskSpec(text, "name", DEFAULT_FEWSHOT.get(text) if shots is None else shots))
    return specs


def _load_yaml(path: Path) -> dict[str, Any]:
    from lm_eval.tasks._yaml_loader import load_yaml

    try:
        cfg = load_yaml(path, resolve_func=True, recursive=True)
    except Exception as e:
        raise UserError(f"cannot read task config {path}: {str(e).splitlines()[0] if str(e) else e}") from None
    if not isinstance(cfg, dict):
        raise UserError(f"task config {path} is not a YAML mapping")
    return cfg


def _resolve_data_files(cfg: dict[str, Any], base: Path) -> dict[str, Any]:
    """Make relative `dataset_kwargs.data_files` (and a local `dataset_path`) absolute against the YAML's folder.

    lm-eval passes them to `datasets` as they are, i.e. relative to the working directory, which breaks a task
    shipped next to its data as soon as the command runs from elsewhere.
    """

    def fix(v):
        if isinstance(v, str):
            p = Path(v).expanduser()
            return str((base / p).resolve()) if not p.is_absolute() and (base / p).exists() else v
        if isinstance(v, list):
            return [fix(x) for x in v]
        if isinstance(v, dict):
            return {k: fix(x) for k, x in v.items()}
        return v

    cfg = dict(cfg)
    kwargs = cfg.get("dataset_kwargs")
    if isinstance(kwargs, dict) and "data_files" in kwargs:
        cfg["dataset_kwargs"] = {**kwargs, "data_files": fix(kwargs["data_files"])}
    dp = cfg.get("dataset_path")
    if isinstance(dp, str) and (base / dp).exists() and not Path(dp).is_absolute():
        cfg["dataset_path"] = str((base / dp).resolve())
    return cfg


def _entries(spec: TaskSpec) -> tuple[list[Any], list[str]]:
    """(task entries for simple_evaluate, folders to add to the include path) of one spec."""
    if spec.kind == "name":
        return [spec.text], []
    if spec.kind == "file":
        files = [spec.path]
        folder = spec.path.parent
    else:
        folder = spec.path
        files = sorted(f for f in folder.rglob("*") if f.suffix in YAML_SUFFIXES)
    tasks, groups = [], []
    for f in files:
        cfg = _load_yaml(f)
        if isinstance(cfg.get("group"), str) and isinstance(cfg.get("task"), list):
            groups.append(str(f.resolve()))
        elif isinstance(cfg.get("task"), str):
            tasks.append(_resolve_data_files(cfg, f.parent.resolve()))
    # A folder with groups runs its groups (which name their member tasks); listing the members too would run
    # them twice, which lm-eval refuses.
    entries = groups if (groups and spec.kind == "folder") else tasks + groups
    if not entries:
        raise UserError(f"no lm-eval task (a YAML with a `task:` or `group:` key) in {spec.text}")
    return entries, [str(folder.resolve())]


def _metrics(row: dict[str, Any]) -> tuple[dict[str, float], dict[str, float]]:
    """lm-eval's `{"acc,none": v, "acc_stderr,none": s}` -> ({"acc": v}, {"acc": s}); filters other than
    `none` are kept as `metric/filter`."""
    values, errors = {}, {}
    for key, v in row.items():
        if "," not in key or isinstance(v, str) or v is None:
            continue
        name, filt = key.split(",", 1)
        is_err = name.endswith("_stderr")
        name = name.removesuffix("_stderr")
        if filt != "none":
            name = f"{name}/{filt}"
        try:
            v = float(v)
        except (TypeError, ValueError):
            continue
        if math.isfinite(v):
            (errors if is_err else values)[name] = v
    return values, errors


def _task_manager(specs: list[TaskSpec]) -> tuple[Any, dict[int | None, list[Any]]]:
    """An lm-eval TaskManager that knows every spec's tasks, and the task entries grouped by few-shot count;
    an unknown task name is a user error."""
    from lm_eval.tasks import TaskManager

    include: list[str] = []
    by_shots: dict[int | None, list[Any]] = {}
    for spec in specs:
        entries, folders = _entries(spec)
        include += [f for f in folders if f not in include]
        by_shots.setdefault(spec.shots, []).extend(entries)
    needs_registry = any(s.kind == "name" for s in specs)
    manager = TaskManager(include_path=include or None, include_defaults=needs_registry)
    known = set(manager.all_tasks)
    for spec in specs:
        if spec.kind == "name" and spec.text not in known:
            raise UserError(f"unknown lm-eval task {spec.text!r} (pass a task name, a task .yaml or a folder)")
    return manager, by_shots


def run_tasks(
    model,
    tokenizer,
    specs: list[TaskSpec],
    *,
    limit: int | float | None = None,
    batch_size: int = 8,
    seed: int = 1234,
) -> dict[str, Any]:
    """Evaluate `model` (a causal LM: in memory, device-mapped or offloaded, see `placement`) on lm-eval tasks.

    Returns {"tasks": {task: {metric: value}}, "stderr": {task: {metric: value}}, "n_shot": {task: int},
    "samples": {task: int}}. Tasks with different few-shot counts run in separate `simple_evaluate` calls over
    the same wrapped model.
    """
    if not specs:
        return {"tasks": {}, "stderr": {}, "n_shot": {}, "samples": {}}
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    from minipuzzle.evaluate.placement import input_device

    manager, by_shots = _task_manager(specs)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    # HFLM sends token ids to `model.device`, its first parameter's: on the meta device for an offloaded model, and
    # not always the embeddings' device under a device map. They go where the embeddings compute.
    lm._device = input_device(model)
    out: dict[str, Any] = {"tasks": {}, "stderr": {}, "n_shot": {}, "samples": {}}
    for shots, entries in by_shots.items():
        res = simple_evaluate(
            model=lm,
            tasks=entries,
            num_fewshot=shots,
            limit=limit,
            task_manager=manager,
            log_samples=False,
            bootstrap_iters=100,
            random_seed=seed,
            numpy_random_seed=seed,
            torch_random_seed=seed,
            fewshot_random_seed=seed,
        )
        if res is None:
            continue
        for task, row in res.get("results", {}).items():
            values, errors = _metrics(row)
            if values:
                out["tasks"][task] = values
                out["stderr"][task] = errors
        for task, n in (res.get("n-shot") or {}).items():
            out["n_shot"][task] = int(n) if n is not None else None
        for task, n in (res.get("n-samples") or {}).items():
            out["samples"][task] = int(n.get("effective", 0)) if isinstance(n, dict) else n
    return out
