"""Speed and memory of a random Nemotron-H model and a depth-pruned copy, measured as `minipuzzle eval` does.

Prints measured prefill/decode tokens/s and peak memory next to the architecture model's parameters and FLOPs
per token, so the measured speed-up can be compared with the predicted one.

Run: python benchmarks/eval_speed.py [--hidden 256] [--batch 4] [--prompt 256] [--decode 32] [--device cpu]
"""

from __future__ import annotations

import argparse

import torch

from minipuzzle.arch import Layout
from minipuzzle.evaluate.speed import measure_speed
from minipuzzle.testing import random_model, tiny_layout


def depth_pruned(model, keep: list[int]):
    from transformers import NemotronHForCausalLM

    layout = Layout.from_config(model.config)
    small = layout.replace(pattern="".join(layout.pattern[i] for i in keep))
    pruned = NemotronHForCausalLM(small.to_hf_config(small.to_config(model.config.to_dict())))
    state = {}
    for k, v in model.state_dict().items():
        if k.startswith("model.layers."):
            i = int(k.split(".")[2])
            if i in keep:
                state[k.replace(f"model.layers.{i}.", f"model.layers.{keep.index(i)}.", 1)] = v
        else:
            state[k] = v
    pruned.load_state_dict(state)
    return pruned.eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--prompt", type=int, default=256)
    ap.add_argument("--decode", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()

    h = args.hidden
    layout = tiny_layout(
        pattern="M-M-M*-M-M-M*-M-",
        hidden_size=h,
        intermediate_size=4 * h,
        num_attention_heads=h // 32,
        num_key_value_heads=2,
        head_dim=32,
        mamba_num_heads=h // 16,
        mamba_head_dim=32,
        ssm_state_size=32,
        vocab_size=4096,
    )
    teacher = random_model(layout, seed=0).to(args.device)
    # Drop every other Mamba/MLP pair after the first attention layer: about a third of the layers.
    keep = [i for i in range(layout.num_layers) if not (6 <= i < 12 and i % 4 in (2, 3))]
    student = depth_pruned(teacher.cpu(), keep).to(args.device)
    teacher = teacher.to(args.device)
    print(
        f"device {args.device}, batch {args.batch}, prompt {args.prompt}, decode {args.decode}, {args.repeats} repeats"
    )
    print(f"{'model':8} {'layers':>6} {'params':>10} {'prefill tok/s':>14} {'decode tok/s':>13} {'peak MiB':>9} "
          f"{'FLOPs/tok':>10}")  # fmt: skip
    for name, m in (("teacher", teacher), ("pruned", student)):
        lay = Layout.from_config(m.config)
        s = measure_speed(m, args.batch, args.prompt, args.decode, args.repeats)
        flops = lay.flops_per_token(args.prompt)["prefill"]
        print(
            f"{name:8} {lay.num_layers:6d} {lay.num_params():10,d} {s['prefill_tokens_per_s']:14,.0f} "
            f"{s['decode_tokens_per_s']:13,.1f} {s['peak_memory_bytes'] / 2**20:9.0f} {flops:10.3e}"
        )


if __name__ == "__main__":
    main()
