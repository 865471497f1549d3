"""CLI: `minipuzzle distill` (teacher logits -> student), one process or under torchrun."""

from __future__ import annotations

import os
import sys
from typing import Annotated

import typer


def register(app: typer.Typer) -> None:
    @app.command()
    def distill(
        teacher: Annotated[str, typer.Option(help="Teacher checkpoint folder (or cached hub id / preset).")],
        student: Annotated[str, typer.Option(help="Student checkpoint folder (e.g. the output of `prune`).")],
        data: Annotated[str, typer.Option(help="Text: .txt/.jsonl/.parquet file, folder, or datasets hub name.")],
        output: Annotated[str, typer.Option("--output", "-o", help="Output folder for the distilled student.")],
        max_steps: Annotated[int | None, typer.Option(help="Optimizer steps (or give --tokens).")] = None,
        tokens: Annotated[str | None, typer.Option(help="Token budget (63B, 7e9): sets --max-steps.")] = None,
        seq_len: Annotated[int, typer.Option(help="Tokens per sequence.")] = 8192,
        batch_size: Annotated[int, typer.Option(help="Global batch in sequences (all processes together).")] = 8,
        grad_accum: Annotated[int, typer.Option(help="Micro-batches per step on each process.")] = 1,
        lr: Annotated[float, typer.Option(help="Peak learning rate (AdamW).")] = 1e-4,
        min_lr_ratio: Annotated[float, typer.Option(help="Final LR of the cosine schedule, as a fraction.")] = 0.1,
        warmup: Annotated[int, typer.Option(help="Linear warmup steps (capped at 10% of the run, with a note).")] = 100,
        weight_decay: Annotated[float, typer.Option(help="AdamW weight decay (matrices only).")] = 0.01,
        grad_clip: Annotated[float, typer.Option(help="Clip the gradient norm (0: off).")] = 1.0,
        temperature: Annotated[
            float, typer.Option(help="Softmax temperature of the KL (loss is scaled by T^2).")
        ] = 1.0,
        loss: Annotated[str, typer.Option(help="forward_kl (default), reverse_kl or topk_kl.")] = "forward_kl",
        top_k: Annotated[int, typer.Option(help="Teacher tokens kept by topk_kl.")] = 64,
        lm_weight: Annotated[float, typer.Option(help="Weight of the next-token LM loss (0: logits only).")] = 0.0,
        hidden_weight: Annotated[float, typer.Option(help="Weight of (1 - cosine) on hidden states.")] = 0.0,
        hidden_map: Annotated[
            str | None, typer.Option(help="Student:teacher layer pairs for the hidden loss, e.g. 0:0,1:2,2:4.")
        ] = None,
        loss_chunk: Annotated[int, typer.Option(help="Tokens per chunk of the logit loss (memory bound).")] = 4096,
        save_every: Annotated[int, typer.Option(help="Checkpoint every N steps (0: only on SIGTERM).")] = 500,
        eval_every: Annotated[int, typer.Option(help="Held-out KL every N steps (0: off).")] = 100,
        eval_windows: Annotated[int, typer.Option(help="Held-out windows (taken from the head of --data).")] = 16,
        eval_data: Annotated[str | None, typer.Option(help="Separate held-out data (default: head of --data).")] = None,
        split: Annotated[str, typer.Option(help="Dataset split for hub data.")] = "train",
        text_column: Annotated[str, typer.Option(help="Text column of table data.")] = "text",
        streaming: Annotated[bool, typer.Option(help="Stream hub/table data instead of loading it.")] = False,
        seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
        device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
        teacher_dtype: Annotated[str, typer.Option(help="auto (bf16 on CUDA), float32, bfloat16.")] = "auto",
        activation_checkpointing: Annotated[bool, typer.Option(help="Recompute student activations.")] = False,
        attn_implementation: Annotated[str, typer.Option(help="sdpa, eager or flash_attention_2.")] = "sdpa",
        overwrite: Annotated[bool, typer.Option(help="Replace a non-empty output folder.")] = False,
        progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
    ) -> None:
        """Distil a teacher into a (pruned) student on the teacher's logits: forward KL at T=1 by default.

        Checkpoints go to OUTPUT.partial/ every --save-every steps and on SIGTERM; rerunning the same command
        resumes. The result is a standard checkpoint at OUTPUT with metrics.jsonl. Multi-GPU: launch with
        torchrun (FSDP2), e.g. `torchrun --nproc_per_node 8 -m minipuzzle.cli distill ...`.

        Example: minipuzzle distill --teacher 56b-dir --student 47b-pruned --data corpus.jsonl -o 47b-distilled
        --tokens 7B --seq-len 8192 --batch-size 768 --grad-accum 12
        """
        from minipuzzle.distill.config import DistillConfig
        from minipuzzle.distill.loop import Preempted
        from minipuzzle.distill.loop import distill as run
        from minipuzzle.units import parse_count

        cfg = DistillConfig(
            teacher=teacher, student=student, data=data, output=output, max_steps=max_steps,
            tokens=None if tokens is None else parse_count(tokens, "--tokens"), seq_len=seq_len, batch_size=batch_size, grad_accum=grad_accum, lr=lr,
            min_lr_ratio=min_lr_ratio, warmup=warmup, weight_decay=weight_decay, grad_clip=grad_clip,
            temperature=temperature, loss=loss, top_k=top_k, lm_weight=lm_weight, hidden_weight=hidden_weight,
            hidden_map=hidden_map, loss_chunk=loss_chunk, save_every=save_every, eval_every=eval_every,
            eval_windows=eval_windows, eval_data=eval_data, split=split, text_column=text_column,
            streaming=streaming, seed=seed, device=device, teacher_dtype=teacher_dtype,
            activation_checkpointing=activation_checkpointing, attn_implementation=attn_implementation,
            overwrite=overwrite, progress=progress,
        )  # fmt: skip
        try:
            out = run(cfg)
        except Preempted as e:
            print(str(e), file=sys.stderr)
            raise typer.Exit(code=143) from None
        if os.environ.get("RANK", "0") == "0":  # under torchrun, one line, not one per process
            print(f"distilled student written to {out}")
