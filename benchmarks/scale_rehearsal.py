"""Scale rehearsal: the 56B recipe's stages on a generated checkpoint, hardware that forbids holding it whole.

Writes a random float32 Nemotron-H checkpoint (wide and shallow, the demo teacher's 4096-token vocabulary, so the
embeddings are small and a forward over a few 64-token windows takes seconds), tensor by tensor with
`checkpoint.write.ShardWriter`, and a recipe with the 56B recipe's stages (score, prune with ranked candidates and a
short candidate distillation, cut, distillation under torchrun with 2 processes accumulating 2 micro-batches each, eval)
whose `hardware` section gives the CPU device less memory than the checkpoint. Each stage then runs in a fresh
subprocess (the runner's own stage functions, with the settings `minipuzzle run` gives them), and its peak memory is
compared with the memory plan's prediction for it (`minipuzzle run --dry-run --json`).

Measured peak: /proc polled every 20 ms for the stage process and all its descendants, RSS summed over them at the
same instant (for the torchrun stage: both ranks, plus the torchrun launcher), the largest sum kept; the kernel's
ru_maxrss of the largest process (RUSAGE_CHILDREN) is recorded beside it (polling can miss a short peak; the
largest single process cannot exceed the true sum). The stage process's own RSS and its descendants' sum are kept
apart too: prune trains its candidates in child processes (`candidates.distill_candidates`), so the prune process
(scoring, ranking, measuring the distilled candidates, the cut) is measured on its own and its candidate
distillation as a training of its own.

Predicted peak: the plan's own, interpreters included (`memory.PROCESS_BYTES` for every process that builds
a model, `TOOL_BYTES` for the cut, `LAUNCHER_BYTES` for torchrun's launcher, and the process that started a local
launch; `BASELINE_CHILDREN` measures them here for the record). On a CPU-only machine the plan's `device_total`
already counts a node's host buffers and helper interpreters (device and host are one memory); for a torchrun
launch of R ranks per node the device figure is per rank and the host bytes per node, so the prediction is
nodes x (R x (device_total - host) + host), every node being this machine; for the largest process (one rank),
its device terms plus the node's host buffers (rank 0's final save). Prune's process is measured apart from the
candidate distillation it launches, so the latter's prediction leaves out the prune process the plan counts
beside it.

Distillation also runs as HSDP (`rehearse_hsdp`): the recipe's 2 nodes x 2 processes with `sharding: per_node`,
whose script `minipuzzle run` writes for the nodes and the rehearsal runs twice on this machine (two torchrun
launchers, one rendezvous), so FSDP2's mesh is 2 x 2; it accumulates 2 micro-batches per rank.

A tiny bf16 mixture-of-experts checkpoint, saved as transformers saves one (float32 routers), then goes through
score, prune (ranking streamed, as the Nano 3 recipe ranks), distill and eval (`rehearse_moe`, the same at every
size), each stage measured against its plan; after every stage that writes a checkpoint its routers must still be
float32 and every token must choose the same experts streamed, offloaded and in memory (`routing`).

Hardware per part: the rehearsal's device (half the checkpoint) wherever the plan fits it; a training (the distill
stage, prune's candidate distillation) gets the least memory its plan needs, as no training of this model fits in
half its size (the prune process is planned on the small device and its candidate distillation, through
`prune(training_hardware=...)`, on that larger one). Cut is part of the prune process; it is also run alone
(`minipuzzle cut --host-memory` on the chosen plan) so its peak is measured on its own.

    python benchmarks/scale_rehearsal.py [--size full|tiny] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEMO_TEACHER = REPO / "minipuzzle" / "assets" / "demo-teacher"
RESULT = REPO / "benchmarks" / "results" / "scale_rehearsal.json"
sys.path.insert(0, str(REPO))  # run as a script: this checkout's minipuzzle, as the stage processes (cwd REPO)

# Layouts: 2 x "M-*-M-" (4 Mamba, 2 attention, 6 MLP layers); the MLPs are wide, so they hold most parameters.
SIZES = {
    "full": dict(hidden_size=2048, intermediate_size=18432, num_attention_heads=16, num_key_value_heads=4,
                 head_dim=128, mamba_num_heads=32, mamba_head_dim=64, n_groups=4, ssm_state_size=64),
    "tiny": dict(hidden_size=64, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                 mamba_num_heads=4, mamba_head_dim=16, n_groups=2, ssm_state_size=16),
}  # fmt: skip
# Fraction of the checkpoint's size the hardware's one (CPU) device has: below 1, so no stage may load it whole.
DEVICE_FRACTION = 0.5
BOUND_OF_CHECKPOINT = 0.6  # score, prune, cut and eval must peak below this x the checkpoint's size
PREDICTION_TOLERANCE = 0.15


def write_checkpoint(path: Path, size: str | dict) -> tuple[int, int]:
    """A random float32 checkpoint of `SIZES[size]` (or of the widths `size` gives) with the demo teacher's
    tokenizer, written one tensor at a time (the model is built on the meta device: only the tensor being written
    is ever in memory). Returns (parameters, bytes of safetensors)."""
    import torch

    from minipuzzle.checkpoint.build import build_model
    from minipuzzle.checkpoint.write import ShardWriter, write_config
    from minipuzzle.testing import tiny_config, tiny_layout

    layout = tiny_layout(pattern="M-*-M-" * 2, vocab_size=4096, **(SIZES[size] if isinstance(size, str) else size))
    cfg = tiny_config(layout, chunk_size=64)
    meta = build_model(layout, cfg)
    path.mkdir(parents=True)
    writer = ShardWriter(path, 400 * 10**6)
    gen = torch.Generator().manual_seed(0)
    n = 0
    for name, p in meta.state_dict().items():
        if name.endswith("A_log"):
            t = torch.log(torch.rand(p.shape, generator=gen) * 4 + 0.5)
        elif name.endswith("dt_bias"):
            t = torch.randn(p.shape, generator=gen) * 0.5 - 1.0
        elif p.ndim == 1:
            t = 1.0 + torch.randn(p.shape, generator=gen) * 0.1
        else:
            t = torch.randn(p.shape, generator=gen) * (0.5 / p[0].numel() ** 0.5)
        n += t.numel()
        writer.add(name, t)
        del t
    writer.close()
    write_config(path, layout.to_hf_config(cfg), torch.float32)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(DEMO_TEACHER / f, path / f)
    return n, sum(f.stat().st_size for f in path.glob("*.safetensors"))


def recipe(ckpt: Path, device_bytes: int, size: str) -> dict:
    """The 56B recipe's stages at rehearsal scale: few 64-token windows, 2 candidates, 2 candidate-distillation
    steps of 2 windows, 2 distillation steps under torchrun with 2 processes, each accumulating 2 micro-batches of
    one window (the 56B recipe's plan accumulates 12 per rank: gradients must stay sharded through them)."""
    seq = 64 if size == "full" else 32
    return {
        "name": f"scale-rehearsal-{size}",
        "description": "the 56B recipe's stages on a generated checkpoint larger than the device",
        "model": {"source": str(ckpt), "dtype": "float32", "device": "cpu"},
        "data": {"source": "stdlib", "held_out_files": ["argparse.py", "calendar.py", "difflib.py"]},
        "score": {"depth_samples": 2, "width_samples": 2, "seq_len": seq, "depth_metric": "mse_hidden"},
        "prune": {"target": "0.83", "axes": ["depth", "ffn"], "candidates": 2, "held_out_windows": 2,
                  "candidate_distill_batch": 2, "candidate_distill_tokens": 2 * 2 * seq},
        # Sharded accumulation, as the 56B recipe's plan chooses (its whole gradient cannot fit a GPU); here,
        # with room for it, the plan would accumulate unsharded (tests/test_distill_grad_accum.py measures that).
        "distill": {"max_steps": 2, "seq_len": seq, "batch_size": 4, "grad_accum": 2, "accumulation": "sharded",
                    "lr": 1.0e-4, "warmup": 0,
                    "save_every": 2, "eval_every": 2, "held_out_windows": 2, "loss": "forward_kl",
                    "launcher": "torchrun", "nnodes": 1, "nproc_per_node": 2},
        "eval": {"held_out_windows": 2, "seq_len": seq, "speed": False},
        "hardware": {"gpu_memory": device_bytes, "gpus_per_node": 2, "nodes": 1, "host_memory": device_bytes},
    }  # fmt: skip


def _tree(pid: int) -> list[int]:
    """`pid` and its descendants (from /proc/*/stat's parent ids)."""
    parents: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                ppid = int(Path(f"/proc/{d}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            parents.setdefault(ppid, []).append(int(d))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(parents.get(p, []))
    return out


def _rss(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def measure(cmd: list[str], cwd: Path, log: Path) -> dict:
    """Run `cmd` in a fresh process; its peak RSS summed over its process tree (polled), the largest peak of one
    process in it (polled: under torchrun, the largest rank), the largest process's ru_maxrss, the seconds it took.
    Raises when it fails (its log's tail in the message)."""
    import resource

    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    t0 = time.time()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=cwd, stdout=f, stderr=subprocess.STDOUT)
        peak, own, children, procs, child_procs, each = 0, 0, 0, 1, 0, {}
        while proc.poll() is None:
            tree = _tree(proc.pid)
            rss = {p: _rss(p) for p in tree}
            rest = sum(v for p, v in rss.items() if p != proc.pid)
            peak, own, children = max(peak, sum(rss.values())), max(own, rss[proc.pid]), max(children, rest)
            each = {p: max(v, each.get(p, 0)) for p, v in rss.items()} | {p: v for p, v in each.items() if p not in rss}
            procs, child_procs = max(procs, len(tree)), max(child_procs, len(tree) - 1)
            time.sleep(0.02)
    maxrss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:6])} failed ({proc.returncode}):\n{log.read_text()[-3000:]}")
    # RUSAGE_CHILDREN is the largest of all children so far: it says something of this stage only when it grew.
    return {"peak_rss": peak, "largest_process_maxrss": maxrss if maxrss > before * 1024 else None,
            "processes": procs, "seconds": round(time.time() - t0, 1), "own_peak_rss": own,
            "children_peak_rss": children, "child_processes": child_procs,
            "largest_process_peak_rss": max(each.values(), default=0)}  # fmt: skip


STAGE_CHILD = r"""
import sys, torch
torch.set_num_threads(int(sys.argv[3]))
from pathlib import Path
from minipuzzle import runner
from minipuzzle.recipe import load_recipe
r = load_recipe(sys.argv[1]); run_dir = Path(sys.argv[2]); stage = sys.argv[4]
from minipuzzle.hardware import Hardware
train_hw = Hardware(device="cpu", gpu_memory=int(sys.argv[5])) if len(sys.argv) > 5 else None
from minipuzzle.checkpoint.resolve import resolve_checkpoint
teacher = resolve_checkpoint(r.model.source, r.model.path)
hw = runner.resolve(r.hardware)
data = runner.prepare_data(r, run_dir / "data")
{"score": lambda: runner._score(r, teacher, data, run_dir / "score", False, hw),
 "prune": lambda: runner._prune(r, teacher, data, run_dir, False, hw, training_hardware=train_hw),
 "distill": lambda: runner._distill(r, teacher, data, run_dir, print, False, hw),
 "eval": lambda: runner._eval(r, teacher, data, run_dir, False, hw)}[stage]()
"""


def dry_run(recipe_file: Path, cwd: Path, run_dir: Path | None = None) -> dict:
    """The plan `minipuzzle run RECIPE [-o RUN_DIR] --dry-run --json` prints (with the run folder: distillation
    and eval planned for the student its prune stage wrote, as the run plans them)."""
    cmd = [sys.executable, "-m", "minipuzzle.cli", "run", str(recipe_file), "--dry-run", "--json"]
    cmd += ["-o", str(run_dir)] if run_dir is not None else []
    out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=True)  # a refusal prints too
    return json.loads(out.stdout)


def _key(stage: str, part: str) -> str:
    """Which measured process a part of the plan runs in: cut and candidate distillation apart from their stage."""
    return part if part in ("cut", "candidate distillation") else stage


def predictions(plan: dict) -> dict[str, dict]:
    """Per measured process (score, prune, candidate distillation, cut, distill, eval): the plan's largest part
    and what it predicts for the process tree and for its largest process (see the module docstring). The prune
    process also runs the cut, so its prediction is the larger of its parts and the cut's."""
    out: dict[str, dict] = {}
    for stage in plan["memory"]["stages"]:
        for part in stage["parts"]:
            pred = _predicted(part)
            keys = [_key(stage["stage"], part["name"])] + (["prune"] if part["name"] == "cut" else [])
            for key in keys:
                if key not in out or pred["predicted"] > out[key]["predicted"]:
                    out[key] = pred
    return out


def _predicted(part: dict) -> dict:
    """A part's prediction on this one machine (CPU: the plan's device total already holds a node's host bytes
    and interpreters): each node's ranks hold the per-device terms, their baselines included, and the node its
    host buffers and helper interpreters once; here every node is this machine. One process (a rank: rank 0 may
    hold the node's host buffers, the final save) holds at most its terms and the host buffers."""
    g, m = part["geometry"], part["memory"]
    devices, nodes = g.get("devices") or 1, g.get("nodes") or 1
    host = m["host_buffers"] + m["host_baseline"]
    per_device = part["device_total"] - host
    total = nodes * (devices // nodes * per_device + host)
    return {"part": part["name"], "device_total": part["device_total"], "host_buffers": m["host_buffers"],
            "baseline": m["baseline"], "host_baseline": m["host_baseline"], "planned_processes": devices,
            "nodes": nodes, "predicted": total, "predicted_largest_process": per_device + m["host_buffers"],
            "fits": part["fits"]}  # fmt: skip


# What an interpreter holds before it does any work, by what it imports: a stage process (python, torch,
# transformers, minipuzzle), one that builds a model (also transformers' NemotronH modeling code, and a tiny model
# built and run once: the first forward initializes torch's CPU kernels, which every model-building stage pays),
# torchrun's launcher (torch alone). The plan counts them itself (`memory.PROCESS_BYTES`, `TOOL_BYTES`,
# `LAUNCHER_BYTES`); they are measured here to show the plan's figures hold on this machine.
BASELINE_CHILDREN = {
    "stage": "import torch, transformers, minipuzzle.runner, minipuzzle.distill, minipuzzle.evaluate",
    "model": "import torch, transformers, minipuzzle.runner, minipuzzle.distill, minipuzzle.evaluate; "
             "import transformers.models.nemotron_h.modeling_nemotron_h; from minipuzzle.testing import random_model; "
             "random_model()(torch.zeros(1, 8, dtype=torch.long), use_cache=False)",
    "launcher": "import torch.distributed.run",
}  # fmt: skip


def _write_recipe(folder: Path, name: str, doc: dict, device_bytes: int) -> Path:
    import yaml

    doc = {**doc, "hardware": {**doc["hardware"], "gpu_memory": device_bytes, "host_memory": device_bytes}}
    f = folder / f"{name}.yaml"
    f.write_text(yaml.safe_dump(doc, sort_keys=False))
    return f


def plan_baselines() -> dict[str, int]:
    """The plan's interpreter figures, by the kinds `BASELINE_CHILDREN` measures."""
    from minipuzzle.memory import LAUNCHER_BYTES, PROCESS_BYTES, TOOL_BYTES

    return {"model": PROCESS_BYTES, "launcher": LAUNCHER_BYTES, "cut": TOOL_BYTES}


def stage_hardware(preds: dict[str, dict], device_bytes: int) -> dict[str, int]:
    """The device memory each stage runs with: the rehearsal's (below the checkpoint's size) where the plan fits
    it, else the least the plan needs (its device_total over memory.USABLE), so a stage that must train a
    model whole is measured at the hardware it would be refused without."""
    from minipuzzle.memory import USABLE

    return {k: device_bytes if p["fits"] else int(p["device_total"] / USABLE) + 2**20 for k, p in preds.items()}


def rehearse(size: str, work: Path, threads: int = 2, log=print) -> dict:
    """Write the checkpoint and recipe into `work`, run every stage in its own process, then the distill stage
    again as 2 nodes x 2 ranks (`rehearse_hsdp`), and a tiny bf16 MoE checkpoint through every stage
    (`rehearse_moe`, the same at every size); return the record."""
    from minipuzzle.memory import PROCESS_BYTES

    n, ckpt_bytes = write_checkpoint(work / "ckpt", size)
    log(f"checkpoint: {n / 1e9:.3f}B parameters, {ckpt_bytes / 1e9:.2f} GB float32")
    doc = recipe(work / "ckpt", int(DEVICE_FRACTION * ckpt_bytes), size)
    doc["hardware"]["device"] = "cpu"
    base_file = _write_recipe(work, "recipe", doc, int(DEVICE_FRACTION * ckpt_bytes))
    preds = predictions(dry_run(base_file, REPO))
    hw = stage_hardware(preds, int(DEVICE_FRACTION * ckpt_bytes))
    baseline = {k: measure([sys.executable, "-c", code], REPO, work / f"baseline_{k}.log")["peak_rss"]
                for k, code in BASELINE_CHILDREN.items()}  # fmt: skip
    run_dir, stages = work / "run", {}
    for stage in ("score", "prune", "cut", "distill", "eval"):
        rf = _write_recipe(work, f"recipe_{stage}", doc, hw[stage])
        pred = predictions(dry_run(rf, REPO, run_dir))
        if stage == "cut":
            cmd = [sys.executable, "-m", "minipuzzle.cli", "cut", str(work / "ckpt"), "--plan",
                   str(run_dir / "prune" / "prune_plan.json"), "-o", str(work / "cut"), "--host-memory", str(hw[stage])]  # fmt: skip
        else:
            cmd = [sys.executable, "-c", STAGE_CHILD, str(rf), str(run_dir), str(threads), stage]
        if stage == "prune":  # its candidate distillation is planned for the training's hardware
            cmd.append(str(hw["candidate distillation"]))
            pred["candidate distillation"] = predictions(
                dry_run(_write_recipe(work, "recipe_candidates", doc, hw["candidate distillation"]), REPO)
            )["candidate distillation"]
        m = measure(cmd, REPO, work / f"{stage}.log")
        if stage == "prune":
            own = {**m, "peak_rss": m["own_peak_rss"], "processes": 1}
            kids = {**m, "peak_rss": m["children_peak_rss"], "processes": m["child_processes"]}
            cand = pred["candidate distillation"]
            own["largest_process_peak_rss"] = m["own_peak_rss"]
            stages["prune"] = _record(own, pred["prune"], hw[stage], ckpt_bytes, log, "prune (its process)")
            stages["candidate distillation"] = _record(kids, cand, hw["candidate distillation"], ckpt_bytes, log,
                                                       "candidate distillation (child processes)",
                                                       outside=PROCESS_BYTES)  # fmt: skip
        else:
            # `minipuzzle run` runs every stage in one process, which has built models by the time it launches the
            # distillation (the plan counts PROCESS_BYTES for it); here the stage process is fresh and builds none.
            fresh = PROCESS_BYTES - baseline["stage"] if stage == "distill" and m["processes"] > 1 else 0
            stages[stage] = _record(m, pred[stage], hw[stage], ckpt_bytes, log, stage, outside=fresh)
    stages["distill (HSDP, 2 nodes x 2 ranks)"] = rehearse_hsdp(work, doc, run_dir, ckpt_bytes, threads, log)
    moe = rehearse_moe(work, threads, log)
    stages.update(moe["stages"])
    return {"size": size, "parameters": n, "checkpoint_bytes": ckpt_bytes, "dtype": "float32",
            "device_fraction": DEVICE_FRACTION, "baseline_rss": baseline, "plan_baselines": plan_baselines(),
            "stages": stages, "moe_routing": moe["routing"],
            "checks": checks(stages, ckpt_bytes) | routing_checks(moe["routing"])}  # fmt: skip


ROUTER = ".mixer.gate."  # transformers keeps these tensors (gate.weight, e_score_correction_bias) in float32


def write_moe_checkpoint(path: Path) -> Path:
    """A tiny bf16 mixture-of-experts checkpoint as transformers saves one (`from_pretrained(dtype=bfloat16)`:
    routers float32, everything else bf16), with its tokenizer and data.txt (stdlib text) beside it."""
    import torch
    from transformers import NemotronHForCausalLM

    from minipuzzle.distill.toy import make_pair
    from minipuzzle.testing import make_tokenizer, save_model, tiny_moe_layout

    tok = make_tokenizer(320)
    teacher, _, _ = make_pair(path / "f32", tok, layout=tiny_moe_layout(), drop=(4,))
    model = NemotronHForCausalLM.from_pretrained(teacher, dtype=torch.bfloat16)
    return save_model(model, path / "bf16", tokenizer=tok)


def routing(path: Path, windows: int = 16, seq: int = 128) -> dict:
    """The router tensors' dtypes of the checkpoint at `path` and its routing of `windows` random windows computed
    three ways, as scoring and ranking (streamed), eval (offloaded) and distillation (in memory) compute them in
    bf16: which experts every token chose in every MoE layer, and the final hidden states."""
    import torch

    from minipuzzle.checkpoint.build import load_model
    from minipuzzle.checkpoint.read import Checkpoint
    from minipuzzle.evaluate.placement import load_offloaded
    from minipuzzle.score.layerwise import StreamedStack, iter_layerwise

    ckpt = Checkpoint(path)
    dtypes = sorted({str(ckpt.get(k).dtype) for k in ckpt.keys() if ROUTER in k})
    ids = torch.randint(0, ckpt.layout.vocab_size, (windows, seq), generator=torch.Generator().manual_seed(0))

    def record(gates, sink):
        return [g.register_forward_hook(lambda _m, _a, out, i=i: sink.setdefault(i, []).append(out[2].sort(-1).values))
                for i, g in gates]  # fmt: skip

    def whole(model, sink):
        record([(i, la.mixer.gate) for i, la in enumerate(model.model.layers) if la.block_type == "moe"], sink)
        with torch.no_grad():
            return torch.cat([model.model(b, use_cache=False).last_hidden_state for b in ids.split(4)])

    routes = {"in memory": {}, "offloaded": {}, "streamed": {}}
    states = {"in memory": whole(load_model(path, torch.bfloat16), routes["in memory"]),
              "offloaded": whole(load_offloaded(path, torch.bfloat16, torch.device("cpu")), routes["offloaded"])}

    from contextlib import contextmanager

    @contextmanager
    def on_block(i, block):
        hooks = record([(i, block.mixer.gate)], routes["streamed"]) if block.block_type == "moe" else []
        yield
        for h in hooks:
            h.remove()

    with torch.no_grad():
        stack = StreamedStack.open(path, dtype=torch.bfloat16)
        states["streamed"] = torch.cat([hn for _, hn in iter_layerwise(stack, ids, batch_size=4, on_block=on_block)])
    want = {i: torch.cat(v) for i, v in routes["in memory"].items()}
    same = all(sorted(routes[k]) == sorted(want) and all(torch.equal(torch.cat(routes[k][i]), want[i]) for i in want)
               for k in ("offloaded", "streamed"))  # fmt: skip
    diff = max((states[k].float() - states["in memory"].float()).abs().max().item() for k in ("offloaded", "streamed"))
    return {"router_dtypes": dtypes, "moe_layers": sorted(want), "tokens": windows * seq,
            "same_experts": bool(same and want), "max_final_state_difference": diff}


def rehearse_moe(work: Path, threads: int, log) -> dict:
    """A bf16 MoE checkpoint through score, prune (ranking streamed: the Nano 3 recipe ranks streamed; the cut in
    the prune process), distill and eval, each stage a fresh process measured against its plan on hardware its
    plan fits, and the routers checked after every stage that writes a checkpoint (`routing`: float32 routers,
    the same experts for every token streamed, offloaded and in memory)."""
    src = write_moe_checkpoint(work / "moe")
    nbytes = sum(f.stat().st_size for f in src.glob("*.safetensors"))
    doc = {"name": "scale-rehearsal-moe", "description": "a bf16 MoE checkpoint through every stage",
           "model": {"source": str(src), "dtype": "bfloat16", "device": "cpu"},
           "data": {"source": str(work / "moe" / "f32" / "data.txt")},
           "score": {"depth_samples": 2, "width_samples": 2, "seq_len": 32, "stream": True},
           "prune": {"target": "0.8", "axes": ["depth"], "candidates": 2, "held_out_windows": 2},
           "distill": {"max_steps": 2, "seq_len": 32, "batch_size": 2, "lr": 1.0e-4, "warmup": 0, "save_every": 2,
                       "eval_every": 2, "held_out_windows": 2, "launcher": "local"},
           "eval": {"held_out_windows": 2, "seq_len": 32, "speed": False},
           "hardware": {"device": "cpu", "gpu_memory": 2**40, "gpus_per_node": 1, "nodes": 1, "host_memory": 2**40}}
    run_dir, stages, checked = work / "run_moe", {}, {"source": routing(src)}
    for stage in ("score", "prune", "distill", "eval"):
        probe = predictions(dry_run(_write_recipe(work, f"moe_probe_{stage}", doc, 2**40), REPO, run_dir))[stage]
        from minipuzzle.memory import USABLE

        device = int(probe["device_total"] / USABLE) + 2**20
        rf = _write_recipe(work, f"moe_{stage}", doc, device)
        pred = predictions(dry_run(rf, REPO, run_dir))[stage]
        m = measure([sys.executable, "-c", STAGE_CHILD, str(rf), str(run_dir), str(threads), stage], REPO,
                    work / f"moe_{stage}.log")  # fmt: skip
        stages[f"moe {stage}"] = _record(m, pred, device, nbytes, log, f"moe {stage}")
        if stage in ("prune", "distill"):
            checked[stage] = routing(run_dir / stage)
    for k, r in checked.items():
        log(f"moe {k}: routers {r['router_dtypes']}, same experts streamed / offloaded / in memory: "
            f"{r['same_experts']} ({r['tokens']} tokens), final states within {r['max_final_state_difference']:.3g}")
    return {"stages": stages, "routing": checked}


def routing_checks(checked: dict[str, dict]) -> dict[str, dict]:
    """The MoE checkpoints' routers: float32 after every stage, the same experts for every token three ways, the
    final states within bf16's tolerance of one another (0.05, as tests/test_moe_routers.py)."""
    out = {}
    for k, r in checked.items():
        ok = r["router_dtypes"] == ["torch.float32"] and r["same_experts"] and r["max_final_state_difference"] <= 0.05
        out[f"moe {k}: float32 routers, same experts streamed / offloaded / in memory"] = {
            "value": r["max_final_state_difference"], "pass": bool(ok)}
    return out


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rehearse_hsdp(work: Path, doc: dict, run_dir: Path, ckpt_bytes: int, threads: int, log) -> dict:
    """The distill stage as HSDP runs it: the recipe's `nnodes: 2, nproc_per_node: 2, sharding: per_node` on
    hardware of 2 nodes x 2 devices. `minipuzzle run` writes its script for the nodes (`distill_torchrun.sh`, as
    over several real nodes); the rehearsal runs that script twice on this machine, two torchrun launchers meeting
    at one rendezvous, so each rank has LOCAL_WORLD_SIZE 2 and FSDP2's mesh is 2 (replicate) x 2 (shard). Batch 8
    = 4 ranks x 2 accumulated micro-batches of one window; the student is the one the prune stage cut. Measured:
    both launchers and their 4 ranks; predicted: 2 nodes x (2 ranks' device terms + the node's host bytes)."""
    from minipuzzle.hardware import host_ram
    from minipuzzle.memory import USABLE

    hsdp_dir = work / "run_hsdp"
    hsdp_dir.mkdir()
    (hsdp_dir / "prune").symlink_to(run_dir / "prune")
    dist = {**doc["distill"], "nnodes": 2, "nproc_per_node": 2, "sharding": "per_node", "batch_size": 8,
            "grad_accum": 2}  # fmt: skip
    hsdp = {**doc, "distill": dist, "hardware": {**doc["hardware"], "gpus_per_node": 2, "nodes": 2}}
    probe = predictions(dry_run(_write_recipe(work, "recipe_hsdp_probe", hsdp, 2**40), REPO, hsdp_dir))["distill"]
    device = int(probe["device_total"] / USABLE) + 2**20
    rf = _write_recipe(work, "recipe_hsdp", hsdp, device)
    pred = predictions(dry_run(rf, REPO, hsdp_dir))["distill"]
    if pred["predicted"] > 0.9 * host_ram():
        log(f"distill (HSDP): skipped, predicted {pred['predicted'] / 1e9:.1f} GB, this machine has "
            f"{host_ram() / 1e9:.1f} GB")  # fmt: skip
        return {**pred, "skipped": "the 4 ranks do not fit this machine's RAM"}
    # The stage process writes the nodes' script and stops there, as over real nodes (a UserError, exit 2).
    write = subprocess.run([sys.executable, "-c", STAGE_CHILD, str(rf), str(hsdp_dir), str(threads), "distill"],
                           cwd=REPO, capture_output=True, text=True)  # fmt: skip
    script = hsdp_dir / "distill_torchrun.sh"
    if not script.is_file():
        raise RuntimeError(f"no {script} written ({write.returncode}):\n{write.stderr[-3000:]}")
    env = f"MASTER_ADDR=127.0.0.1 MASTER_PORT={_free_port()} OMP_NUM_THREADS={threads}"
    cmd = ["bash", "-c", f"{env} bash {script} & a=$!; {env} bash {script} & b=$!; wait $a && wait $b"]
    m = measure(cmd, REPO, work / "distill_hsdp.log")
    ran = json.loads((hsdp_dir / "distill" / "distill.json").read_text())["config"]
    rec = _record(m, pred, device, ckpt_bytes, log, "distill (HSDP, 2 nodes x 2 ranks)")
    return {**rec, "ran": {k: ran[k] for k in ("batch_size", "grad_accum", "sharding")}}


def _record(m: dict, pred: dict, device: int, ckpt_bytes: int, log, label: str, outside: int = 0) -> dict:
    """One measured process (tree) against its prediction, the plan's own (interpreters included); `outside`: bytes
    the plan counts that the measured tree does not hold (prune's process, measured apart from its candidate
    distillation; what a fresh stage process lacks of the run process that launches a distillation)."""
    predicted = pred["predicted"] - outside
    log(f"{label}: measured {m['peak_rss'] / 1e9:.2f} GB, predicted {predicted / 1e9:.2f} GB; largest process "
        f"{m['largest_process_peak_rss'] / 1e9:.2f} GB, predicted {pred['predicted_largest_process'] / 1e9:.2f} GB "
        f"({m['processes']} processes, {m['seconds']} s, device {device / 1e9:.2f} GB)")  # fmt: skip
    return {**m, **pred, "device_memory": device, "predicted_with_baseline": predicted,
            "ratio_measured_to_predicted": m["peak_rss"] / predicted, "measured_over_checkpoint": m["peak_rss"] / ckpt_bytes,
            "ratio_largest_process": m["largest_process_peak_rss"] / pred["predicted_largest_process"]}  # fmt: skip


def checks(stages: dict, ckpt_bytes: int) -> dict[str, dict]:
    """The rehearsal's bounds: score, prune (its own process), cut and eval below 0.6 x the checkpoint; every
    prediction within 15 %, of the process tree and of its largest process (under torchrun: one rank)."""
    out = {}
    for k, s in stages.items():
        if "skipped" in s:
            continue
        if not k.startswith(("distill", "moe")) and k != "candidate distillation":  # trainings: their bound is their plan
            out[f"{k} < {BOUND_OF_CHECKPOINT} x checkpoint"] = {
                "value": round(s["measured_over_checkpoint"], 3), "pass": s["peak_rss"] < BOUND_OF_CHECKPOINT * ckpt_bytes}
        err = abs(s["predicted_with_baseline"] - s["peak_rss"]) / s["peak_rss"]
        out[f"{k} prediction within 15 %"] = {"value": round(err, 3), "pass": err <= PREDICTION_TOLERANCE}
        one = abs(s["predicted_largest_process"] - s["largest_process_peak_rss"]) / s["largest_process_peak_rss"]
        out[f"{k} largest process within 15 %"] = {"value": round(one, 3), "pass": one <= PREDICTION_TOLERANCE}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", choices=sorted(SIZES), default="full")
    ap.add_argument("--keep", type=Path, help="work folder to keep (default: a temporary one, removed)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--output", type=Path, default=RESULT)
    args = ap.parse_args()
    t0 = time.time()
    if args.keep:
        args.keep.mkdir(parents=True)
        rec = rehearse(args.size, args.keep, args.threads)
    else:
        with tempfile.TemporaryDirectory() as d:
            rec = rehearse(args.size, Path(d), args.threads)
    rec["seconds"] = round(time.time() - t0, 1)
    rec["command"] = "python benchmarks/scale_rehearsal.py " + " ".join(sys.argv[1:])
    for name, c in rec["checks"].items():
        print(f"{'PASS' if c['pass'] else 'FAIL'}  {name}: {c['value']}")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(rec, indent=2) + "\n")
    print(f"wrote {args.output} ({rec['seconds']} s)")


if __name__ == "__main__":
    main()
