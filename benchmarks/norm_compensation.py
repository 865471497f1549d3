"""Does RMSNorm compensation help? The demo teacher, hidden size pruned to the 56B->47B parameter ratio, cut with
and without sqrt(old/new) scaling of the norms that lose channels, KL to the teacher before and after the same short
distillation.

Hidden channels are scored (Minitron activation scores, on training-split windows) and the search keeps the widest
hidden size within the budget; both students keep the same channels and differ only in their norm weights. KL is
measured on windows of the held-out standard-library files (recipes/demo.yaml), never trained on; the noise figure
is the standard error of the per-window paired difference (same windows, same data order, same seed).

    python benchmarks/norm_compensation.py    # 10 min on 2 CPU cores shared with other jobs; writes benchmarks/results/
    python benchmarks/norm_compensation.py --axes hidden,depth,ffn
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import torch

# This checkout's package (not whichever minipuzzle is installed), and demo_quality's helpers beside this file.
sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]
from demo_quality import RATIO, data_folders, run_distill, save  # noqa: E402

from minipuzzle.arch import Layout  # noqa: E402
from minipuzzle.checkpoint.build import load_model  # noqa: E402
from minipuzzle.checkpoint.resolve import resolve_checkpoint  # noqa: E402
from minipuzzle.cut import cut_model  # noqa: E402
from minipuzzle.data import load_tokenizer, token_windows  # noqa: E402
from minipuzzle.metrics import forward_kl  # noqa: E402
from minipuzzle.score.scoring import score_model  # noqa: E402
from minipuzzle.search.plan import choose_units  # noqa: E402
from minipuzzle.search.stage import PruneSettings, run_search  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
ARMS = {"with compensation": True, "without compensation": False}


def logits_of(model, held: torch.Tensor, batch: int = 8) -> torch.Tensor:
    """Float32 logits [N, T, V] of `model` on the held-out windows [N, T]."""
    with torch.no_grad():
        return torch.cat(
            [model(held[i : i + batch], use_cache=False).logits.float() for i in range(0, len(held), batch)]
        )


def per_window_kl(model, teacher_logits: torch.Tensor, held: torch.Tensor) -> list[float]:
    """KL(teacher || model) in nats per token, one value per held-out window, over the positions that have a next
    token (as `minipuzzle.metrics.token_stats` counts them)."""
    s = logits_of(model, held)
    return [forward_kl(t[:-1], x[:-1]).item() / (held.shape[1] - 1) for t, x in zip(teacher_logits, s)]


def paired(a: list[float], b: list[float]) -> dict:
    """Mean of a - b over windows and its standard error."""
    d = [x - y for x, y in zip(a, b)]
    mean = sum(d) / len(d)
    se = math.sqrt(sum((x - mean) ** 2 for x in d) / (len(d) - 1) / len(d))
    return {"mean": round(mean, 5), "stderr": round(se, 5)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--axes", default="hidden", help="searched axes (compensation acts on hidden and Mamba heads)")
    ap.add_argument("--steps", type=int, default=40, help="distillation steps for each student")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=2e-4, help="the demo recipe's LR")
    ap.add_argument("--held-out-windows", type=int, default=32)
    ap.add_argument("--width-samples", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    t0 = time.time()
    teacher_dir = resolve_checkpoint("demo")
    tok = load_tokenizer(teacher_dir)
    teacher = load_model(teacher_dir).eval()
    layout = Layout.from_config(teacher.config)
    work = Path(tempfile.mkdtemp(prefix="norm-compensation-"))
    train, _validation, held_dir = data_folders(work / "data")  # figures on the test half of the held-out files
    held = token_windows(held_dir, tok, args.seq_len, args.held_out_windows, seed=args.seed)
    calib = token_windows(train, tok, args.seq_len, args.width_samples, seed=args.seed)
    teacher_logits = logits_of(teacher, held)

    axes = tuple(a.strip() for a in args.axes.split(","))
    scores = score_model(teacher, calib[:32] if "depth" in axes else None, calib, axes=list(axes),
                         depth_metric="mse_hidden", progress=False)  # fmt: skip
    settings = PruneSettings(target=str(RATIO), axes=axes, candidates=1)
    _, dmodel, cands = run_search(layout, scores, settings)
    arch = choose_units(cands[0], dmodel, scores).target_layout(layout)
    results: dict = {
        "settings": vars(args),
        "architecture": {
            "teacher": {"pattern": layout.pattern, "hidden": layout.hidden_size, "params": layout.num_params()},
            "student": {
                "pattern": arch.pattern,
                "hidden": arch.hidden_size,
                "ffn": arch.intermediate_size,
                "params": arch.num_params(),
            },  # fmt: skip
            "ratio": round(arch.num_params() / layout.num_params(), 4),
        },
        "arms": {},
    }
    print("student", results["architecture"]["student"], flush=True)
    windows: dict = {}
    for name, comp in ARMS.items():
        student = cut_model(teacher, choose_units(cands[0], dmodel, scores, norm_compensation=comp))
        before = per_window_kl(student, teacher_logits, held)
        path = save(student, work / f"cut-{comp}", teacher_dir)
        distilled = load_model(run_distill(teacher_dir, path, work / f"distilled-{comp}", train, held_dir,
                                           args.steps, args)).eval()  # fmt: skip
        after = per_window_kl(distilled, teacher_logits, held)
        windows[name] = (before, after)
        results["arms"][name] = {"kl_before": round(sum(before) / len(before), 4),
                                 "kl_after": round(sum(after) / len(after), 4)}  # fmt: skip
        print(name, results["arms"][name], f"{time.time() - t0:.0f} s", flush=True)
    (on_b, on_a), (off_b, off_a) = windows["with compensation"], windows["without compensation"]
    results["difference_without_minus_with"] = {"before": paired(off_b, on_b), "after": paired(off_a, on_a)}
    results["seconds"] = round(time.time() - t0, 1)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "norm_compensation.json").write_text(json.dumps(results, indent=2) + "\n")
    print(table(results))


def table(r: dict) -> str:
    s = r["settings"]
    rows = [
        f"Demo teacher, axes {s['axes']}, hidden {r['architecture']['teacher']['hidden']} -> "
        f"{r['architecture']['student']['hidden']} ({r['architecture']['ratio']:.3f} of the parameters); KL(teacher ||"
        f" student) in nats/token on {s['held_out_windows']} held-out windows of {s['seq_len']} tokens; distillation "
        f"{s['steps']} steps x {s['batch_size']} x {s['seq_len']} tokens, LR {s['lr']:g}.",
        "",
        "| RMSNorm weights | KL before distillation | KL after distillation |",
        "|---|---:|---:|",
    ]
    for name, a in r["arms"].items():
        rows.append(f"| {name} | {a['kl_before']:.4f} | {a['kl_after']:.4f} |")
    d = r["difference_without_minus_with"]
    rows.append(
        f"| difference (without - with), +- paired std. error | {d['before']['mean']:+.4f} +- {d['before']['stderr']:.4f}"
        f" | {d['after']['mean']:+.4f} +- {d['after']['stderr']:.4f} |"
    )
    return "\n".join(rows)


if __name__ == "__main__":
    main()
