"""`minipuzzle eval`: a thin wrapper over `runner.evaluate`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from minipuzzle.cli_options import settings_command
from minipuzzle.hardware import LINK_OPTIONS, HardwareOptions, resolve
from minipuzzle.settings import DataOptions, DeviceOptions, EvalSettings
from minipuzzle.units import parse_context

# Imports inside functions here keep torch and transformers unloaded until a function needs them, so `--help`
# and the offline commands (dry runs, info, search) start fast.


# --tasks takes the shots inline (mmlu:5), so the list and the few-shot table are not options; --limit is read as
# a float so that a fraction parses.
@settings_command(DataOptions, into="text", helps={"data": "Held-out text: .txt/.jsonl/.parquet file, folder or "
                                                         "datasets name."})  # fmt: skip
@settings_command(DeviceOptions, into="compute")
@settings_command(HardwareOptions, into="hardware", exclude=LINK_OPTIONS)
@settings_command(EvalSettings, exclude=("tasks", "num_fewshot"), types_={"limit": float | None})
def _eval_command(
    model: Annotated[str, typer.Argument(help="Checkpoint folder (or cached hub id / preset) to evaluate.")],
    output: Annotated[
        Path, typer.Option("--output", "-o", help="Report folder to write (report.json, report.md, PNGs).")
    ],
    teacher: Annotated[str | None, typer.Option(help="Teacher checkpoint: KL, agreement, side-by-side tables.")] = None,
    text: dict | None = None,
    tasks: Annotated[
        str | None, typer.Option(help="lm-eval tasks, comma-separated: names (mmlu:5), task .yaml files or folders.")
    ] = None,
    compute: dict | None = None,
    hardware: dict | None = None,
    precision: Annotated[
        str, typer.Option(help="Precision for the architecture memory figures: bf16, fp8, fp4.")
    ] = "bf16",
    context: Annotated[
        str, typer.Option(help="Context for the architecture memory and FLOPs figures (8k, 1M).")
    ] = "8192",
    overwrite: Annotated[bool, typer.Option(help="Replace an existing report folder.")] = False,
    settings: dict | None = None,
) -> None:
    """Evaluate a model (and its teacher): held-out perplexity, KL and agreement, lm-eval tasks, speed, memory.

    Refused before it starts when its memory plan does not fit (this machine, or --gpu-memory / --gpus).

    Example: minipuzzle eval runs/47b/distill --teacher runs/56b --data val.jsonl --tasks mmlu:5,arc_challenge:25 --limit 200 -o runs/47b/eval
    """

    from minipuzzle.evaluate.report import render_markdown
    from minipuzzle.evaluate.runner import evaluate

    st, src, dev = (
        EvalSettings(tasks=[tasks] if tasks else [], **settings),
        DataOptions(**text),
        DeviceOptions(**compute),
    )
    _check_memory(model, teacher, st, src.data is not None, dev, hardware)
    # Eval places its models for the hardware it was checked against (--gpu-memory may make it offload them).
    rep = evaluate(model, output, st, teacher_path=teacher, data=src.data, split=src.split, column=src.text_column,
                   streaming=src.streaming, device=dev.device, dtype=dev.dtype, precision=precision,
                   context=parse_context(context), overwrite=overwrite, progress=True,
                   hardware=resolve(None, hardware))  # fmt: skip
    con = Console()
    con.print(render_markdown(rep), markup=False, highlight=False)
    con.print(f"[bold]report written to {output}[/] ({', '.join(['report.json', 'report.md', *rep['plots']])})")


def _check_memory(model: str, teacher: str | None, st: EvalSettings, held_out: bool, dev: DeviceOptions,
                  hardware: dict | None) -> None:  # fmt: skip
    """Refuse (one line) an evaluation whose memory plan does not fit the device it would run on."""
    from minipuzzle.memory import check, eval_stage, for_device, model_facts

    hw = for_device(resolve(None, hardware), dev.device)
    if hw is None:  # told --device cpu on a GPU machine whose RAM is unknown
        return
    layout, stored = model_facts(model)
    t_layout = model_facts(teacher)[0] if teacher is not None else None
    check(hw, eval_stage(layout, t_layout, hw, st, held_out=held_out, dtype=dev.dtype, stored_bytes=stored))


def register(app: typer.Typer) -> None:
    app.command("eval")(_eval_command)
