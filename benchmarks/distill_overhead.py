"""Distillation step time vs (student training step + teacher forward), timed separately in the same run.

    python benchmarks/distill_overhead.py [--hidden 256 --vocab 8192 --seq-len 512 --batch 4 --repeats 7]

The distillation step is what the loop runs: teacher forward (no grad) and student forward to their final
norms, the chunked KL over both heads (checkpointed: each chunk's logits are recomputed in the backward), backward,
clipping and AdamW. The baseline is a plain student LM step (full logits, cross-entropy, backward, clipping,
AdamW) plus a plain teacher forward with full logits. Steps are interleaved and the median is reported, so a
load spike on a shared machine hits all three alike. Prints one JSON line with the times and the ratio.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from minipuzzle.distill.losses import DistillObjective
from minipuzzle.distill.toy import drop_layers
from minipuzzle.testing import random_model, tiny_layout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--chunk", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dev = torch.device(args.device)

    h = args.hidden
    layout = tiny_layout(hidden_size=h, intermediate_size=3 * h, num_attention_heads=h // 16, num_key_value_heads=2,
                         head_dim=16, mamba_num_heads=h // 16, mamba_head_dim=32, vocab_size=args.vocab)  # fmt: skip
    teacher = random_model(layout, seed=0).to(dev)
    student = drop_layers(teacher, [0, 1, 2, 4, 5, 7, 8, 9]).to(dev).train()
    obj = DistillObjective(student, teacher, chunk=args.chunk)
    opt = torch.optim.AdamW(student.parameters(), lr=1e-5)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq_len), device=dev)
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16) if dev.type == "cuda" else torch.autocast("cpu", enabled=False)
    )

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def distill_step():
        with autocast:
            loss = obj(ids)["loss"]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    def student_step():
        with autocast:
            loss = student(ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    @torch.no_grad()
    def teacher_forward():
        with autocast:
            teacher(ids).logits.float()

    steps = {"distill": distill_step, "student_train": student_step, "teacher_forward": teacher_forward}
    times: dict[str, list[float]] = {k: [] for k in steps}
    for f in steps.values():  # warm-up
        f()
    for _ in range(args.repeats):
        for name, f in steps.items():
            sync()
            t0 = time.perf_counter()
            f()
            sync()
            times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    ratio = med["distill"] / (med["student_train"] + med["teacher_forward"])
    print(json.dumps({"device": str(dev), "threads": args.threads, "hidden": h, "vocab": args.vocab,
                      "tokens_per_step": args.batch * args.seq_len, "median_s": med,
                      "ratio_distill_over_student_plus_teacher": round(ratio, 3)}))  # fmt: skip


if __name__ == "__main__":
    main()
