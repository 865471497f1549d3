"""What a distillation rank holds before any work, and what importing `datasets` would add to it.

Each figure is one fresh interpreter: it imports what a torchrun rank imports (`python -m minipuzzle.cli distill`:
the CLI, the distill command, the launched entry and the loop), builds the tiny random model and runs it once (as
every model-building process does), then reports its resident memory (VmRSS) and the top-level packages loaded.
The second interpreter also imports `datasets`, which `minipuzzle.data` imports only where tables and hub
datasets are read: the difference is what a top-level import would add to every rank.

    python benchmarks/rank_imports.py          # a few seconds; prints both and their difference
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RANK = """
import json, sys
import minipuzzle.cli, minipuzzle.distill.command, minipuzzle.distill.launched, minipuzzle.distill.loop
import torch
from minipuzzle.testing import random_model
random_model()(torch.zeros(1, 8, dtype=torch.long), use_cache=False)
if sys.argv[1] == "datasets":
    import datasets
rss = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmRSS"))
print(json.dumps({"rss": rss, "packages": sorted({m.split(".")[0] for m in sys.modules})}))
"""


def measure(extra: str) -> dict:
    out = subprocess.run([sys.executable, "-c", RANK, extra], cwd=REPO, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    rank, more = measure("none"), measure("datasets")
    added = sorted(set(more["packages"]) - set(rank["packages"]))
    print(f"a distillation rank after its imports and one tiny forward: {rank['rss'] / 1e6:.0f} MB, "
          f"{len(rank['packages'])} top-level packages")
    print(f"the same with `import datasets`: {more['rss'] / 1e6:.0f} MB (+{(more['rss'] - rank['rss']) / 1e6:.0f} MB; "
          f"adds {', '.join(added)})")


if __name__ == "__main__":
    main()
