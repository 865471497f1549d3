"""No import cycles in minipuzzle/: module A importing B while B imports A, directly or through others. Imports inside
functions count, and so do the package `__init__` files Python runs before a submodule."""

import ast
import collections
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "minipuzzle"


def _modules() -> dict[str, Path]:
    out = {}
    for p in PKG.rglob("*.py"):
        name = ".".join(p.relative_to(PKG.parent).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = p
    return out


def _graph(mods: dict[str, Path]) -> dict[str, set[str]]:
    g = collections.defaultdict(set)
    for name, p in mods.items():
        pkg = name if p.name == "__init__.py" else name.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = pkg.split(".")[: len(pkg.split(".")) - node.level + 1] if node.level else []
                mod = ".".join(base + ([node.module] if node.module else [])) if node.level else node.module or ""
                targets = [mod] + [f"{mod}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            for t in targets:
                parts = t.split(".")
                for k in range(2, len(parts) + 1):  # a.b.c runs a.b's __init__ first
                    q = ".".join(parts[:k])
                    if q in mods and q != name and not name.startswith(q + "."):
                        g[name].add(q)
    return g


def _cycle(g: dict[str, set[str]], start: str) -> list[str] | None:
    """A path start -> ... -> start, by depth-first search (None when there is none)."""
    stack, seen = [(start, [start])], set()
    while stack:
        node, path = stack.pop()
        for nxt in sorted(g[node]):
            if nxt == start:
                return [*path, start]
            if nxt not in seen:
                seen.add(nxt)
                stack.append((nxt, [*path, nxt]))
    return None


def test_no_module_imports_itself_through_others():
    mods = _modules()
    assert "minipuzzle.memory" in mods and "minipuzzle.prune.stage" in mods  # the walk found the packages
    g = _graph(mods)
    cycles = [c for c in (_cycle(g, m) for m in sorted(mods)) if c]
    assert not cycles, " | ".join(" -> ".join(c) for c in cycles[:3])


def test_the_check_finds_a_planted_cycle():
    g = collections.defaultdict(set, {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}})
    assert _cycle(g, "a") == ["a", "b", "c", "a"] and _cycle(g, "d") is None
