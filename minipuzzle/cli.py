"""The `minipuzzle` command line. Thin: parse arguments, call the library, render the result.

Every stage adds its command from its own package (`register(app)` in `<stage>/command.py`), so this file only
holds the app, the shared argument parsing and `info`.
"""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from minipuzzle.errors import UserError

app = typer.Typer(
    name="minipuzzle",
    help="Prune, distil and evaluate Nemotron-H hybrid Mamba-Transformer models (MiniPuzzle on HF checkpoints).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

# Stage packages that contribute commands; each module defines `register(app)`.
COMMAND_MODULES = (
    "minipuzzle.surgery_command",
    "minipuzzle.importance.command",
    "minipuzzle.search.command",
    "minipuzzle.distill.command",
    "minipuzzle.evaluate.command",
    "minipuzzle.recipe_command",
)


@app.callback()
def _root(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Show full tracebacks on errors.")] = False,
) -> None:
    """Prune, distil and evaluate Nemotron-H models.

    Example: minipuzzle info 56b --precision fp4 --context 1M
    """


def parse_count(text: str) -> int:
    """'1M' -> 1048576, '8k' -> 8192, '4096' -> 4096 (binary suffixes: contexts are powers of two)."""
    s = str(text).strip().lower()
    mult = {"k": 2**10, "m": 2**20, "g": 2**30}
    try:
        if s and s[-1] in mult:
            return int(float(s[:-1]) * mult[s[-1]])
        return int(float(s))
    except ValueError:
        raise UserError(f"cannot read {text!r} as a count (examples: 8192, 8k, 1M)") from None


def describe_model(model: str, model_path: str | None = None):
    """(name, Layout) for a preset, a local checkpoint folder or a cached hub id, without loading weights."""
    from minipuzzle.arch import Layout, load_config
    from minipuzzle.checkpoint import resolve_checkpoint
    from minipuzzle.presets import get_preset, is_preset

    if model_path is None and is_preset(model) and not (Path(model) / "config.json").is_file():
        p = get_preset(model)
        return p.name, p.layout
    path = resolve_checkpoint(model, model_path)
    if not path.exists():
        raise UserError(f"checkpoint not found: {path}")
    return str(model), Layout.from_config(load_config(path))


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


@app.command()
def info(
    model: Annotated[str, typer.Argument(help="Preset (8b, 56b, 47b, 4b, nano-12b-v2, nano-9b-v2), folder or hub id.")],
    precision: Annotated[str, typer.Option(help="Weight precision: bf16, fp8 or fp4 (NVFP4, 4.5 bits).")] = "bf16",
    kv_precision: Annotated[str | None, typer.Option(help="KV-cache precision (default: the weights').")] = None,
    context: Annotated[str, typer.Option(help="Context length in tokens (8192, 128k, 1M).")] = "8192",
    batch: Annotated[int, typer.Option(help="Sequences held at once.")] = 1,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Architecture, exact parameter count, inference memory and FLOPs of a Nemotron-H model.

    Example: minipuzzle info 56b --precision fp4 --context 1M
    """
    from minipuzzle.arch import LayoutReport

    if batch < 1:
        raise UserError(f"--batch must be at least 1, got {batch}")
    ctx = parse_count(context)
    if ctx < 1:
        raise UserError(f"--context must be at least 1, got {context}")
    name, layout = describe_model(model)
    rep = LayoutReport(layout, precision, kv_precision, ctx, batch, name).as_dict()
    if as_json:
        print(json.dumps(rep, indent=2))
        return
    con = Console()
    con.print(f"[bold]{name}[/]  {rep['params'] / 1e9:.3f}B parameters ({rep['params']:,})")
    lc = rep["layers"]
    con.print(f"layers: {rep['num_layers']} ({lc['mamba']} Mamba, {lc['mlp']} MLP, {lc['attention']} attention)")
    con.print(f"pattern: {rep['pattern']}")
    con.print("widths: " + ", ".join(f"{k} {v}" for k, v in rep["widths"].items()))
    t = Table(title=f"memory at {precision} weights, {rep['kv_precision']} KV, context {ctx:,}, batch {batch}")
    t.add_column("part")
    t.add_column("size", justify="right")
    for k, v in rep["memory_bytes"].items():
        label = "activations (estimate, not in total)" if k == "activations" else k
        t.add_row(label, gib(v), style="bold" if k == "total" else None)
    con.print(t)
    f = rep["flops_per_token"]
    con.print(f"FLOPs per token: prefill {f['prefill']:.3e}, decode {f['decode']:.3e} (at context {ctx:,})")


def _register_commands() -> None:
    for mod in COMMAND_MODULES:
        try:
            module = importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name == mod or mod.startswith(str(e.name) + "."):
                continue  # that stage is not part of this build
            raise
        module.register(app)


_register_commands()


def main() -> None:
    verbose = "--verbose" in sys.argv or "-v" in sys.argv
    try:
        app()
    except UserError as e:
        if verbose:
            raise
        msg = " ".join(str(e).split())
        print(f"error: {msg}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
