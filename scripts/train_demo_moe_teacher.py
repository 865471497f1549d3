"""Train the MoE demo teacher: a Nemotron 3-shaped model in miniature (Mamba-2 layers, mixture-of-experts layers
with a shared expert and sigmoid top-k routing with the score-correction bias, sparse attention) on the Python
standard library's source files, with the dense demo teacher's tokenizer (so the same data options work).

The result is committed at minipuzzle/assets/demo-moe-teacher (bf16 safetensors) so `demo-moe` runs offline. The
dense demo's held-out files are never trained on; the MoE demo and benchmarks/moe_quality.py evaluate on them.

The routers' `e_score_correction_bias` is a buffer, not a parameter: as in DeepSeek-V3's auxiliary-loss-free
balancing (which Nemotron 3 uses), after each step it moves by `--bias-rate` towards under-loaded experts
(sign of mean load minus the expert's load), so the shipped bias is a real, trained one, not zeros.

    python scripts/train_demo_moe_teacher.py --steps 800 --batch-size 16 --seq-len 256 --minutes 38

0.33 s per step of 8 x 128 tokens on 2 idle cores; on a shared machine the --minutes budget ends it early (see
training.json for the steps it took and the wall time).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
from train_demo_teacher import HELD_OUT, stdlib

from minipuzzle.data import iter_documents, iter_tokens, load_tokenizer, pack
from minipuzzle.presets import ASSETS, DEMO_MOE_LAYOUT
from minipuzzle.testing import save_model

OUT = ASSETS / "demo-moe-teacher"


def routers(model) -> list:
    return [m for m in model.modules() if type(m).__name__ == "NemotronHTopkRouter"]


def count_loads(model) -> dict:
    """Hooks on every router that add each step's per-expert token counts to a [experts] tensor per router."""
    loads: dict = {}

    def hook(mod, _inp, out):
        idx = out[2]  # top-k expert indices, [tokens, k]
        loads[mod] = loads.get(mod, 0) + torch.bincount(idx.reshape(-1), minlength=mod.num_experts)

    for r in routers(model):
        r.register_forward_hook(hook)
    return loads


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=400, help="at most this many steps")
    ap.add_argument(
        "--minutes",
        type=float,
        default=45.0,
        help="wall-time budget: the LR schedule runs on the larger of the step and time fractions and "
        "training stops when either is spent (the machine it trains on is shared)",
    )
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument(
        "--bias-rate",
        type=float,
        default=5e-3,
        help="correction-bias step per update (DeepSeek-V3's u is 1e-3 over far more steps)",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--note", default="", help="how the machine was shared while it trained (goes into training.json)")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    torch.manual_seed(args.seed)

    tok = load_tokenizer(ASSETS / "demo-teacher")
    docs = iter_documents(stdlib(), exclude=HELD_OUT, include=None)
    windows = torch.tensor(list(pack(iter_tokens(tok, docs), args.seq_len + 1)))
    held = torch.tensor(list(pack(iter_tokens(tok, iter_documents(stdlib(), include=HELD_OUT)), args.seq_len + 1)))
    print(f"train windows {len(windows)} ({windows.numel():,} tokens), held-out windows {len(held)}")

    from transformers import NemotronHForCausalLM

    # Nano 3's router settings: renormalised top-k weights scaled by 2.5.
    base = {"chunk_size": 64, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "routed_scaling_factor": 2.5,
            "norm_topk_prob": True}  # fmt: skip
    model = NemotronHForCausalLM(DEMO_MOE_LAYOUT.to_hf_config(base))
    print(f"parameters: {model.num_parameters():,} (layout: {DEMO_MOE_LAYOUT.num_params():,} total, "
          f"{DEMO_MOE_LAYOUT.num_active_params():,} active)")  # fmt: skip
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.95),
    )

    def lr_at(step: int) -> float:
        """Linear warmup over the first 5 % of the run, then a cosine to 10 %; the run's progress is the larger of
        its step and time fractions, so the schedule completes whichever budget ends it."""
        frac = min(1.0, max((step + 1) / args.steps, (time.time() - t0) / (args.minutes * 60)))
        if frac < 0.05:
            return args.lr * frac / 0.05
        return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (frac - 0.05) / 0.95)))

    loads = count_loads(model)
    gen = torch.Generator().manual_seed(args.seed)
    t0 = time.time()
    model.train()
    steps = 0
    for step in range(args.steps):
        if time.time() - t0 > args.minutes * 60:
            break
        steps = step + 1
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        batch = windows[torch.randint(len(windows), (args.batch_size,), generator=gen)]
        loads.clear()
        out = model(batch[:, :-1])
        loss = torch.nn.functional.cross_entropy(
            out.logits[:, :-1].reshape(-1, out.logits.shape[-1]).float(), batch[:, 1:-1].reshape(-1)
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            for r, load in loads.items():
                r.e_score_correction_bias += args.bias_rate * torch.sign(load.float().mean() - load.float())
        if step % 5 == 0 or step == args.steps - 1:
            imb = max((ld.max().item() / ld.float().mean().item() for ld in loads.values()), default=0.0)
            print(f"step {step:5d}  loss {loss.item():.3f}  lr {lr_at(step):.2e}  max load/mean {imb:.2f}  "
                  f"{time.time() - t0:6.0f}s", flush=True)  # fmt: skip
    seconds = time.time() - t0
    model.eval()
    loads.clear()
    with torch.no_grad():
        losses = [
            torch.nn.functional.cross_entropy(model(w[None, :-1]).logits[0].float(), w[1:]).item() for w in held[:32]
        ]
    held_loss = sum(losses) / len(losses)
    held_imbalance = max(ld.max().item() / ld.float().mean().item() for ld in loads.values())
    print(f"held-out loss {held_loss:.3f} (perplexity {math.exp(held_loss):.1f}), max load/mean {held_imbalance:.2f}")
    model = model.to(torch.bfloat16)
    save_model(model, args.out, tokenizer=tok, overwrite=True)
    (args.out / "training.json").write_text(
        json.dumps(
            {
                "steps": steps,
                "max_steps": args.steps,
                "minutes_budget": args.minutes,
                "batch_size": args.batch_size,
                "seq_len": args.seq_len,
                "lr": args.lr,
                "bias_rate": args.bias_rate,
                "seed": args.seed,
                "held_out_files": list(HELD_OUT),
                "held_out_loss": held_loss,
                "held_out_max_expert_load_over_mean": held_imbalance,
                "train_tokens": steps * args.batch_size * args.seq_len,
                "seconds": seconds,
                "note": args.note,
            },
            indent=2,
        )
    )
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
