"""Print the oldest and the newest transformers release that pyproject.toml's range admits, one per line.

CI installs both and runs the loading, cut and recurrence tests on each, so a release that breaks Nemotron-H
(as 5.6-5.14.1 and 5.25.0 did) shows up the day it is published instead of on a user's fresh install.
"""

import re
import subprocess
import sys
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import Version


def transformers_requirement(pyproject: Path) -> Requirement:
    """The `transformers...` entry of the project's dependencies."""
    for line in pyproject.read_text().splitlines():
        m = re.match(r'\s*"(transformers[^"]*)"', line)
        if m:
            return Requirement(m.group(1))
    raise SystemExit(f"no transformers dependency in {pyproject}")


def released_versions() -> list[Version]:
    """Every release the package index lists (pre-releases left out)."""
    out = subprocess.run(
        [sys.executable, "-m", "pip", "index", "versions", "transformers"], capture_output=True, text=True, check=True
    ).stdout
    listed = re.search(r"Available versions:\s*(.+)", out)
    if not listed:
        raise SystemExit(f"pip index versions printed no versions:\n{out}")
    return [v for v in map(Version, listed.group(1).split(", ")) if not v.is_prerelease]


def main() -> None:
    req = transformers_requirement(Path(__file__).resolve().parents[1] / "pyproject.toml")
    admitted = sorted(v for v in released_versions() if req.specifier.contains(v))
    if not admitted:
        raise SystemExit(f"no released transformers satisfies {req}")
    print(admitted[0])
    print(admitted[-1])


if __name__ == "__main__":
    main()
