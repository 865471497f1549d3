"""Train the demo teacher: a ~6M-parameter Nemotron-H (layer pattern shaped like the 56B's, scaled down) on the
Python standard library's source files, with a byte-level BPE tokenizer trained on the same files.

The result is committed at minipuzzle/assets/demo-teacher (bf16 safetensors, ~12 MB) so the demo runs offline.
Held-out files (HELD_OUT) are never trained on; the demo evaluates on them.

    python scripts/train_demo_teacher.py            # 350 steps, ~17 min on 2 idle CPU cores
"""

from __future__ import annotations

import argparse
import json
import math
import sysconfig
import time
from pathlib import Path

import torch

from minipuzzle.data import iter_documents, iter_tokens, pack, train_bpe_tokenizer
from minipuzzle.presets import DEMO_LAYOUT
from minipuzzle.testing import save_model

HELD_OUT = (
    "argparse.py",
    "calendar.py",
    "difflib.py",
    "fractions.py",
    "heapq.py",
    "shlex.py",
    "string.py",
    "textwrap.py",
)
OUT = Path(__file__).resolve().parents[1] / "minipuzzle" / "assets" / "demo-teacher"


def stdlib() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def train_tokenizer(vocab_size: int):
    files = sorted(p for p in stdlib().iterdir() if p.suffix == ".py" and p.name not in HELD_OUT)
    return train_bpe_tokenizer(files, vocab_size)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=350)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    torch.manual_seed(args.seed)

    tok = train_tokenizer(DEMO_LAYOUT.vocab_size)
    docs = iter_documents(stdlib(), exclude=HELD_OUT, include=None)
    windows = torch.tensor(list(pack(iter_tokens(tok, docs), args.seq_len + 1)))
    held = torch.tensor(list(pack(iter_tokens(tok, iter_documents(stdlib(), include=HELD_OUT)), args.seq_len + 1)))
    print(f"train windows {len(windows)} ({windows.numel():,} tokens), held-out windows {len(held)}")

    from transformers import NemotronHForCausalLM

    cfg = DEMO_LAYOUT.to_hf_config({"chunk_size": 64, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0})
    model = NemotronHForCausalLM(cfg)
    print(f"parameters: {model.num_parameters():,}")
    decay = [p for n, p in model.named_parameters() if p.ndim == 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim != 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.95),
    )
    warm = max(1, args.steps // 20)

    def lr_at(step: int) -> float:
        if step < warm:
            return args.lr * (step + 1) / warm
        return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warm) / (args.steps - warm))))

    gen = torch.Generator().manual_seed(args.seed)
    t0 = time.time()
    model.train()
    for step in range(args.steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        batch = windows[torch.randint(len(windows), (args.batch_size,), generator=gen)]
        out = model(batch[:, :-1])
        loss = torch.nn.functional.cross_entropy(
            out.logits[:, :-1].reshape(-1, out.logits.shape[-1]).float(), batch[:, 1:-1].reshape(-1)
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 25 == 0 or step == args.steps - 1:
            print(f"step {step:5d}  loss {loss.item():.3f}  lr {lr_at(step):.2e}  {time.time() - t0:6.0f}s", flush=True)
    model.eval()
    with torch.no_grad():
        losses = [
            torch.nn.functional.cross_entropy(model(w[None, :-1]).logits[0].float(), w[1:]).item() for w in held[:64]
        ]
    held_loss = sum(losses) / len(losses)
    print(f"held-out loss {held_loss:.3f} (perplexity {math.exp(held_loss):.1f})")
    model = model.to(torch.bfloat16)
    save_model(model, args.out, tokenizer=tok, overwrite=True)
    (args.out / "training.json").write_text(
        json.dumps(
            {
                "steps": args.steps,
                "batch_size": args.batch_size,
                "seq_len": args.seq_len,
                "lr": args.lr,
                "seed": args.seed,
                "held_out_files": list(HELD_OUT),
                "held_out_loss": held_loss,
                "train_tokens": args.steps * args.batch_size * args.seq_len,
                "seconds": time.time() - t0,
            },
            indent=2,
        )
    )
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
