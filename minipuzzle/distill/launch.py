"""How a distillation is launched: the memory plan's geometry filled into its settings, and the torchrun command
that runs it on more devices than one process has (the distill stage of a run and prune's candidate distillation
both go through here).

    planned(settings, hardware, processes) -> (settings with grad_accum / checkpointing / sharding, Part)
    launch(settings, nnodes, nproc_per_node, script, log, logs)  # a child, torchrun, or a script for every node

Local launches run this interpreter (`sys.executable -m torch.distributed.run`), never a `torchrun` found on PATH;
a multi-node script names the interpreter it was written for.
"""

from __future__ import annotations

import os
import shlex
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch.distributed

import minipuzzle.distill.launched as launched
from minipuzzle.cli_options import settings_flags
from minipuzzle.errors import UserError
from minipuzzle.hardware import Hardware
from minipuzzle.memory import distill_memory, model_facts
from minipuzzle.settings import DistillSettings


def launch_hardware(hw: Hardware, explicit_gpus: bool = False) -> Hardware:
    """Under torchrun on GPUs, the launch says how many nodes and GPUs per node there are (WORLD_SIZE,
    LOCAL_WORLD_SIZE), unless --gpus said so; elsewhere `hw`."""
    procs = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_WORLD_SIZE", str(procs)))
    if procs > 1 and hw.device == "cuda" and not explicit_gpus:
        return hw.model_copy(update={"gpus_per_node": local, "nodes": max(1, procs // local)})
    return hw


def plan_for(cfg: DistillSettings, hw: Hardware, processes: int | None):
    """The memory plan's part for `cfg` (its teacher and student read from their configs) on `processes` ranks
    (None: as many as the plan chooses)."""
    teacher, stored = model_facts(str(cfg.teacher))
    student = model_facts(str(cfg.student))[0] if cfg.student and Path(cfg.student, "config.json").is_file() else teacher
    return distill_memory(teacher, student, hw, cfg, processes=processes, stored_bytes=stored)


def planned(cfg: DistillSettings, hw: Hardware, processes: int | None = 1) -> tuple[DistillSettings, object]:
    """(`cfg` with the plan's grad_accum, activation_checkpointing and sharding where `cfg` leaves them None, the
    plan's `Part`). Raises `UserError` (one line) when the plan does not fit, the user's own choices included, or
    the batch does not split evenly over the processes (and the grad_accum given)."""
    part = plan_for(cfg, hw, processes)
    if not part.fits:  # the problem names the choices given (`memory.train_memory`)
        raise UserError(f"distill does not fit: {part.problem} ({part.geometry.describe()})")
    g = part.geometry
    fill = {"grad_accum": g.grad_accum, "activation_checkpointing": bool(g.activation_checkpointing),
            "sharding": "per_node" if g.sharding == "per_node" else "full"}  # fmt: skip
    return cfg.model_copy(update={k: v for k, v in fill.items() if getattr(cfg, k) is None}), part


def torchrun_command(settings: DistillSettings, nnodes: int, nproc_per_node: int, *, python: str | None = None,
                     log_dir: str | None = None) -> list[str]:  # fmt: skip
    """The `PYTHON -m torch.distributed.run ... -m minipuzzle.cli distill ...` command line that runs `settings` on
    every process. torchrun is run by the interpreter `python` (default: this one), not looked up on PATH, so a
    launch works whether or not its environment is activated. `log_dir`: torchrun keeps each rank's stdout and
    stderr there and also shows them (--tee)."""
    cmd = [python or sys.executable, "-m", "torch.distributed.run", f"--nnodes={nnodes}",
           f"--nproc_per_node={nproc_per_node}"]  # fmt: skip
    if nnodes > 1:
        cmd += ["--rdzv_backend=c10d", ENDPOINT]
    if log_dir is not None:
        cmd += [f"--log-dir={log_dir}", "--tee=3"]
    # max_steps already holds what a token budget asked for.
    return cmd + ["-m", "minipuzzle.cli", "distill", *settings_flags(settings, exclude=("tokens",))]


def nodes_and_procs(part, hw: Hardware) -> tuple[int, int]:
    """(nnodes, nproc_per_node) of a plan's part: its devices, whole nodes beyond one."""
    devices = part.geometry.devices
    return max(1, -(-devices // hw.gpus_per_node)), min(devices, hw.gpus_per_node)


def child_command(settings: DistillSettings) -> list[str]:
    """The `python -m minipuzzle.cli distill ...` command line that runs `settings` in one child process."""
    return [sys.executable, "-m", "minipuzzle.cli", "distill", *settings_flags(settings, exclude=("tokens",))]


def launch(cfg: DistillSettings, nnodes: int, nproc_per_node: int, script: Path, log: Callable[[str], None],
           logs: Path, then: str = "rerun this command to continue") -> None:  # fmt: skip
    """Run `cfg` in a child process (one process), under torchrun on this node, or, over several nodes, write
    `script` (to run on every node) and raise `UserError` saying so. Local launches run this interpreter, so they
    need nothing on PATH.

    `logs`: each local launch keeps its logs in a folder of its own under it (`launched`); a failed one raises
    one line naming the process that failed and its log: `UserError` (exit 2) for the user's cause, else
    `LaunchError`. Its checkpoints let a rerun resume. A multi-node script has its nodes log under `logs` too."""
    name = cfg.output_path.name
    if nnodes > 1:
        cmd = torchrun_command(cfg, nnodes, nproc_per_node, python=PYTHON, log_dir=LOGS)
        write_script(script, cmd, nnodes, logs / f"{name}-nodes")
        raise UserError(f"distillation needs {nnodes} nodes: launch {script} on each node (it resumes from its "
                        f"checkpoints), then {then}")  # fmt: skip
    single = nproc_per_node == 1
    if not single:
        _check_torchrun()
    logs.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix=f"{name}-{time.strftime('%Y%m%d-%H%M%S')}-", dir=logs))
    cmd = child_command(cfg) if single else torchrun_command(cfg, 1, nproc_per_node, log_dir=str(folder / "ranks"))
    log("[distill] " + shlex.join(cmd))
    log(f"[distill] logs: {folder}")
    code = launched.run_logged(cmd, folder / "launcher.log", ranks=not single)
    if code != 0:
        raise launched.failure(code, folder, nproc_per_node)


def _check_torchrun() -> None:
    """Raise `UserError` when this interpreter's torch cannot run torchrun (built without torch.distributed)."""
    if not torch.distributed.is_available():
        raise UserError(f"cannot launch torchrun: the torch of {sys.executable} is built without "
                        f"torch.distributed; launch on one process (recipe distill.launcher: local)")  # fmt: skip


# Words of a multi-node script that the shell expands on each node: the interpreter, the rendezvous, the logs.
PYTHON, ENDPOINT, LOGS = '"$PYTHON"', '--rdzv_endpoint="$MASTER_ADDR:$MASTER_PORT"', '"$LOGS"'


def write_script(script: Path, cmd: list[str], nodes: int, logs: Path) -> None:
    """A bash script that runs `cmd` (a torchrun line from `torchrun_command(..., python=PYTHON, log_dir=LOGS)`)
    on each of `nodes` nodes, naming the interpreter it was written for and what each node needs. Each node keeps
    its ranks' logs under `logs`/HOSTNAME."""
    shell_words = (PYTHON, ENDPOINT, f"--log-dir={LOGS}")  # expanded by each node's shell, quoted as they are
    lines = [
        "#!/usr/bin/env bash",
        f"# Written by minipuzzle: a distillation over {nodes} nodes. Run this script on every node (srun, mpirun,",
        "# pdsh, ...), then rerun minipuzzle to continue. Each node needs:",
        "#   - MASTER_ADDR / MASTER_PORT: the same reachable host and free port on every node (the rendezvous);",
        f"#   - the interpreter below at the same path ({sys.executable}), with torch and this minipuzzle",
        "#     importable (installed in its environment, or on PYTHONPATH);",
        "#   - every path below (teacher, student, data, output) and the logs folder on a filesystem all nodes share.",
        "set -euo pipefail",
        f"PYTHON={shlex.quote(sys.executable)}",
        f'LOGS={shlex.quote(str(logs))}/"$(hostname)"',
        '[ -x "$PYTHON" ] || { echo "error: $(hostname) has no $PYTHON, the interpreter this script was written'
        ' for" >&2; exit 2; }',
        ': "${MASTER_ADDR:?set MASTER_ADDR and MASTER_PORT (the rendezvous) on every node}"',
        ': "${MASTER_PORT:?set MASTER_ADDR and MASTER_PORT (the rendezvous) on every node}"',
        " ".join(w if w in shell_words else shlex.quote(w) for w in cmd),
    ]  # fmt: skip
    script.parent.mkdir(parents=True, exist_ok=True)
    script.write_text("\n".join(lines) + "\n")
    script.chmod(0o755)
