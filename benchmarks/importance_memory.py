"""Peak memory of streamed scoring as a fraction of the checkpoint's size.

Writes a random float32 Nemotron-H checkpoint with a tiny vocabulary (default ~2.3 GB: wide MLPs) tensor by tensor,
then scores it with --stream in a fresh subprocess and reads that process's peak RSS (ru_maxrss). The baseline
(python + torch + transformers imported, nothing loaded) is reported separately.

    python benchmarks/importance_memory.py [--ffn 6144] [--rows 8] [--seq-len 128] [--keep]
"""

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, resource, sys, torch
torch.set_num_threads(2)
from minipuzzle.score.scoring import score_checkpoint
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
path, rows, seq = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
ids = torch.randint(0, 320, (rows, seq), generator=torch.Generator().manual_seed(0))
s = score_checkpoint(path, ids, ids, stream=True, progress=False, batch_size=rows)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"baseline": base, "peak": peak, "depth0": float(s['depth'][0])}))
"""


def write_checkpoint(path: Path, ffn: int) -> int:
    import torch

    from minipuzzle.checkpoint.build import build_model
    from minipuzzle.checkpoint.write import ShardWriter, write_config
    from minipuzzle.testing import tiny_config, tiny_layout

    layout = tiny_layout(
        pattern="M-M-*-" * 5, hidden_size=2048, intermediate_size=ffn, num_attention_heads=32,
        num_key_value_heads=8, head_dim=64, mamba_num_heads=32, mamba_head_dim=64, n_groups=8, ssm_state_size=64,
    )  # fmt: skip
    cfg = tiny_config(layout)
    meta = build_model(layout, cfg)  # shapes only
    path.mkdir(parents=True)
    writer = ShardWriter(path, 400 * 10**6)
    gen = torch.Generator().manual_seed(0)
    for name, p in meta.state_dict().items():
        if p.ndim == 1:
            t = torch.ones(p.shape) if not name.endswith("A_log") else torch.zeros(p.shape)
        else:
            t = torch.randn(p.shape, generator=gen) * (0.5 / p.shape[-1] ** 0.5)
        writer.add(name, t)
    writer.close()
    write_config(path, layout.to_config(cfg), torch.float32)
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ffn", type=int, default=6144)
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "ckpt"
        size = write_checkpoint(path, args.ffn)
        out = subprocess.run(
            [sys.executable, "-c", CHILD, str(path), str(args.rows), str(args.seq_len)],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        r = json.loads(out.stdout.strip().splitlines()[-1])
    gb = 1e9
    print(f"checkpoint {size / gb:.2f} GB (float32), {args.rows} rows x {args.seq_len} tokens, all axes, mse_hidden")
    print(f"baseline RSS after imports: {r['baseline'] / gb:.2f} GB")
    print(f"peak RSS: {r['peak'] / gb:.2f} GB = {r['peak'] / size:.2f} x checkpoint")
    print(
        f"peak above baseline: {(r['peak'] - r['baseline']) / gb:.2f} GB = {(r['peak'] - r['baseline']) / size:.2f} x"
    )


if __name__ == "__main__":
    main()
