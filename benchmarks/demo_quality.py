"""Does importance-guided pruning beat the baselines? The demo teacher, pruned to the 56B->47B parameter ratio.

The demo recipe's held-out standard-library files (never trained on) are split in two: validation files (the
even-numbered ones, sorted by name), on which the MiniPuzzle candidate is chosen, and test files (the odd-numbered
ones), on which every reported figure is measured. Compares, each with the same distillation budget:
- the importance-pruned student (MiniPuzzle: drop-one MSE depth scores + Minitron FFN channel scores, candidates
  ranked on held-out tokens), before and after distillation;
- random pruning to the same architecture (random layers of each kind, random FFN channels);
- layers chosen by block influence (1 - cos(layer input, output), ModelOpt's / ShortGPT's depth metric), same
  architecture and FFN channels chosen by the same activation scores;
- the same architecture trained from scratch (random init) with the same distillation loss and tokens;
- at the same budget, the best depth-only layout (every width kept) and the best width-only layout (every layer
  kept), each chosen by measured KL on the validation files among its family's best layouts by predicted damage:
  does the chosen mix of depth and width beat both trade-offs, before and after the same distillation?
and the ranking of the measured candidates (`prune`'s set: none dominated, the best of each family) before vs
after a short distillation.

    python benchmarks/demo_quality.py                 # ~15 min on 2 CPU cores; writes benchmarks/results/
    python benchmarks/demo_quality.py --steps 20      # quicker, noisier
    python benchmarks/demo_quality.py --smoke --output /tmp/dq   # a minute: checks the script, figures meaningless
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import torch

from minipuzzle.arch import ATTENTION, MAMBA, MLP, Layout
from minipuzzle.checkpoint.build import load_model
from minipuzzle.checkpoint.resolve import resolve_checkpoint
from minipuzzle.checkpoint.write import save_state_dict
from minipuzzle.cut import Plan, cut_model
from minipuzzle.data import load_tokenizer, token_windows
from minipuzzle.distill.loop import distill
from minipuzzle.metrics import token_stats
from minipuzzle.score.scoring import score_model
from minipuzzle.search.damage import DamageModel
from minipuzzle.search.diversity import families
from minipuzzle.search.plan import choose_units
from minipuzzle.search.solver import search
from minipuzzle.search.stage import PruneSettings, measured_candidates
from minipuzzle.settings import DistillSettings

RESULTS = Path(__file__).resolve().parent / "results"
RATIO = 46.792 / 56.324  # Nemotron-H 47B / 56B parameters


def held_out_files() -> list[str]:
    import yaml

    recipe = yaml.safe_load((Path(__file__).resolve().parents[1] / "recipes" / "demo.yaml").read_text())
    return recipe["data"]["held_out_files"]


def split_held_out(files: list[str]) -> tuple[list[str], list[str]]:
    """(validation, test): alternate files of the sorted held-out list, so both sets are disjoint whole files."""
    names = sorted(files)
    return names[0::2], names[1::2]


def data_folders(root: Path) -> tuple[Path, Path, Path]:
    """train/, validation/ and test/ folders of links into the standard library (the demo recipe's split, its
    held-out files divided by `split_held_out`)."""
    src = Path(sysconfig.get_paths()["stdlib"])
    val_files, test_files = map(set, split_held_out(held_out_files()))
    folders = {name: root / name for name in ("train", "validation", "test")}
    for f in folders.values():
        f.mkdir(parents=True)
    for f in sorted(src.glob("*.py")):
        name = "validation" if f.name in val_files else "test" if f.name in test_files else "train"
        folders[name].joinpath(f.name).symlink_to(f)
    return folders["train"], folders["validation"], folders["test"]


def random_plan(layout: Layout, like: Plan, seed: int) -> Plan:
    """The same architecture as `like` (layer counts per kind, FFN width) with random layers and channels."""
    rng = random.Random(seed)
    layers = []
    for kind in (MAMBA, MLP, ATTENTION):
        have = [i for i, ch in enumerate(layout.pattern) if ch == kind]
        n = sum(1 for i in like.layers if layout.pattern[i] == kind)
        layers += rng.sample(have, n)
    layers.sort()
    ffn = None
    if like["ffn"]:
        width = len(next(iter(like["ffn"].values())))
        ffn = {
            i: sorted(rng.sample(range(layout.intermediate_size), width)) for i in layers if layout.pattern[i] == MLP
        }
    return Plan(layers=layers, ffn=ffn)


def save(model, path: Path, tokenizer_dir: Path) -> Path:
    layout = Layout.from_config(model.config)
    return save_state_dict(model.state_dict(), layout, path, base_config=model.config.to_dict(),
                           tokenizer_from=tokenizer_dir)  # fmt: skip


def run_distill(teacher: Path, student: Path, out: Path, train: Path, held: Path, steps: int, args) -> Path:
    cfg = DistillSettings(
        teacher=str(teacher), student=str(student), data=str(train), output=str(out), max_steps=steps,
        seq_len=args.seq_len, batch_size=args.batch_size, lr=args.lr, warmup=max(1, steps // 16),
        save_every=10**9, eval_every=0, eval_data=str(held), seed=args.seed, progress=False,
    )  # fmt: skip
    return distill(cfg)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=80, help="distillation steps for each student")
    ap.add_argument("--candidate-steps", type=int, default=20, help="short distillation of each candidate")
    ap.add_argument("--candidates", type=int, default=3)
    ap.add_argument("--family-candidates", type=int, default=4,
                    help="best layouts by predicted damage of each one-axis family measured on validation")  # fmt: skip
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=2e-4, help="the demo recipe's LR")
    ap.add_argument("--held-out-windows", type=int, default=48, help="windows of each of validation and test")
    ap.add_argument("--calibration-windows", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--output", type=Path, default=RESULTS, help="folder for demo_quality.json")
    ap.add_argument("--smoke", action="store_true", help="1 step each, 4 windows, 2 candidates: checks the script")
    args = ap.parse_args()
    if args.smoke:
        args.steps = args.candidate_steps = 1
        args.candidates, args.held_out_windows, args.calibration_windows, args.family_candidates = 2, 4, 8, 2
    torch.manual_seed(args.seed)
    t0 = time.time()
    teacher_dir = resolve_checkpoint("demo")
    tok = load_tokenizer(teacher_dir)
    teacher = load_model(teacher_dir)
    layout = Layout.from_config(teacher.config)
    work = Path(tempfile.mkdtemp(prefix="demo-quality-"))
    train, val_dir, test_dir = data_folders(work / "data")
    val = token_windows(val_dir, tok, args.seq_len, args.held_out_windows, seed=args.seed)
    test = token_windows(test_dir, tok, args.seq_len, args.held_out_windows, seed=args.seed)
    calib = token_windows(train, tok, args.seq_len, args.calibration_windows, seed=args.seed)

    def measure(model, windows=test) -> dict:
        s = token_stats(model, windows, teacher=teacher)
        return {k: round(s[k], 4) for k in ("kl_to_teacher", "perplexity", "agreement", "accuracy")}

    val_files, test_files = split_held_out(held_out_files())
    results: dict = {
        "settings": {**vars(args), "output": str(args.output)},
        "windows": {
            "validation": {"files": val_files, "windows": len(val), "use": "choosing the MiniPuzzle candidate"},
            "test": {"files": test_files, "windows": len(test), "use": "every figure in the students table"},
            "seq_len": args.seq_len,
        },
        "teacher": measure(teacher),
        "teacher_validation": measure(teacher, val),
        "teacher_perplexity_note": teacher_note(teacher_dir, teacher, args),
    }
    print("teacher", results["teacher"], flush=True)

    # Importance scores (MiniPuzzle depth metric) and block influence (the baseline's depth metric).
    scores = score_model(teacher, calib[:32], calib, axes=("depth", "ffn"), depth_metric="mse_hidden", progress=False)
    bi = score_model(teacher, calib[:32], None, axes=("depth",), depth_metric="block_influence", progress=False)
    settings = PruneSettings(target=str(RATIO), axes=("depth", "ffn"),
                             candidates=args.candidates)  # fmt: skip
    space, dmodel, cands = measured_candidates(layout, scores, settings)
    plans = [choose_units(c, dmodel, scores) for c in cands]
    # Chosen on validation windows; the test windows are only reported on.
    before = [measure(cut_model(teacher, p), val) for p in plans]
    best = min(range(len(plans)), key=lambda i: before[i]["kl_to_teacher"])
    plan = plans[best]
    refs = family_references(space, dmodel, scores, settings.budget_for(layout), teacher, val, measure, args)
    results["family_references"] = {
        name: {**describe(r["candidates"][r["best"]]), "validation_kl": r["validation_kl"], "chosen": r["best"]}
        for name, r in refs.items()
    }
    arch = plan.target_layout(layout)
    results["architecture"] = {
        "teacher": {"pattern": layout.pattern, "params": layout.num_params(), "ffn": layout.intermediate_size},
        "student": {"pattern": arch.pattern, "params": arch.num_params(), "ffn": arch.intermediate_size},
        "ratio": round(arch.num_params() / layout.num_params(), 4),
    }
    print("student", results["architecture"]["student"], flush=True)

    # Block influence: keep the layers BI ranks highest in each kind, the same counts; FFN channels as the method.
    bi_scores = type(scores)(pattern=scores.pattern, depth=bi["depth"], ffn=scores["ffn"])
    bi_plan = choose_units(cands[best], DamageModel(bi_scores, space), bi_scores)
    students = {"importance (MiniPuzzle)": cut_model(teacher, plan)}
    same_as_chosen = {}
    for name, r in refs.items():
        if r["candidates"][r["best"]].key() == cands[best].key():
            same_as_chosen[f"best {name}"] = "importance (MiniPuzzle)"  # measured once, reported twice
        else:
            students[f"best {name}"] = cut_model(teacher, r["plans"][r["best"]])
    students |= {
        "random pruning": cut_model(teacher, random_plan(layout, plan, args.seed)),
        "block influence layers": cut_model(teacher, bi_plan),
    }
    from minipuzzle.checkpoint.build import build_model

    torch.manual_seed(args.seed)
    students["from scratch"] = build_model(arch, teacher.config.to_dict(), device="cpu")  # transformers' own init
    rows = {}
    for name, model in students.items():
        src = save(model, work / "students" / name.replace(" ", "_").replace("(", "").replace(")", ""), teacher_dir)
        b = measure(model)
        out = run_distill(teacher_dir, src, work / "distilled" / src.name, train, val_dir, args.steps, args)
        a = measure(load_model(out))
        rows[name] = {"before": b, "after": a}
        print(f"{name}: before {b}  after {a}", flush=True)
    for name, same in same_as_chosen.items():
        rows[name] = {**rows[same], "same_as": same}
    results["students"] = rows
    measured = {"validation_kl": [b["kl_to_teacher"] for b in before]}  # of every measured candidate
    results["layouts"] = {"importance (MiniPuzzle)": describe(cands[best]) | measured} | {
        f"best {name}": describe(r["candidates"][r["best"]]) for name, r in refs.items()
    }
    results["block_influence_layers"] = bi_plan.layers
    results["importance_layers"] = plan.layers

    # Candidate ranking before vs after a short distillation (the paper saw the order change).
    ranking = []
    for i, p in enumerate(plans):
        src = save(cut_model(teacher, p), work / "cands" / f"c{i}", teacher_dir)
        out = run_distill(
            teacher_dir, src, work / "cands_distilled" / f"c{i}", train, val_dir, args.candidate_steps, args
        )
        after = measure(load_model(out), val)
        ranking.append({"candidate": i, "counts": cands[i].counts, "widths": {"ffn": cands[i].widths["ffn"]},
                        "why": cands[i].extra["why"], "family": cands[i].extra["family"],
                        "predicted_damage": round(cands[i].damage, 4), "kl_before": before[i]["kl_to_teacher"],
                        "kl_after": after["kl_to_teacher"]})  # fmt: skip
    for key in ("kl_before", "kl_after"):
        order = sorted(range(len(ranking)), key=lambda j: ranking[j][key])
        for r, j in enumerate(order):
            ranking[j]["rank_" + key.split("_")[1]] = r + 1
    results["candidate_ranking"] = ranking
    results["seconds"] = round(time.time() - t0)
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "demo_quality.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    print(markdown(results))


def family_references(space, dmodel, scores, budget, teacher, val, measure, args) -> dict:
    """For the depth-only and width-only families: their best `args.family_candidates` maximal layouts by
    predicted damage (`search` held to the family), cut and measured on the validation windows; "best" is the one
    of least validation KL."""
    out = {}
    for name in ("depth only", "width only"):
        family = families(space).get(name)
        found = search(space, budget, dmodel, args.family_candidates, band=0.0, family=family[0]) if family else []
        if not found:
            continue
        plans = [choose_units(c, dmodel, scores) for c in found]
        kl = [measure(cut_model(teacher, p), val)["kl_to_teacher"] for p in plans]
        out[name] = {"candidates": found, "plans": plans, "validation_kl": kl,
                     "best": min(range(len(kl)), key=lambda i: (kl[i], i))}  # fmt: skip
        print(name, [describe(c) for c in found], kl, flush=True)
    return out


def describe(c) -> dict:
    return {"counts": c.counts, "ffn": c.widths["ffn"], "params": c.params, "predicted_damage": round(c.damage, 4)}


def teacher_note(teacher_dir: Path, teacher, args) -> str:
    """Which windows and dtype each quoted teacher perplexity uses (they differ, so the figures differ)."""
    import math

    here = (f"here: {args.held_out_windows} seeded random windows of {args.seq_len} tokens of the test files, "
            f"weights {next(teacher.parameters()).dtype} (the bf16 checkpoint upcast), no autocast")  # fmt: skip
    f = teacher_dir / "training.json"
    if not f.is_file():
        return here
    t = json.loads(f.read_text())
    return (
        f"{here}; training.json's held_out_loss {t['held_out_loss']:.3f} (perplexity "
        f"{math.exp(t['held_out_loss']):.1f}): the first 64 windows of {t['seq_len'] + 1} tokens of all held-out "
        f"files in name order (argparse.py alone fills them), float32 weights before the bf16 save"
    )


def markdown(r: dict) -> str:
    w = r["windows"]
    lines = [
        f"Test (every figure in the first table): {w['test']['windows']} windows x {w['seq_len']} tokens of "
        f"{', '.join(w['test']['files'])}. Validation (choosing the MiniPuzzle candidate, the second table): "
        f"{w['validation']['windows']} windows of {', '.join(w['validation']['files'])}. Student: "
        f"{r['architecture']['student']['params']:,} parameters ({r['architecture']['ratio']:.1%} of the teacher), "
        f"{r['settings']['steps']} distillation steps each.",
        f"Teacher perplexity: {r['teacher_perplexity_note']}.",
        "",
        "| model | KL to teacher before | after | perplexity before | after | agreement before | after |",
        "|---|---|---|---|---|---|---|",
        f"| teacher | 0 | | {r['teacher']['perplexity']:.2f} | | 1 | |",
    ]
    for name, row in r["students"].items():
        b, a = row["before"], row["after"]
        same = f" (= {row['same_as']})" if "same_as" in row else ""
        lines.append(
            f"| {name}{same} | {b['kl_to_teacher']:.4f} | {a['kl_to_teacher']:.4f} | {b['perplexity']:.2f} | "
            f"{a['perplexity']:.2f} | {b['agreement']:.3f} | {a['agreement']:.3f} |"
        )
    lines += ["", "| layout (same budget) | layers kept (M/-/*) | FFN | params | validation KL of the layouts it was "
              "chosen among (prune's measured set; its family's best by predicted damage) |",
              "|---|---|---|---|---|"]  # fmt: skip
    for name, lay in r["layouts"].items():
        k = lay["counts"]
        ref = r["family_references"].get(name.removeprefix("best "), lay)
        kls = ", ".join(f"{x:.4f}" for x in ref.get("validation_kl", []))
        lines.append(f"| {name} | {k.get('M')}/{k.get('-')}/{k.get('*')} | {lay['ffn']} | {lay['params']:,} | {kls} |")
    lines += ["", "| candidate | why measured | layers kept (M/-/*) | FFN | validation KL before (rank) | after short "
              "distillation (rank) |", "|---|---|---|---|---|---|"]  # fmt: skip
    for c in r["candidate_ranking"]:
        k = c["counts"]
        lines.append(
            f"| {c['candidate']} | {c['why']} | {k.get('M')}/{k.get('-')}/{k.get('*')} | {c['widths']['ffn']} | "
            f"{c['kl_before']:.4f} ({c['rank_before']}) | {c['kl_after']:.4f} ({c['rank_after']}) |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
