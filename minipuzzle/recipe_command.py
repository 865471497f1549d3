"""`minipuzzle run RECIPE`: a whole run from one YAML file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from minipuzzle.cli_options import settings_command
from minipuzzle.hardware import HardwareOptions, resolve
from minipuzzle.recipe import load_recipe, plan_run
from minipuzzle.runner import run
from minipuzzle.units import gib

# Imports inside functions here keep torch and transformers unloaded until a function needs them, so `--help`
# and the offline commands (dry runs, info, search) start fast.


def register(app: typer.Typer) -> None:
    @app.command("run")
    @settings_command(HardwareOptions, into="hardware")
    def run_recipe(
        recipe: Annotated[
            str, typer.Argument(help="Recipe file, or a shipped recipe's name (demo, nemotron-h-56b-to-47b).")
        ],
        output: Annotated[Path | None, typer.Option("--output", "-o", help="Run folder (default: runs/NAME).")] = None,
        dry_run: Annotated[
            bool, typer.Option("--dry-run", help="Validate and print the plan offline; run nothing.")
        ] = False,
        as_json: Annotated[bool, typer.Option("--json", help="With --dry-run: print the plan as JSON.")] = False,
        hardware: dict | None = None,
    ) -> None:
        """Run score -> prune -> distill -> eval -> report as a recipe says; rerun the same command to resume.

        Every stage is planned against the hardware (the recipe's hardware section, --gpu-memory / --gpus, else
        this machine) before anything runs; a stage that cannot fit is refused. With --output, a dry run plans
        distillation and eval for the student the run folder's prune stage wrote, as the resumed run will.

        Example: minipuzzle run demo            (the demo teacher, end to end on CPU in minutes)
        Example: minipuzzle run recipes/nemotron-h-56b-to-47b.yaml --dry-run
        """


        rec = load_recipe(recipe)
        hw = resolve(rec.hardware, hardware)
        con = Console()
        if dry_run:
            plan = plan_run(rec, hw, student=_pruned_student(output))
            if as_json:
                print(json.dumps(plan, indent=2, default=str))
                return
            _print_plan(con, rec, plan)
            return

        run_dir = output or Path("runs") / rec.name
        report = run(rec, run_dir, log=lambda m: con.print(m, markup=False, highlight=False), hardware=hw)
        con.print(f"[bold green]report:[/] {report}")


def _pruned_student(run_dir: Path | None):
    """The layout prune wrote into `run_dir` (None before it has run, or without a run folder)."""
    if run_dir is None or not (run_dir / "prune" / "config.json").is_file():
        return None
    from minipuzzle.checkpoint.read import Checkpoint

    return Checkpoint(run_dir / "prune").layout


def _print_plan(con, rec, plan: dict[str, Any]) -> None:

    con.print(f"[bold]{rec.name}[/]: {rec.description}")
    con.print(f"model {plan['model']} ({plan['source_params'] / 1e9:.3f}B parameters)")
    t = Table(title=f"stages (GPU-hours assume {plan['assumption']})")
    for col in ("stage", "what", "FLOPs", "GPU-hours"):
        t.add_column(col, justify="right" if col in ("FLOPs", "GPU-hours") else "left")
    for s in plan["stages"]:
        what = ", ".join(f"{k}={v}" for k, v in s.items()
                         if k not in ("stage", "flops", "gpu_hours", "communication_gpu_hours"))  # fmt: skip
        t.add_row(s["stage"], what, f"{s['flops']:.2e}", f"{s['gpu_hours']:.2f}")
    con.print(t)
    con.print(f"total: {plan['total_gpu_hours']:.1f} GPU-hours")
    rows = {s["stage"]: s for s in plan["stages"]}
    for stage, line in plan["communication"].items():
        what = "candidate distillation" if stage == "prune" else stage
        extra = rows[stage].get("communication_gpu_hours", 0.0)
        con.print(f"{what}: {line}; communication not hidden adds {extra:.1f} GPU-hours", highlight=False, markup=False)
    if plan["communication"]:
        con.print(f"links: {plan['links']}", highlight=False, markup=False)
    _print_memory(con, plan["memory"])
    if plan["refusal"]:
        con.print(f"[bold red]a run would be refused:[/] {plan['refusal']}", highlight=False)


def _print_memory(con, memory: dict[str, Any]) -> None:
    """The memory plan as a table: one row per part, bytes per device (host: per node)."""

    from minipuzzle.memory import Geometry

    t = Table(title=f"memory per device on {memory['hardware_text']} ({gib(memory['usable_device_bytes'])} usable)")
    for col in ("stage", "launch", "process", "weights", "optim.", "activ.", "logits", "device", "host", ""):
        t.add_column(col, justify="left" if col in ("stage", "launch", "") else "right")
    for st in memory["stages"]:
        for p in st["parts"]:
            m = p["memory"]
            states = m["master_weights"] + m["optimizer_state"] + m["gradients"]
            status = "fits" if p["fits"] else "[red]does not fit[/]"
            name = p["stage"] if p["name"] == p["stage"] else f"{p['stage']}: {p['name']}"
            t.add_row(name, Geometry(**p["geometry"]).describe(), gib(m["baseline"]), gib(m["weights"]), gib(states),
                      gib(m["activations"]), gib(m["logits"]), gib(p["device_total"]),
                      gib(m["host_buffers"] + m["host_baseline"]), status)  # fmt: skip
    con.print(t)
    if memory.get("attention"):
        con.print(f"attention: {memory['attention']}", highlight=False, markup=False)
    con.print("process: what a process holds before any work (CPU: its interpreter and libraries; GPU: the CUDA "
              "context); optim.: master weights, optimizer state and gradients; device: the total per device, "
              "the process's share included; host: per node, interpreters included. "
              "JSON (--json) has every term.", highlight=False)  # fmt: skip

