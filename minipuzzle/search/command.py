"""CLI: `minipuzzle search` (scores -> layout file) and `minipuzzle prune` (score + search + rank + cut)."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from minipuzzle.errors import UserError

_TARGET = "Parameter budget: a preset (47b), a count (6.5e9, 740972) or a fraction of the source (0.8, 80%)."
_MEMORY = "Inference-memory budget (31.7GiB), at --precision, --context and --batch."


def _steps(text: str | None) -> dict[str, int]:
    """'ffn=1024,hidden=256' -> {'ffn': 1024, 'hidden': 256}."""
    out = {}
    for part in (text or "").split(","):
        if not part.strip():
            continue
        key, _, val = part.partition("=")
        try:
            out[key.strip()] = int(val)
        except ValueError:
            raise UserError(f"cannot read --step {part!r}: use AXIS=N, e.g. ffn=1024") from None
    return out


def _samples(samples: int | None, depth: int | None, width: int | None) -> tuple[int, int]:
    """--samples sets both counts; --depth-samples / --width-samples, when given, win over it."""
    for name, v in (("--samples", samples), ("--depth-samples", depth), ("--width-samples", width)):
        if v is not None and v < 1:
            raise UserError(f"{name} must be at least 1, got {v}")
    return (
        depth if depth is not None else samples if samples is not None else 128,
        width if width is not None else samples if samples is not None else 1024,
    )


def _settings(target, memory, precision, context, batch, kv_precision, axes, step, min_width, min_layers, source,
              **kw):  # fmt: skip
    from minipuzzle.search.budget import make_budget
    from minipuzzle.search.pipeline import PruneSettings
    from minipuzzle.search.space import parse_axes
    from minipuzzle.units import parse_context

    axes_t = parse_axes(axes)
    budget = make_budget(source, target, memory, precision, parse_context(context), batch, kv_precision)
    return PruneSettings(budget=budget, axes=axes_t, steps=_steps(step), min_width=min_width,
                         min_layers=min_layers, **kw)  # fmt: skip


Target = Annotated[str | None, typer.Option("--target", help=_TARGET)]
Memory = Annotated[str | None, typer.Option("--memory", help=_MEMORY)]
Precision = Annotated[str, typer.Option(help="Weight precision for --memory: bf16, fp8, fp4 (NVFP4).")]
Context = Annotated[str, typer.Option(help="Context length for --memory (8192, 128k, 1M).")]
Axes = Annotated[str, typer.Option(help="Axes: depth,ffn,mamba_heads,mamba_head_dim,attn_heads,hidden.")]
Step = Annotated[str | None, typer.Option(help="Width steps, e.g. ffn=1024,hidden=256 (default: scale with model).")]
Band = Annotated[
    float,
    typer.Option(
        help="Candidates: every layout that fits and uses at least (1 - BAND) of a limit (of either, with both), "
        "plus layouts that cannot grow; ranked by predicted damage. 0: only layouts that cannot grow."
    ),
]


def register(app: typer.Typer) -> None:
    @app.command("search")
    def search_cmd(
        model: Annotated[str, typer.Argument(help="Preset, checkpoint folder or hub id (only its config is read).")],
        scores: Annotated[str, typer.Option("--scores", help="Folder written by `minipuzzle score`.")],
        output: Annotated[str, typer.Option("-o", "--output", help="Layout file to write (YAML).")],
        target: Target = None,
        memory: Memory = None,
        precision: Precision = "bf16",
        context: Context = "8192",
        batch: Annotated[int, typer.Option(help="Sequences held at once for --memory.")] = 1,
        kv_precision: Annotated[str | None, typer.Option(help="KV-cache precision (default: weights').")] = None,
        axes: Axes = "depth,ffn",
        step: Step = None,
        min_width: Annotated[float, typer.Option(help="Smallest width searched, fraction of the source.")] = 0.5,
        min_layers: Annotated[float, typer.Option(help="Fewest layers of each kind kept, fraction.")] = 0.5,
        candidates: Annotated[int, typer.Option(help="How many best layouts to list.")] = 8,
        band: Band = 0.05,
        method: Annotated[str, typer.Option(help="auto, enumerate or mip.")] = "auto",
    ) -> None:
        """Find the layout with the least predicted damage under a budget and write it as a layout file.

        Example: minipuzzle search 56b --scores scores/ --memory 31.7GiB --precision fp4 --context 1M -o layout.yaml
        """
        from minipuzzle.importance.scores import Scores
        from minipuzzle.presets import describe_model
        from minipuzzle.search.pipeline import run_search
        from minipuzzle.search.plan import candidate_plan, layout_document, write_layout_yaml

        _, layout = describe_model(model)
        st = _settings(target, memory, precision, context, batch, kv_precision, axes, step, min_width, min_layers,
                       layout, candidates=candidates, band=band, method=method)  # fmt: skip
        sc = Scores.load(scores)
        space, dmodel, cands = run_search(layout, sc, st)
        plan = candidate_plan(cands[0], dmodel, sc)
        doc = layout_document(plan, layout, st.budget, cands[0], {"candidates": [c.to_dict() for c in cands]})
        write_layout_yaml(doc, output)
        res = doc["result"]
        print(f"{res['params']:,} parameters, {res['layers']}, widths {res['widths']} -> {output}")

    @app.command("prune")
    def prune_cmd(
        model: Annotated[str, typer.Argument(help="Preset (56b), checkpoint folder or hub id.")],
        output: Annotated[str | None, typer.Option("-o", "--output", help="Output checkpoint folder.")] = None,
        target: Target = None,
        memory: Memory = None,
        precision: Precision = "bf16",
        context: Context = "8192",
        batch: Annotated[int, typer.Option(help="Sequences held at once for --memory.")] = 1,
        kv_precision: Annotated[str | None, typer.Option(help="KV-cache precision (default: weights').")] = None,
        axes: Axes = "depth,ffn",
        step: Step = None,
        min_width: Annotated[float, typer.Option(help="Smallest width searched, fraction of the source.")] = 0.5,
        min_layers: Annotated[float, typer.Option(help="Fewest layers of each kind kept, fraction.")] = 0.5,
        data: Annotated[str | None, typer.Option(help="Calibration text: file, folder or dataset.")] = None,
        held_out_data: Annotated[
            str | None,
            typer.Option(help="Text to rank candidates on (default: the first windows of --data, never scored on)."),
        ] = None,
        scores: Annotated[str | None, typer.Option(help="Reuse scores from `minipuzzle score`.")] = None,
        candidates: Annotated[int, typer.Option(help="Best candidates by predicted damage measured for real.")] = 4,
        band: Band = 0.05,
        seq_len: Annotated[int, typer.Option(help="Tokens per calibration window.")] = 512,
        samples: Annotated[
            int | None, typer.Option(help="Windows for both depth and width scores (the two below win if given).")
        ] = None,
        depth_samples: Annotated[int | None, typer.Option(help="Windows for depth scores [default: 128].")] = None,
        width_samples: Annotated[int | None, typer.Option(help="Windows for width scores [default: 1024].")] = None,
        held_out: Annotated[int, typer.Option(help="Held-out windows for ranking.")] = 64,
        candidate_distill_steps: Annotated[
            int, typer.Option(help="Distil every candidate this many steps before choosing (0: off).")
        ] = 0,
        candidate_distill_lr: Annotated[float, typer.Option(help="LR of the candidates' short distillation.")] = 1e-4,
        stream: Annotated[bool, typer.Option(help="Stream layers from the shards in every stage.")] = False,
        device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
        model_path: Annotated[str | None, typer.Option(help="Local weights for a preset or hub id.")] = None,
        dry_run: Annotated[bool, typer.Option(help="Plan offline: space, feasible layouts, scoring cost.")] = False,
        overwrite: Annotated[bool, typer.Option(help="Replace an existing output folder.")] = False,
        as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
        norm_compensation: Annotated[
            bool,
            typer.Option(
                "--norm-compensation/--no-norm-compensation",
                help="Scale RMSNorm weights by sqrt(old/new width) where a norm loses input channels.",
            ),
        ] = True,
    ) -> None:
        """Prune a Nemotron-H checkpoint to a budget: score, search, rank candidates, cut the best.

        Example: minipuzzle prune 56b --memory 31.7GiB --precision fp4 --context 1M --data calib/ -o nemotron-47b
        """
        from minipuzzle.presets import describe_model
        from minipuzzle.search import pipeline

        depth_samples, width_samples = _samples(samples, depth_samples, width_samples)
        if dry_run:
            _, layout = describe_model(model, model_path)
        else:
            from minipuzzle.checkpoint import Checkpoint, check_output_dir, resolve_checkpoint

            if output is None:
                raise UserError("prune needs -o/--output DIR")
            check_output_dir(output, overwrite)
            layout = Checkpoint(resolve_checkpoint(model, model_path)).layout
        st = _settings(target, memory, precision, context, batch, kv_precision, axes, step, min_width, min_layers,
                       layout, candidates=candidates, band=band, seq_len=seq_len, depth_samples=depth_samples,
                       width_samples=width_samples, held_out_samples=held_out, stream=stream,
                       device=device, candidate_distill_steps=candidate_distill_steps,
                       candidate_distill_lr=candidate_distill_lr, norm_compensation=norm_compensation)  # fmt: skip
        if candidate_distill_steps < 0:
            raise UserError(f"--candidate-distill-steps must be >= 0, got {candidate_distill_steps}")
        if dry_run:
            plan = pipeline.dry_run(layout, st)
            if as_json:
                print(json.dumps(plan, indent=2))
                return
            sp, c = plan["space"], plan["cost"]
            print(f"{model}: {plan['source']['params']:,} parameters; budget {st.budget.describe()}")
            print(f"search space: axes {','.join(sp['axes'])}, {sp['size']:,} layouts; widths {sp['widths']}")
            print(f"layouts within the budget: {plan['feasible_layouts']:,}")
            print(
                f"candidate pool (within {plan['band']:.0%} below the budget, or unable to grow): "
                f"{plan['pool_layouts']:,} layouts; the best {candidates} by predicted damage are measured"
            )
            print(
                f"scoring + ranking: {c['flops_total']:.3e} FLOPs ({c['depth_passes']:.0f} depth passes), "
                f"~{c['gpu_hours_h100']:.2f} H100-hours at {c['assumed_flops_per_second'] / 1e12:.0f} TFLOP/s"
            )
            return
        rep = pipeline.prune(model, output, st, data, held_out_data=held_out_data, model_path=model_path,
                             scores_dir=scores, overwrite=overwrite)  # fmt: skip
        res = rep["chosen"]["result"]
        if as_json:
            print(json.dumps(rep["chosen"]["result"], indent=2))
        else:
            print(f"{res['params']:,} parameters, layers {res['layers']}, widths {res['widths']} -> {output}")
