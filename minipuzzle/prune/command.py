"""CLI: `minipuzzle prune` (score + search + rank candidates + cut, in one go) over `minipuzzle.prune.stage`."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from minipuzzle.artifacts import PruneReport
from minipuzzle.checkpoint.resolve import describe_model
from minipuzzle.cli_options import settings_command
from minipuzzle.errors import UserError
from minipuzzle.evaluate.tables import candidate_ranks_table
from minipuzzle.hardware import HardwareOptions, resolve
from minipuzzle.search import stage
from minipuzzle.search.command import AS_TEXT
from minipuzzle.settings import DataOptions, PruneSettings

# Imports inside functions load torch (the memory plan, the prune stage, tables): only when the command runs, so
# that `minipuzzle --help` stays fast.


def _samples(settings: dict, samples: int | None) -> dict:
    """--samples sets both counts; --depth-samples / --width-samples, when given, win over it; unset counts take
    the model's defaults."""
    if samples is not None and samples < 1:
        raise UserError(f"--samples must be at least 1, got {samples}")
    for key in ("depth_samples", "width_samples"):
        if settings[key] is None:
            settings[key] = samples
    return {k: v for k, v in settings.items() if v is not None}


# The two scoring counts default to "not given" so that --samples can set both (`_samples`); unset, they are the
# model's.
@settings_command(DataOptions, into="text", helps={"data": "Calibration text: file, folder or dataset."})
@settings_command(HardwareOptions, into="hardware")
@settings_command(PruneSettings, aliases=AS_TEXT["aliases"],
                  types_=AS_TEXT["types_"] | {"depth_samples": int | None, "width_samples": int | None},
                  defaults={"depth_samples": None, "width_samples": None})  # fmt: skip
def prune_cmd(
    model: Annotated[str, typer.Argument(help="Preset (56b), checkpoint folder or hub id.")],
    output: Annotated[str | None, typer.Option("-o", "--output", help="Output checkpoint folder.")] = None,
    text: dict | None = None,
    held_out_data: Annotated[
        str | None,
        typer.Option(help="Text to rank candidates on (default: the first windows of --data, never scored on)."),
    ] = None,
    scores: Annotated[str | None, typer.Option(help="Reuse scores from `minipuzzle score`.")] = None,
    samples: Annotated[
        int | None, typer.Option(help="Windows for both depth and width scores (--depth-samples, --width-samples win).")
    ] = None,
    model_path: Annotated[str | None, typer.Option(help="Local weights for a preset or hub id.")] = None,
    dry_run: Annotated[bool, typer.Option(help="Plan offline: space, feasible layouts, scoring cost.")] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output folder.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
    hardware: dict | None = None,
    settings: dict | None = None,
) -> None:
    """Prune a Nemotron-H checkpoint to a budget: score, search, rank candidates, cut the best.

    Refused before it starts when its memory plan does not fit (this machine, or --gpu-memory / --gpus).

    Example: minipuzzle prune 56b --memory 31.7GiB --precision fp4 --context 1M --data calib/ -o nemotron-47b
    """
    st = PruneSettings(**_samples(settings, samples))
    if dry_run:
        layout = describe_model(model, model_path)[1]
        _print_dry_run(model, stage.dry_run(layout, st), st.budget_for(layout), st, as_json)
        return
    from minipuzzle.memory import check
    from minipuzzle.prune import stage as prune_stage
    from minipuzzle.prune.context import PruneRequest, open_context

    if output is None:
        raise UserError("prune needs -o/--output DIR")
    src = DataOptions(**text)
    request = PruneRequest(model, output, st, src.data, held_out_data=held_out_data, split=src.split,
                           column=src.text_column, streaming=src.streaming, model_path=model_path,
                           scores_dir=scores, overwrite=overwrite, hardware=resolve(None, hardware))  # fmt: skip
    ctx = open_context(request)
    check(ctx.hardware, ctx.memory)  # the plan scoring, ranking, candidate distillation and the cut then run
    rep = prune_stage.run(ctx)
    res = rep["chosen"]["result"]
    if as_json:
        print(json.dumps(res, indent=2))
    else:
        _print_candidates(rep)
        print(f"{res['params']:,} parameters, layers {res['layers']}, widths {res['widths']} -> {output}")


def _print_candidates(rep: dict) -> None:
    """The measured candidates, best measured first, with their predicted rank and why they were measured."""

    report = PruneReport.model_validate(rep)
    head, rows = candidate_ranks_table(report.candidates, report.source_widths)
    size = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    for row in [head, *rows]:
        print("  ".join(cell.ljust(n) for cell, n in zip(row, size)).rstrip())


def _print_dry_run(model: str, plan: dict, budget, st, as_json: bool) -> None:
    if as_json:
        print(json.dumps(plan, indent=2))
        return
    sp, c, src = plan["space"], plan["cost"], plan["source"]
    active = f" ({src['active_params']:,} active)" if "active_params" in src else ""
    print(f"{model}: {src['params']:,} parameters{active}; budget {budget.describe()}")
    print(f"search space: axes {','.join(sp['axes'])}, {sp['size']:,} layouts; widths {sp['widths']}")
    print(f"layouts within the budget: {plan['feasible_layouts']:,}")
    print(
        f"candidate pool (within {plan['band']:.0%} below the budget, or unable to grow): "
        f"{plan['pool_layouts']:,} layouts"
    )
    print(
        f"measured: at most {c['candidates_measured']} layouts, none that a fitting layout dominates: the best by "
        f"predicted damage, the best of each family ({', '.join(plan['families'])}), then the next best"
    )
    tail = f" with {st.candidate_distill_steps} distillation steps" if st.candidate_distill_steps else ""
    print(
        f"scoring + ranking: {c['flops_total']:.3e} FLOPs ({c['depth_passes']:.0f} depth passes), "
        f"~{c['gpu_hours_h100']:.2f} H100-hours at {c['assumed_flops_per_second'] / 1e12:.0f} TFLOP/s; one "
        f"measurement{tail}: {c['flops_per_measurement']:.3e} FLOPs, ~{c['gpu_hours_per_measurement']:.3g} H100-hours"
    )


def register(app: typer.Typer) -> None:
    app.command("prune")(prune_cmd)
