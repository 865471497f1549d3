"""Cost of drop-one-layer depth scoring as a multiple of one plain forward pass over the same tokens.

Naive drop-one needs L + 1 passes; with prefix reuse the floor is about L/2 + 1. Prints, per depth, the measured
wall-time ratio `depth_scores` / `model(input_ids)` (`ratio`; noisy on a shared machine) and the exact number of
block applications in units of one pass (`blocks`, counted by hooks).

    python benchmarks/importance_cost.py [--rows 4] [--seq-len 128]
"""

import argparse
import time

import torch

from minipuzzle.score.depth import depth_scores
from minipuzzle.score.layerwise import ModelStack
from minipuzzle.testing import random_model, tiny_layout


def best_of(fn, repeat=2):
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--hidden", type=int, default=256)
    args = ap.parse_args()
    torch.set_num_threads(2)
    print(f"rows {args.rows}, seq_len {args.seq_len}, hidden {args.hidden}, float32 CPU")
    print(f"{'L':>4} {'forward s':>10} {'depth s':>9} {'ratio':>7} {'blocks':>7} {'L/2+1':>7} {'L+1':>5}")
    for reps in (2, 4, 8):
        pattern = ("M-*-M-M-" * reps)[: 4 * reps]
        layout = tiny_layout(
            pattern=pattern, hidden_size=args.hidden, intermediate_size=4 * args.hidden, mamba_num_heads=8,
            mamba_head_dim=args.hidden // 8, num_attention_heads=8, head_dim=args.hidden // 8,
        )  # fmt: skip
        model = random_model(layout)
        ids = torch.randint(0, layout.vocab_size, (args.rows, args.seq_len))
        with torch.no_grad():
            model(ids)  # warm-up
            fwd = best_of(lambda m=model, x=ids: m(x), repeat=3)
        dep = best_of(lambda m=model, x=ids: depth_scores(ModelStack(m), x, batch_size=args.rows), repeat=1)
        n = len(pattern)
        rows = [0]
        hooks = [
            blk.register_forward_pre_hook(lambda m, a, rows=rows: rows.__setitem__(0, rows[0] + a[0].shape[0]))
            for blk in model.model.layers
        ]
        depth_scores(ModelStack(model), ids, batch_size=args.rows)
        for hd in hooks:
            hd.remove()
        count = rows[0] / (n * args.rows)  # block applications, in units of one full pass
        print(f"{n:>4} {fwd:>10.3f} {dep:>9.3f} {dep / fwd:>7.2f} {count:>7.2f} {n / 2 + 1:>7.1f} {n + 1:>5}")


if __name__ == "__main__":
    main()
