"""The `minipuzzle` command line. Thin: parse arguments, call the library, render the result.

Every stage adds its commands from its own package (`register(app)` in `<stage>/command.py`). Those modules are
imported only when one of their commands runs or shows its own help: `minipuzzle --help` and `minipuzzle info`
never load torch, transformers, matplotlib or lm-eval. This file holds the app, that lazy table and `info`.
"""

from __future__ import annotations

import functools
import importlib
import json
import sys
from typing import Annotated, Any

import typer
import typer.core
import typer.main
from rich.console import Console
from rich.table import Table

from minipuzzle.arch import LayoutReport
from minipuzzle.checkpoint.resolve import describe_model
from minipuzzle.errors import LaunchError, UserError
from minipuzzle.units import gib, parse_context

# Command -> (module whose `register(app)` declares it, the one line `minipuzzle --help` shows for it). The line
# is the first paragraph of the command's docstring; tests/test_cli.py checks both columns against the modules.
LAZY_COMMANDS = {
    "cut": (
        "minipuzzle.cut_command",
        "Cut a checkpoint to a plan, streaming tensor by tensor (peak memory ~ one output shard and one tensor).",
    ),
    "score": (
        "minipuzzle.score.command",
        "Score the importance of every layer, FFN channel, Mamba head and head channel, attention head and hidden "
        "channel of a Nemotron-H checkpoint. Rerunning an interrupted run resumes it.",
    ),
    "search": (
        "minipuzzle.search.command",
        "Find the layout with the least predicted damage under a budget and write it as a layout file.",
    ),
    "prune": (
        "minipuzzle.prune.command",
        "Prune a Nemotron-H checkpoint to a budget: score, search, rank candidates, cut the best.",
    ),
    "distill": (
        "minipuzzle.distill.command",
        "Distil a teacher into a (pruned) student on the teacher's logits: forward KL at T=1 by default.",
    ),
    "quantize": (
        "minipuzzle.quantize.command",
        "Quantize a checkpoint to FP8 or NVFP4 with NVIDIA Model Optimizer and export it for vLLM / TensorRT-LLM.",
    ),
    "eval": (
        "minipuzzle.evaluate.command",
        "Evaluate a model (and its teacher): held-out perplexity, KL and agreement, lm-eval tasks, speed, memory.",
    ),
    "report": (
        "minipuzzle.report.command",
        "One self-contained HTML page for a whole run: importance, chosen layout, distillation curve, evaluation.",
    ),
    "run": (
        "minipuzzle.recipe_command",
        "Run score -> prune -> distill -> eval -> report as a recipe says; rerun the same command to resume.",
    ),
}


@functools.cache
def commands_of(module: str) -> dict[str, Any]:
    """The click commands that `module.register(app)` declares, by name (imports the module)."""
    sub = typer.Typer(pretty_exceptions_enable=False, add_completion=False)
    importlib.import_module(module).register(sub)
    return dict(typer.main.get_group(sub).commands)


class _LazyCommand(typer.core.TyperCommand):
    """Stands in for a command in the root help; its module is imported when the command is parsed."""

    def __init__(self, name: str, module: str, short_help: str) -> None:
        super().__init__(name=name, callback=None, help=short_help, short_help=short_help)
        self.module = module

    def make_context(self, info_name, args, parent=None, **extra):
        # The group invokes `ctx.command`, so handing back the real command's context hands over the whole run.
        return commands_of(self.module)[self.name].make_context(info_name, args, parent=parent, **extra)


class _LazyGroup(typer.core.TyperGroup):
    def list_commands(self, ctx) -> list[str]:
        return [*super().list_commands(ctx), *(n for n in LAZY_COMMANDS if n not in self.commands)]

    def get_command(self, ctx, name: str):
        if name in self.commands or name not in LAZY_COMMANDS:
            return super().get_command(ctx, name)
        module, short_help = LAZY_COMMANDS[name]
        return _LazyCommand(name, module, short_help)


app = typer.Typer(
    name="minipuzzle",
    cls=_LazyGroup,
    help="Prune, distil and evaluate Nemotron-H hybrid Mamba-Transformer models (MiniPuzzle on HF checkpoints).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


@app.callback()
def _root(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Show full tracebacks on errors.")] = False,
) -> None:
    """Prune, distil and evaluate Nemotron-H models.

    Example: minipuzzle info 56b --precision fp4 --context 1M; minipuzzle info nano3-30b-a3b --json
    """


@app.command()
def info(
    model: Annotated[
        str,
        typer.Argument(
            help="Preset (8b, 56b, 47b, 4b, nano-12b-v2, nano-9b-v2, nano3-30b-a3b, super3-120b-a12b), folder or hub id."
        ),
    ],
    precision: Annotated[str, typer.Option(help="Weight precision: bf16, fp8 or fp4 (NVFP4, 4.5 bits).")] = "bf16",
    kv_precision: Annotated[str | None, typer.Option(help="KV-cache precision (default: the weights').")] = None,
    context: Annotated[str, typer.Option(help="Context length in tokens (8192, 128k, 1M).")] = "8192",
    batch: Annotated[int, typer.Option(help="Sequences held at once.")] = 1,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Architecture, parameter count (and active count of MoE models), inference memory and FLOPs of a model.

    Example: minipuzzle info 56b --precision fp4 --context 1M; minipuzzle info nano3-30b-a3b --json
    """


    if batch < 1:
        raise UserError(f"--batch must be at least 1, got {batch}")
    ctx = parse_context(context)
    name, layout = describe_model(model)
    rep = LayoutReport(layout, precision, kv_precision, ctx, batch, name).as_dict()
    if as_json:
        print(json.dumps(rep, indent=2))
        return
    con = Console()
    con.print(f"[bold]{name}[/]  {rep['params'] / 1e9:.3f}B parameters ({rep['params']:,})")
    if "active_params" in rep:
        con.print(f"active per token: {rep['active_params'] / 1e9:.3f}B parameters ({rep['active_params']:,})")
    lc = rep["layers"]
    moe = f", {lc['moe']} MoE" if "moe" in lc else ""
    con.print(f"layers: {rep['num_layers']} ({lc['mamba']} Mamba, {lc['mlp']} MLP, {lc['attention']} attention{moe})")
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


def main() -> None:
    verbose = "--verbose" in sys.argv or "-v" in sys.argv
    try:
        app()
    except (UserError, LaunchError) as e:
        if verbose:
            raise
        msg = " ".join(str(e).split())
        print(f"error: {msg}", file=sys.stderr)
        sys.exit(2 if isinstance(e, UserError) else 1)


if __name__ == "__main__":
    main()
