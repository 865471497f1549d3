"""Window preparation before and after streamed data: seconds, peak RSS and bytes read, per file size.

Run from the repository root: `python benchmarks/data_windows.py [--sizes-mb 1.5 8 200] [--timeout 300]`.
Text files of the given sizes are made by repeating the Python standard library's sources; windows are cut with
the demo teacher's tokenizer (byte-level BPE, 4096 tokens) in two settings:
  score: `minipuzzle score --samples 1 --seq-len 32` (token_windows, 1 window of 32 tokens: the smallest read),
  prune: `minipuzzle prune` defaults without a held-out source (head_split, 64 held-out + 1024 windows of 512).
"before" is minipuzzle/data.py at --baseline (read with `git show`), "after" the working tree's. Each measurement
runs in a fresh interpreter, killed after --timeout seconds (the JSON then says so). Before is not run on files
over --before-max-mb: it tokenizes the whole file at once, into Python lists of several GB for 200 MB.
Writes benchmarks/results/data_windows.json and prints the after / before ratios.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import resource
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = ROOT / "minipuzzle" / "assets" / "demo-teacher"
sys.path.insert(0, str(ROOT))  # the data.py under test imports this checkout's minipuzzle, not an installed one
CASES = {"score": "token_windows(path, tok, 32, 1, 0)", "prune": "head_split(path, tok, 512, 64, 1024, 0)"}


def make_text(path: Path, size: int) -> None:
    """`size` bytes of Python source: the stdlib's top-level files, repeated."""
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    block = b"\n\n".join(f.read_bytes() for f in files)
    with open(path, "wb") as f:
        for _ in range(size // len(block)):
            f.write(block)
        f.write(block[: size % len(block)])


def _bytes_read() -> int | None:
    io = Path("/proc/self/io")
    if not io.is_file():
        return None
    return next(int(line.split()[1]) for line in io.read_text().splitlines() if line.startswith("rchar:"))


def child(module_file: str, case: str, path: str) -> None:
    """Measure one case in this (fresh) interpreter and print a JSON line."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    spec = importlib.util.spec_from_file_location("data_under_test", module_file)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    tok = mod.load_tokenizer(TOKENIZER)
    read0, t0 = _bytes_read(), time.perf_counter()
    out = eval(CASES[case], {"path": path, "tok": tok, **vars(mod)})  # noqa: S307 - our own fixed expressions
    seconds = time.perf_counter() - t0
    read = None if read0 is None else _bytes_read() - read0
    shapes = ["x".join(map(str, t.shape)) for t in (out if isinstance(out, tuple) else (out,))]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    print(json.dumps({"seconds": round(seconds, 3), "peak_rss_gib": round(peak, 3), "bytes_read": read,
                      "shapes": shapes}))  # fmt: skip


def measure(module_file: Path, case: str, path: Path, timeout: float) -> dict:
    cmd = [sys.executable, __file__, "--child", str(module_file), case, str(path)]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, check=True)
    except subprocess.TimeoutExpired:
        return {"timed_out_after_s": timeout}
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes-mb", type=float, nargs="+", default=[1.5, 8, 200])
    ap.add_argument("--baseline", default="538a713", help="git revision whose data.py is 'before'")
    ap.add_argument("--timeout", type=float, default=300)
    ap.add_argument("--before-max-mb", type=float, default=10)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "data_windows.json")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        before = Path(tmp) / "data_before.py"
        before.write_text(subprocess.run(["git", "show", f"{args.baseline}:minipuzzle/data.py"], cwd=ROOT,
                                         capture_output=True, text=True, check=True).stdout)  # fmt: skip
        for mb in args.sizes_mb:
            path = Path(tmp) / f"text_{mb:g}mb.txt"
            make_text(path, int(mb * 1e6))
            for case in CASES:
                row = {"file_mb": mb, "case": case, "after": measure(ROOT / "minipuzzle" / "data.py", case, path,
                                                                     args.timeout)}  # fmt: skip
                if mb <= args.before_max_mb:
                    row["before"] = measure(before, case, path, args.timeout)
                    a, b = row["after"].get("seconds"), row["before"].get("seconds")
                    if a and b:
                        row["speedup"] = round(b / a, 1)
                    elif a:
                        row["speedup_at_least"] = round(row["before"]["timed_out_after_s"] / a, 1)
                rows.append(row)
                print(json.dumps(row), flush=True)
    doc = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "baseline": args.baseline,
           "machine": f"{platform.machine()}, {os.cpu_count()} CPUs (shared with other work; load average "
                      f"{os.getloadavg()[0]:.1f} at the end)", "tokenizer": "demo-teacher (byte-level BPE, 4096)",
           "cases": CASES, "rows": rows}  # fmt: skip
    args.out.write_text(json.dumps(doc, indent=2) + "\n")


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--child":
        child(*sys.argv[2:])
    else:
        main()
