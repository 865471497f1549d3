"""What does quantization cost on top of pruning? The demo teacher's pruned + distilled student, quantized with
Model Optimizer (post-training, calibrated on training text), measured against the teacher on held-out files.

The student is the final model of `minipuzzle run demo` (recipes/demo.yaml: importance, search at the 56B->47B
parameter ratio, the cut, 80 distillation steps); pass --run DIR to reuse a finished run, else the script runs it.
Every figure is measured on the test half of the demo's held-out standard-library files (benchmarks/
demo_quality.py's split: calendar, fractions, shlex, textwrap), float32 compute: KL(teacher || model) in nats
per token with its standard error over windows, perplexity, agreement with the teacher's greedy token. The
quantized models are the exported checkpoints reloaded as `minipuzzle eval` loads them (weights as stored, inputs
rounded with the stored scales). NVFP4 runs only where CUDA is (Model Optimizer simulates its block scales on
CUDA only); without it its row says so.

QAD rows (quantization-aware distillation, `distill --quantize`) compare QAD with PTQ at the same token budget:
both continue from the distilled student for --qad-steps more distillation steps with the demo recipe's distill
settings (batch, sequence length) at the learning rate its run ended at, constant, on the demo's training text. "student
fp8 QAD" trains those steps through FP8 fake quantizers (calibrated on the first training batch) and exports the
FP8 checkpoint; the reference "student +N fp8 PTQ" is the same student distilled the same steps without
quantization, then quantized post-training as above (calibrated on --calibration-windows windows of training
text). "student +N bf16" is that reference before quantization. NVFP4 QAD needs CUDA; on the CPU its row says so.

    python benchmarks/quantize_quality.py --run runs/demo          # reuse a demo run; ~5 min on 2 CPU cores
    python benchmarks/quantize_quality.py --teacher-only            # the teacher's rows alone, no demo run
    python benchmarks/quantize_quality.py --smoke --output /tmp/qq # a tiny run: checks the script
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from demo_quality import data_folders  # noqa: E402

from minipuzzle.checkpoint.build import load_model  # noqa: E402
from minipuzzle.checkpoint.resolve import resolve_checkpoint  # noqa: E402
from minipuzzle.data import load_tokenizer, token_windows  # noqa: E402
from minipuzzle.distill.loop import distill  # noqa: E402
from minipuzzle.evaluate.runner import held_out_stats  # noqa: E402
from minipuzzle.quantize.folder import quantize_to_folder  # noqa: E402
from minipuzzle.quantize.load import load_quantized  # noqa: E402
from minipuzzle.recipe import load_recipe  # noqa: E402
from minipuzzle.settings import QuantizeSettings  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def demo_run(run: Path | None, work: Path, smoke: bool) -> Path:
    """The folder of a finished demo run (its distill/ is the student): `run`, or one made now."""
    if run is not None:
        if not (run / "distill" / "config.json").is_file():
            sys.exit(f"{run} has no distill/ checkpoint: pass a finished `minipuzzle run demo` folder")
        return run
    from minipuzzle.runner import run as run_recipe

    recipe = load_recipe("demo")
    if smoke:
        recipe = recipe.model_copy(update={
            "score": recipe.score.model_copy(update={"depth_samples": 4, "width_samples": 4}),
            "prune": recipe.prune.model_copy(update={"candidates": 1, "held_out_windows": 2,
                                                      "candidate_distill_tokens": None}),
            "distill": recipe.distill.model_copy(update={"max_steps": 2, "save_every": 2, "eval_every": 2}),
            "eval": recipe.eval.model_copy(update={"held_out_windows": 2, "speed": False}),
        })  # fmt: skip
    run_recipe(recipe, work / "demo-run", progress=False)
    return work / "demo-run"


def per_window(model, teacher, windows: torch.Tensor) -> dict:
    """Held-out statistics over all windows, and the KL of each window alone (for its standard error)."""
    total = held_out_stats(model, windows, teacher, batch_size=8)
    kls = [held_out_stats(model, windows[i : i + 1], teacher)["kl_to_teacher"] for i in range(len(windows))]
    mean = sum(kls) / len(kls)
    se = math.sqrt(sum((k - mean) ** 2 for k in kls) / max(1, len(kls) - 1) / len(kls))
    return {"kl": total["kl_to_teacher"], "kl_se": se, "perplexity": total["perplexity"],
            "agreement": total["agreement"], "per_window_kl": kls}  # fmt: skip


def more_distillation(teacher: Path, student: Path, train: Path, out: Path, steps: int, quantize: str | None,
                      device: str) -> Path:  # fmt: skip
    """`student` distilled `steps` more steps from `teacher` on `train` with the demo recipe's distill settings at
    the learning rate its run ended at (lr x min_lr_ratio, constant, no warmup: a schedule restarted at the peak
    first undoes part of the distillation, KL 0.0018 -> 0.0027 over 40 steps), no held-out evaluation, no
    checkpoints; with `quantize`, quantization-aware (its output is the exported quantized checkpoint)."""
    d = load_recipe("demo").distill
    cfg = d.settings(teacher=str(teacher), student=str(student), data=str(train), output=str(out), max_steps=steps,
                     lr=d.lr * d.min_lr_ratio, min_lr_ratio=1.0, warmup=0, save_every=0, eval_every=0,
                     held_out_windows=0, device=device, quantize=quantize, progress=False)  # fmt: skip
    return distill(cfg)


def qad_rows(teacher_dir: Path, student_dir: Path, train: Path, work: Path, steps: int, evaluate, quantized,
             cuda: bool) -> dict:  # fmt: skip
    """The QAD rows (module docstring): `evaluate(model)` measures a model, `quantized(src, precision, name)`
    is PTQ of checkpoint `src`."""
    device, rows = "cuda" if cuda else "cpu", {}
    t = time.time()
    more = more_distillation(teacher_dir, student_dir, train, work / "more", steps, None, device)
    extra = {"distill_s": round(time.time() - t, 1)}
    rows[f"student +{steps} bf16"] = evaluate(load_model(more, torch.float32)) | extra
    model, ptq = quantized(more, "fp8", f"student-more-{steps}-fp8")
    rows[f"student +{steps} fp8 PTQ"] = evaluate(model) | ptq | extra
    for precision in ("fp8", "nvfp4"):
        key = f"student {precision} QAD ({steps} steps)"
        if precision == "nvfp4" and not cuda:
            rows[key] = {"skipped": "needs CUDA (Model Optimizer simulates NVFP4 block scales on CUDA only)"}
            continue
        t = time.time()
        out = more_distillation(teacher_dir, student_dir, train, work / f"qad-{precision}", steps, precision, device)
        doc = json.loads((out / "quantize.json").read_text())
        model = load_quantized(out, torch.float32, device)
        rows[key] = evaluate(model) | {"bytes": doc["bytes"], "distill_s": round(time.time() - t, 1)}
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, help="a finished `minipuzzle run demo` folder (else one is made)")
    ap.add_argument("--windows", type=int, default=48, help="held-out test windows")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--calibration-windows", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--qad-steps", type=int, default=40, help="extra distillation steps of the QAD rows")
    ap.add_argument("--output", type=Path, default=RESULTS)
    ap.add_argument("--teacher-only", action="store_true", help="only the teacher's rows (no demo run needed)")
    ap.add_argument("--smoke", action="store_true", help="tiny everything: checks the script, figures meaningless")
    args = ap.parse_args()
    if args.smoke:
        args.windows, args.calibration_windows, args.qad_steps = 4, 4, 2
    torch.manual_seed(args.seed)
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        train, _, test = data_folders(work / "data")
        run = None if args.teacher_only else demo_run(args.run, work, args.smoke)
        teacher_dir = resolve_checkpoint("demo")
        student_dir = run / "distill" if run is not None else None
        tok = load_tokenizer(teacher_dir)
        windows = token_windows(test, tok, args.seq_len, args.windows, seed=args.seed)
        teacher = load_model(teacher_dir, torch.float32)
        cuda = torch.cuda.is_available()
        rows = {}

        def quantized(src: Path, precision: str, name: str):
            st = QuantizeSettings(precision=precision, samples=args.calibration_windows, seq_len=args.seq_len,
                                  seed=args.seed)  # fmt: skip
            out = work / name
            t = time.time()
            doc = quantize_to_folder(src, out, st, train, device="cuda" if cuda else "cpu", dtype="float32")
            model = load_quantized(out, torch.float32, "cuda" if cuda else "cpu")
            return model, {"bytes": doc["bytes"], "arch_weight_bytes": doc["arch_weight_bytes"],
                           "quantize_s": round(time.time() - t, 1)}  # fmt: skip

        rows["teacher bf16"] = per_window(teacher, teacher, windows)
        for src, who in ((teacher_dir, "teacher"), (student_dir, "student"))[: 1 if run is None else 2]:
            if who == "student":
                rows["student bf16"] = per_window(load_model(student_dir, torch.float32), teacher, windows)
            for precision in ("fp8", "nvfp4"):
                key = f"{who} {precision}"
                if precision == "nvfp4" and not cuda:
                    rows[key] = {"skipped": "needs CUDA (Model Optimizer simulates NVFP4 block scales on CUDA only)"}
                    continue
                model, extra = quantized(src, precision, key.replace(" ", "-"))
                rows[key] = per_window(model, teacher.to(next(model.parameters()).device), windows) | extra
                teacher = teacher.cpu()
        if run is not None:
            measure = lambda m: per_window(m, teacher.to(next(m.parameters()).device), windows)  # noqa: E731
            rows |= qad_rows(teacher_dir, student_dir, train, work, args.qad_steps, measure, quantized, cuda)
            teacher = teacher.cpu()
        layers = None if run is None else load_model(student_dir, None, "meta").config.layers_block_type
    result = {
        "rows": rows, "windows": int(len(windows)), "seq_len": args.seq_len, "seed": args.seed,
        "calibration_windows": args.calibration_windows, "qad_steps": args.qad_steps, "student_layers": layers,
        "device": "cuda" if cuda else "cpu", "elapsed_s": round(time.time() - t0, 1), "smoke": args.smoke,
        "versions": _versions(),
    }  # fmt: skip
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "quantize_quality.json").write_text(json.dumps(result, indent=2) + "\n")
    print(markdown(result))


def _versions() -> dict:
    import modelopt
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "modelopt": modelopt.__version__}


def markdown(r: dict) -> str:
    lines = ["| model | KL to teacher (± s.e.) | perplexity | agreement | weight bytes (exported) |",
             "|---|---|---|---|---|"]  # fmt: skip
    for name, row in r["rows"].items():
        if "skipped" in row:
            lines.append(f"| {name} | not run: {row['skipped']} | | | |")
            continue
        size = f"{row['bytes']['total']:,}" if "bytes" in row else ""
        size += f" (arch.py: {row['arch_weight_bytes']:,})" if "arch_weight_bytes" in row else ""
        lines.append(f"| {name} | {row['kl']:.4f} ± {row['kl_se']:.4f} | {row['perplexity']:.2f} | "
                     f"{row['agreement']:.3f} | {size} |")  # fmt: skip
    return "\n".join(lines)


if __name__ == "__main__":
    main()
