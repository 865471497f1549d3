"""`minipuzzle run RECIPE`: a whole run from one YAML file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer


def register(app: typer.Typer) -> None:
    @app.command("run")
    def run_recipe(
        recipe: Annotated[
            str, typer.Argument(help="Recipe file, or a shipped recipe's name (demo, nemotron-h-56b-to-47b).")
        ],
        output: Annotated[Path | None, typer.Option("--output", "-o", help="Run folder (default: runs/NAME).")] = None,
        dry_run: Annotated[
            bool, typer.Option("--dry-run", help="Validate and print the plan offline; run nothing.")
        ] = False,
        as_json: Annotated[bool, typer.Option("--json", help="With --dry-run: print the plan as JSON.")] = False,
    ) -> None:
        """Run score -> prune -> distill -> eval -> report as a recipe says; rerun the same command to resume.

        Example: minipuzzle run demo            (the demo teacher, end to end on CPU in minutes)
        Example: minipuzzle run recipes/nemotron-h-56b-to-47b.yaml --dry-run
        """
        from rich.console import Console
        from rich.table import Table

        from minipuzzle.recipe import load_recipe, plan_run

        rec = load_recipe(recipe)
        con = Console()
        if dry_run:
            plan = plan_run(rec)
            if as_json:
                print(json.dumps(plan, indent=2, default=str))
                return
            con.print(f"[bold]{rec.name}[/]: {rec.description}")
            con.print(f"model {plan['model']} ({plan['source_params'] / 1e9:.3f}B parameters)")
            t = Table(title=f"stages (GPU-hours assume {plan['assumption']})")
            for col in ("stage", "what", "FLOPs", "GPU-hours"):
                t.add_column(col, justify="right" if col in ("FLOPs", "GPU-hours") else "left")
            for s in plan["stages"]:
                what = ", ".join(f"{k}={v}" for k, v in s.items() if k not in ("stage", "flops", "gpu_hours"))
                t.add_row(s["stage"], what, f"{s['flops']:.2e}", f"{s['gpu_hours']:.2f}")
            con.print(t)
            con.print(f"total: {plan['total_gpu_hours']:.1f} GPU-hours")
            return
        from minipuzzle.runner import run

        run_dir = output or Path("runs") / rec.name
        report = run(rec, run_dir, log=lambda m: con.print(m, markup=False, highlight=False))
        con.print(f"[bold green]report:[/] {report}")
