"""Rows per second through the hooked width pass vs a plain `model(input_ids)` forward on the same rows.

The width pass runs layer by layer with forward hooks for every axis (FFN, Mamba heads and channels, attention
heads, hidden); it skips the LM head, which the plain forward computes. A third line runs the same layerwise
path without hooks to isolate what the hooks cost.

    python benchmarks/importance_throughput.py [--rows 16] [--seq-len 128] [--hidden 256]
"""

import argparse
import time

import torch

from minipuzzle.score.layerwise import ModelStack, iter_layerwise
from minipuzzle.score.width import width_scores
from minipuzzle.testing import random_model, tiny_layout


def best_of(fn, repeat=3):
    out = []
    for _ in range(repeat):
        t = time.process_time()
        fn()
        out.append(time.process_time() - t)
    return min(out)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--hidden", type=int, default=256)
    args = ap.parse_args()
    torch.set_num_threads(2)
    h = args.hidden
    layout = tiny_layout(
        pattern="M-M-*-M-M-M-*-", hidden_size=h, intermediate_size=4 * h, mamba_num_heads=8, mamba_head_dim=h // 8,
        num_attention_heads=8, head_dim=h // 8, vocab_size=1024,
    )  # fmt: skip
    model = random_model(layout)
    ids = torch.randint(0, layout.vocab_size, (args.rows, args.seq_len))
    bs = 8

    def plain():
        with torch.no_grad():
            for s in range(0, len(ids), bs):
                model(ids[s : s + bs])

    def layerwise():
        for _ in iter_layerwise(ModelStack(model), ids, batch_size=bs):
            pass

    def hooked():
        width_scores(ModelStack(model), ids, batch_size=bs)

    plain()
    t_plain, t_layer, t_hook = best_of(plain), best_of(layerwise), best_of(hooked)
    n = args.rows
    print(f"{len(layout.pattern)} layers, hidden {h}, {n} rows x {args.seq_len} tokens, batch {bs}, float32 CPU")
    print(f"plain model(input_ids):       {n / t_plain:8.2f} rows/s")
    print(f"layerwise, no hooks:          {n / t_layer:8.2f} rows/s")
    print(
        f"width pass, hooks on all axes:{n / t_hook:8.2f} rows/s  ({t_hook / t_plain - 1:+.1%} time vs plain, "
        f"{t_hook / t_layer - 1:+.1%} vs no hooks)"
    )


if __name__ == "__main__":
    main()
