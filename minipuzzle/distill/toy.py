"""A tiny teacher and a lossy depth-pruned student on disk, for distillation tests, benchmarks and demos.

The student is the teacher with some layers removed (the kept layers' weights copied, renumbered), the same
thing the cut produces for a depth-only plan, so its logits are close to the teacher's but clearly off.
"""

from __future__ import annotations

from pathlib import Path

from minipuzzle.arch import Layout
from minipuzzle.cut import Plan, cut_model
from minipuzzle.testing import random_model, save_model, stdlib_text_files, tiny_layout


def drop_layers(teacher, keep: list[int]):
    """A new model holding the teacher's layers `keep` (in order): a depth-only cut plan."""

    return cut_model(teacher, Plan(layers=list(keep)))


def make_pair(
    root: str | Path, tokenizer, *, layout: Layout | None = None, drop: tuple[int, ...] = (3, 6), seed: int = 0
) -> tuple[Path, Path, Path]:
    """Write teacher/, student/ (teacher minus layers `drop`) and data.txt (stdlib source) under root."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    layout = layout or tiny_layout()
    teacher = random_model(layout, seed=seed)
    keep = [i for i in range(layout.num_layers) if i not in drop]
    student = drop_layers(teacher, keep)
    t = save_model(teacher, root / "teacher", tokenizer=tokenizer, overwrite=True)
    s = save_model(student, root / "student", tokenizer=tokenizer, overwrite=True)
    data = root / "data.txt"
    data.write_text("\n\n".join(f.read_text() for f in stdlib_text_files(6)))
    return t, s, data
