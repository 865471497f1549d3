"""Do two revisions compute the same figures? Runs the demo recipe, every recipe's dry run and the benchmarks' quick
modes at each revision, then compares every number they write, to the last digit.

A refactor must leave every computed figure as it was; this script is how that is shown. Each revision is checked
out with `git worktree add --detach` into a temporary folder and run in fresh interpreters with that folder first
on PYTHONPATH (so the installed package's own files are not used), with the same seed, thread count and data.

Compared: every JSON and YAML file the runs write (the demo run folder, the benchmarks' result files and each
recipe's `run --dry-run --json` plan). Ignored, because they measure the machine and not the method: wall times,
throughput, peak memory measured from the OS, dates, paths, versions and commit ids (`VOLATILE` below lists the
key patterns). Keys or file names renamed between the revisions are mapped with `--rename OLD=NEW` (applied to the
"before" side's keys and relative paths).

    python scripts/compare_figures.py --before d523818 [--after HEAD] [--only demo,dry_runs,benchmarks]
        [--keep DIR] [--rename search=prune ...] [--ignore today ...]

Prints each difference (file, key path, before, after) and exits 1 if there is any, 0 if every figure is equal.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]

# Keys whose values measure the machine (time, speed, OS-measured memory) or name the environment.
VOLATILE = re.compile(
    r"(second|timing|_s$|^s$|time|wall|elapsed|tokens_per_s|per_second|throughput|rss|peak|measured_bytes|date|"
    r"created|path|dir$|folder|version|commit|git|host|python|torch|transformers|log$|logs$|started|finished|"
    r"duration|speed|prefill|decode|latency)",
    re.IGNORECASE,
)


def volatile(key: str) -> bool:
    """A measured-on-this-machine key (`VOLATILE`), unless it is a plan's figure: a predicted peak or a step's
    planned seconds are computed, so they must match to the last digit like every other figure (GPU-hours too,
    which the pattern no longer names)."""
    return not key.startswith(("predicted", "planned")) and VOLATILE.search(key) is not None

# Benchmarks' quick modes: each writes one JSON into the folder passed as {out}.
BENCHMARKS = {
    "demo_quality": ["benchmarks/demo_quality.py", "--smoke", "--output", "{out}"],
    "moe_quality": ["benchmarks/moe_quality.py", "--smoke", "--output", "{out}"],
    "quantize_quality": ["benchmarks/quantize_quality.py", "--smoke", "--teacher-only", "--output", "{out}"],
}


def checkout(rev: str, where: Path) -> Path:
    """A detached worktree of `rev` at `where` (the working tree itself for rev "WORKTREE")."""
    if rev == "WORKTREE":
        return ROOT
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-f", str(where), rev], check=True,
                   capture_output=True)  # fmt: skip
    return where


def _env(tree: Path) -> dict:
    env = dict(os.environ)
    env.update(PYTHONPATH=str(tree), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "2"), PYTHONHASHSEED="0")  # fmt: skip
    return env


def _run(cmd: list[str], tree: Path, log: Path) -> None:
    with log.open("w") as f:
        rc = subprocess.run(cmd, cwd=tree, env=_env(tree), stdout=f, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        sys.exit(f"{' '.join(cmd)} failed in {tree} (exit {rc}); see {log}")


def collect(tree: Path, out: Path, parts: list[str]) -> None:
    """Runs the chosen parts at `tree`, writing their files under `out`."""
    py = sys.executable
    if "dry_runs" in parts:
        d = out / "dry_runs"
        d.mkdir(parents=True, exist_ok=True)
        for recipe in sorted((tree / "recipes").glob("*.yaml")):
            log = d / f"{recipe.stem}.log"
            _run([py, "-m", "minipuzzle.cli", "run", str(recipe), "--dry-run", "--json"], tree, log)
            text = log.read_text()
            (d / f"{recipe.stem}.json").write_text(text[text.index("{"):])
    if "demo" in parts:
        _run([py, "-m", "minipuzzle.cli", "run", "recipes/demo.yaml", "-o", str(out / "demo")], tree,
             out / "demo.log")  # fmt: skip
    if "benchmarks" in parts:
        for name, args in BENCHMARKS.items():
            d = out / "benchmarks" / name
            d.mkdir(parents=True, exist_ok=True)
            _run([py, *(a.format(out=d) for a in args)], tree, out / "benchmarks" / f"{name}.log")


def load_figures(out: Path, rename: dict[str, str]) -> dict[str, object]:
    """Every JSON/YAML file under `out` (logs and model files aside), keyed by its relative path."""
    files = {}
    for p in sorted(out.rglob("*")):
        if p.suffix not in (".json", ".yaml", ".yml") or not p.is_file() or p.name.startswith("tokenizer"):
            continue  # a tokenizer is copied, not computed (and its vocabulary's keys are words, not names)
        rel = str(p.relative_to(out))
        for old, new in rename.items():
            rel = re.sub(rf"\b{re.escape(old)}\b", new, rel)
        text = p.read_text()
        try:
            files[rel] = json.loads(text) if p.suffix == ".json" else yaml.safe_load(text)
        except (json.JSONDecodeError, yaml.YAMLError):
            files[rel] = text
    return files


def diff(a, b, where: str, rename: dict[str, str], out: list[str], ignore: frozenset = frozenset()) -> None:
    """Appends `where: before != after` for every differing leaf; volatile and `ignore`d keys are skipped."""
    if isinstance(a, dict) and isinstance(b, dict):
        a = {rename.get(k, k): v for k, v in a.items()}
        for k in sorted(set(a) | set(b), key=str):
            if volatile(str(k)) or k in ignore:
                continue
            if k not in a or k not in b:
                out.append(f"{where}.{k}: {'missing before' if k not in a else 'missing after'}")
                continue
            diff(a[k], b[k], f"{where}.{k}", rename, out, ignore)
    elif isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            out.append(f"{where}: {len(a)} items before, {len(b)} after")
            return
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            diff(x, y, f"{where}[{i}]", rename, out, ignore)
    elif isinstance(a, str) and isinstance(b, str) and ("/" in a or "\\" in a):
        return  # a path: where the run happened, not what it computed
    elif a != b:
        out.append(f"{where}: {a!r} != {b!r}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--before", required=True, help="git revision (or WORKTREE)")
    ap.add_argument("--after", default="WORKTREE", help="git revision, or WORKTREE for the files as they are")
    ap.add_argument("--only", default="dry_runs,demo,benchmarks", help="comma-separated parts")
    ap.add_argument("--keep", type=Path, help="folder to keep both sides' outputs in (reused if already there)")
    ap.add_argument("--rename", action="append", default=[], help="OLD=NEW key or path name, before -> after")
    ap.add_argument("--ignore", action="append", default=[],
                    help="a key to leave out (removed on purpose, or prose such as a plan's `note`)")  # fmt: skip
    args = ap.parse_args()
    parts = args.only.split(",")
    rename = dict(r.split("=", 1) for r in args.rename)
    work = args.keep or Path(tempfile.mkdtemp(prefix="compare-figures-"))
    trees = []
    try:
        for side, rev in (("before", args.before), ("after", args.after)):
            out = work / side
            if out.exists() and any(out.iterdir()):
                print(f"{side}: reusing {out}")
                continue
            out.mkdir(parents=True, exist_ok=True)
            tree = checkout(rev, work / f"tree-{side}")
            if tree != ROOT:
                trees.append(tree)
            print(f"{side}: {rev} -> {out}", flush=True)
            collect(tree, out, parts)
        before, after = load_figures(work / "before", rename), load_figures(work / "after", {})
        problems: list[str] = []
        for rel in sorted(set(before) | set(after)):
            if rel not in before or rel not in after:
                problems.append(f"{rel}: only {'after' if rel not in before else 'before'}")
                continue
            diff(before[rel], after[rel], rel, rename, problems, frozenset(args.ignore))
        print(f"{len(before)} files compared")
        for p in problems:
            print(p)
        print("every figure equal" if not problems else f"{len(problems)} differences")
        sys.exit(1 if problems else 0)
    finally:
        for t in trees:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(t)], capture_output=True)
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
