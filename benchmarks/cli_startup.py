"""Wall time of `minipuzzle --help` and `minipuzzle info 56b` (fresh interpreters), and which heavy modules load.

Run from the repository root: `python benchmarks/cli_startup.py [--repeats 5]`. Prints the median and min of each
command's wall time next to a bare `python -c pass`, so runs on a loaded machine can still be compared by ratio.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

COMMANDS = {
    "python -c pass": [sys.executable, "-c", "pass"],
    "--help": [sys.executable, "-m", "minipuzzle.cli", "--help"],
    "info 56b": [sys.executable, "-m", "minipuzzle.cli", "info", "56b"],
}
HEAVY = ("torch", "transformers", "matplotlib", "datasets", "lm_eval", "highspy")


def wall_times(cmd: list[str], repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True)
        out.append(time.perf_counter() - t0)
    return out


def heavy_modules_loaded(args: list[str]) -> list[str]:
    """Top-level heavy packages in sys.modules after running `minipuzzle ARGS` in one interpreter."""
    probe = (
        "import sys\nsys.argv = ['minipuzzle', *sys.argv[1:]]\nfrom minipuzzle.cli import main\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        f"import json\nprint(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}} & {set(HEAVY)!r})), file=sys.stderr)"
    )
    res = subprocess.run([sys.executable, "-c", probe, *args], capture_output=True, text=True, check=True)
    return json.loads(res.stderr.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    rows = {}
    for name, cmd in COMMANDS.items():
        t = wall_times(cmd, args.repeats)
        rows[name] = {"median_s": round(statistics.median(t), 3), "min_s": round(min(t), 3)}
    base = rows["python -c pass"]["median_s"]
    for name in ("--help", "info 56b"):
        rows[name]["x_bare_python"] = round(rows[name]["median_s"] / base, 2)
        rows[name]["heavy_modules"] = heavy_modules_loaded(COMMANDS[name][3:])
    print(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
