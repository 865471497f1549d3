"""Which expert estimator, which channel choice and which axes? The MoE demo teacher pruned at Nano 3 -> 22B's ratios.

Budgets: 0.70 of the total parameters and 0.84 of the active ones (Nemotron 3 Nano 30B-A3B -> 22B-A3B: 22.28 /
31.58 and 3.00 / 3.58). Every student gets the same short distillation; every figure is measured on test files
(the odd-numbered of the demo recipe's held-out standard-library files, never trained on), while the choices the
method makes (the candidate of a search) are made on validation files (the even-numbered ones), as
benchmarks/demo_quality.py does. Compared:

- axes: the search's choice over all axes (depth, hidden, Mamba heads, experts, expert width, shared-expert width)
  under both budgets; widths only (hidden, Mamba heads, expert width, shared width) under both budgets; experts only
  (under the total budget alone: removing experts does not change what a token runs, so no experts-only layout
  meets an active budget);
- expert estimators (`removal`, `router_load`, `output_norm`) and random experts, on the experts-only architecture
  (the same experts count for each, so only which experts stay differs), with each estimator's scoring time;
- expert channels, shared (one channel set per layer) vs per expert (each expert's own top channels), on the
  architecture of the search over the expert width alone (the same width for both).

    python benchmarks/moe_quality.py                       # writes benchmarks/results/moe_quality.json
    python benchmarks/moe_quality.py --steps 20            # quicker, noisier
    python benchmarks/moe_quality.py --smoke --output /tmp/mq   # checks the script, figures meaningless
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import torch
from demo_quality import data_folders, run_distill, save, split_held_out

from minipuzzle.arch import Layout
from minipuzzle.checkpoint.build import load_model
from minipuzzle.checkpoint.resolve import resolve_checkpoint
from minipuzzle.cut import Plan, cut_model
from minipuzzle.data import load_tokenizer, token_windows
from minipuzzle.errors import UserError
from minipuzzle.metrics import token_stats
from minipuzzle.score.experts import EXPERT_ESTIMATORS
from minipuzzle.score.scoring import score_model
from minipuzzle.search.damage import DamageModel
from minipuzzle.search.plan import choose_units
from minipuzzle.search.stage import PruneSettings, run_search

RESULTS = Path(__file__).resolve().parent / "results"
TOTAL, ACTIVE = 22.28 / 31.58, 3.00 / 3.58  # Nano 3 30B-A3B -> 22B-A3B
ALL_AXES = ("depth", "hidden", "mamba_heads", "experts", "expert_ffn", "shared_ffn")
WIDTH_AXES = ("hidden", "mamba_heads", "expert_ffn", "shared_ffn")
AXES_ROWS_CHANNELS = "shared"  # the "all axes" / "widths only" rows; the channel rows compare both choices
SCORED_AXES = ("depth", "hidden", "mamba_heads", "mamba_head_dim", "experts", "expert_ffn", "shared_ffn")
# Nano 3's search steps scaled to the demo: experts by 2 of 16 (8 of 128), hidden by 16 of 192 (256 of 2688); its
# depth range too (46..52 of 52 layers: at least 0.85 of each kind), as recipes/demo-moe.yaml has them.
STEPS = {"experts": 2, "hidden": 16}


def random_experts(layout: Layout, like: Plan, seed: int) -> Plan:
    """`like` with random routed experts in every MoE layer (the same count per router group)."""
    rng = random.Random(seed)
    per = layout.n_routed_experts // layout.n_group
    experts = {}
    for i, keep in (like["experts"] or {}).items():
        k = len(keep) // layout.n_group
        experts[i] = sorted(g * per + j for g in range(layout.n_group) for j in rng.sample(range(per), k))
    return Plan(like.layers, {**like.units, "experts": experts}, like.norm_compensation)


def with_experts(scores, expert_scores):
    """A copy of `scores` whose routed-expert table is `expert_scores`' (the other axes unchanged)."""
    return type(scores)(scores.pattern, {**scores.tables, "experts": expert_scores["experts"]}, scores.meta)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=80, help="distillation steps for each student (0: none)")
    ap.add_argument("--candidates", type=int, default=3, help="candidates of each search, chosen on validation")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=2e-4, help="the demo recipes' LR")
    ap.add_argument("--held-out-windows", type=int, default=48, help="windows of each of validation and test")
    ap.add_argument("--calibration-windows", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--output", type=Path, default=RESULTS, help="folder for moe_quality.json")
    ap.add_argument("--teacher", default="demo-moe", help="the MoE teacher (preset or checkpoint folder)")
    ap.add_argument("--smoke", action="store_true", help="1 step each, 4 windows, 2 candidates: checks the script")
    args = ap.parse_args()
    if args.smoke:
        args.steps, args.candidates, args.held_out_windows, args.calibration_windows = 1, 2, 4, 8
    torch.manual_seed(args.seed)
    t0 = time.time()
    teacher_dir = resolve_checkpoint(args.teacher)
    tok = load_tokenizer(teacher_dir)
    teacher = load_model(teacher_dir)
    layout = Layout.from_config(teacher.config)
    work = Path(tempfile.mkdtemp(prefix="moe-quality-"))
    train, val_dir, test_dir = data_folders(work / "data")
    val = token_windows(val_dir, tok, args.seq_len, args.held_out_windows, seed=args.seed)
    test = token_windows(test_dir, tok, args.seq_len, args.held_out_windows, seed=args.seed)
    calib = token_windows(train, tok, args.seq_len, args.calibration_windows, seed=args.seed)

    def measure(model, windows=test) -> dict:
        s = token_stats(model, windows, teacher=teacher)
        return {k: round(s[k], 4) for k in ("kl_to_teacher", "perplexity", "agreement")}

    from demo_quality import held_out_files

    val_files, test_files = split_held_out(held_out_files())
    results: dict = {
        "settings": {**vars(args), "output": str(args.output)},
        "budgets": {"total": round(TOTAL, 4), "active": round(ACTIVE, 4)},
        "windows": {"validation": val_files, "test": test_files, "count": len(test), "seq_len": args.seq_len},
        "teacher": {"layout": layout.summary(), "params": layout.num_params(), "active": layout.num_active_params(),
                    "test": measure(teacher), "training": training_record(teacher_dir)},
    }  # fmt: skip
    print("teacher", results["teacher"]["test"], flush=True)

    # Every axis scored once with the default estimator; the experts again with each estimator, timed alone.
    half = max(1, len(calib) // 2)
    scores = score_model(teacher, calib[:half], calib, axes=SCORED_AXES, progress=False)
    by_estimator, seconds = {}, {}
    for est in EXPERT_ESTIMATORS:
        t = time.perf_counter()
        by_estimator[est] = score_model(teacher, None, calib, axes=("experts",), expert_estimator=est, progress=False)
        seconds[est] = round(time.perf_counter() - t, 2)
    results["estimator_scoring_seconds"] = seconds

    def searched(axes, active=True, **kw):
        """(candidate, damage model, space) chosen on validation among the search's best candidates."""
        st = PruneSettings(target=str(TOTAL), target_active=str(ACTIVE) if active else None, axes=axes,
                           steps={k: v for k, v in STEPS.items() if k in axes}, candidates=args.candidates,
                           min_layers=0.85, **kw)  # fmt: skip
        space, dmodel, cands = run_search(layout, scores, st)
        # The axes rows cut expert channels the shared way, as they were measured for the README.
        kl = [measure(cut_model(teacher, choose_units(c, dmodel, scores, expert_channels=AXES_ROWS_CHANNELS)), val)[
            "kl_to_teacher"] for c in cands]  # fmt: skip
        best = min(range(len(cands)), key=lambda i: kl[i])
        return cands[best], dmodel, space

    plans: dict[str, Plan] = {}
    archs: dict[str, dict] = {}
    for name, axes, active, kw in (
        ("all axes", ALL_AXES, True, {}),
        ("widths only", WIDTH_AXES, True, {}),
        ("experts only", ("experts",), False, {"min_width": 0.25}),
        ("expert width only", ("expert_ffn",), False, {"min_width": 0.25}),
    ):
        try:
            cand, dmodel, space = searched(axes, active, **kw)
        except UserError as e:  # e.g. a teacher whose experts are too small a share to reach the budget alone
            results.setdefault("infeasible", {})[name] = str(e)
            print(f"{name}: {e}", flush=True)
            continue
        archs[name] = {"cand": cand, "dmodel": dmodel, "space": space}
        if name == "expert width only":
            plans["expert channels: shared"] = choose_units(cand, dmodel, scores, expert_channels="shared")
            plans["expert channels: per expert"] = choose_units(cand, dmodel, scores, expert_channels="per_expert")
        elif name == "experts only":
            for est, s in by_estimator.items():
                mixed = with_experts(scores, s)
                plans[f"experts by {est}"] = choose_units(cand, DamageModel(mixed, space), mixed)
            plans["random experts"] = random_experts(layout, plans["experts by removal"], args.seed)
        else:
            plans[name] = choose_units(cand, dmodel, scores, expert_channels=AXES_ROWS_CHANNELS)

    rows = {}
    for name, plan in plans.items():
        arch = plan.target_layout(layout)
        model = cut_model(teacher, plan)
        src = save(model, work / "students" / name.replace(" ", "_").replace(":", ""), teacher_dir)
        b = measure(model)
        a = None  # --steps 0: before distillation only
        if args.steps:
            out = run_distill(teacher_dir, src, work / "distilled" / src.name, train, val_dir, args.steps, args)
            a = measure(load_model(out))
        rows[name] = {
            "params": round(arch.num_params() / layout.num_params(), 4),
            "active": round(arch.num_active_params() / layout.num_active_params(), 4),
            "layers": arch.layer_counts(),
            "widths": {
                "hidden": arch.hidden_size,
                "mamba_heads": arch.mamba_num_heads,
                "experts": arch.n_routed_experts,
                "expert_ffn": arch.moe_intermediate_size,
                "shared_ffn": arch.moe_shared_expert_intermediate_size,
            },  # fmt: skip
            "before": b,
            "after": a,
        }
        print(f"{name}: {rows[name]}", flush=True)
    results["students"] = rows
    results["seconds"] = round(time.time() - t0)
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "moe_quality.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    print(markdown(results))


def training_record(folder: Path) -> dict | None:
    f = folder / "training.json"
    return json.loads(f.read_text()) if f.is_file() else None


def markdown(r: dict) -> str:
    s = r["settings"]
    lines = [
        f"Test: {r['windows']['count']} windows x {r['windows']['seq_len']} tokens of "
        f"{', '.join(r['windows']['test'])}; candidates chosen on {', '.join(r['windows']['validation'])}. "
        f"{s['steps']} distillation steps of {s['batch_size']} x {s['seq_len']} tokens per student. Teacher "
        f"perplexity {r['teacher']['test']['perplexity']:.2f}.",
        "",
        "| student | params | active | layers (M/E/*) | hidden | experts | expert width | shared width "
        "| KL before | after | perplexity before | after | agreement before | after |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, row in r["students"].items():
        b, w, k = row["before"], row["widths"], row["layers"]
        a = row["after"] or {key: float("nan") for key in b}
        lines.append(
            f"| {name} | {row['params']:.3f} | {row['active']:.3f} | {k['mamba']}/{k['moe']}/{k['attention']} | "
            f"{w['hidden']} | {w['experts']} | {w['expert_ffn']} | {w['shared_ffn']} | {b['kl_to_teacher']:.3f} | "
            f"{a['kl_to_teacher']:.3f} | {b['perplexity']:.2f} | {a['perplexity']:.2f} | {b['agreement']:.3f} | "
            f"{a['agreement']:.3f} |"
        )
    secs = ", ".join(f"{k} {v:.1f} s" for k, v in r["estimator_scoring_seconds"].items())
    lines += ["", f"Scoring the experts alone on the calibration windows: {secs}."]
    lines += [f"No {name} layout meets the budget: {why}" for name, why in r.get("infeasible", {}).items()]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
