"""The distillation loop: teacher logits -> student, one process or torchrun + FSDP2, resumable.

    distill(DistillSettings(teacher=..., student=..., data=..., output=..., max_steps=...)) -> Path

Every step takes the next `batch_size` windows of the data stream (the same on every process), each process
trains on its slice in `grad_accum` micro-batches, gradients are averaged (FSDP2 reduce-scatter after every
micro-batch, so each process holds only its shard of them, or once per step when the memory plan finds the whole
gradient fits and saves time), clipped, and AdamW steps. Checkpoints every `save_every` steps and on SIGTERM; a rerun of the same command resumes from the
newest one and ends with the same weights as an uninterrupted run (float32 on CPU: bit for bit).
"""

from __future__ import annotations

import copy
import math
import os
import shutil
import signal
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from torch.distributed.tensor import DTensor
from transformers import get_cosine_with_min_lr_schedule_with_warmup

import minipuzzle.distill.launch as launch
import minipuzzle.distill.parallel as parallel
import minipuzzle.distill.quantized as quantized
import minipuzzle.distill.state as state
from minipuzzle.artifacts import DistillState
from minipuzzle.checkpoint.dtypes import parse_dtype
from minipuzzle.checkpoint.read import Checkpoint
from minipuzzle.checkpoint.resolve import resolve_checkpoint
from minipuzzle.checkpoint.write import check_output_dir, save_state_dict
from minipuzzle.data import load_tokenizer
from minipuzzle.distill.losses import DistillObjective
from minipuzzle.distill.routers import route_in_float32
from minipuzzle.distill.stream import WindowStream
from minipuzzle.errors import UserError
from minipuzzle.hardware import Hardware, detect
from minipuzzle.kernels import check_attention
from minipuzzle.memory import for_device
from minipuzzle.progress import ProgressBar
from minipuzzle.settings import DistillSettings

TOKENIZER_MARKERS = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


class Preempted(Exception):
    """SIGTERM arrived: the run saved a checkpoint and stopped; rerun the same command to resume."""

    def __init__(self, step: int, path: Path):
        super().__init__(f"stopped by SIGTERM after step {step}; checkpoint {path}; rerun the same command to resume")
        self.step, self.path = step, path


class Diverged(UserError):
    """The loss or gradient norm became NaN or inf; the last good checkpoint is kept."""


# ---- setup ------------------------------------------------------------------------------------------------------


def _has_tokenizer(path: Path) -> bool:
    return any((path / f).is_file() for f in TOKENIZER_MARKERS)


def check_pair(teacher: Checkpoint, student: Checkpoint, pairs: list[tuple[int, int]]):
    """Teacher and student must share the vocabulary; returns the tokenizer and the folder it came from."""
    tv, sv = teacher.layout.vocab_size, student.layout.vocab_size
    if tv != sv:
        raise UserError(
            f"teacher vocabulary ({tv} tokens) differs from the student's ({sv}): logit distillation needs one vocabulary"
        )
    t_tok = load_tokenizer(teacher.path) if _has_tokenizer(teacher.path) else None
    s_tok = load_tokenizer(student.path) if _has_tokenizer(student.path) else None
    if t_tok is None and s_tok is None:
        raise UserError(f"neither {teacher.path} nor {student.path} holds a tokenizer")
    if t_tok is not None and s_tok is not None and t_tok.get_vocab() != s_tok.get_vocab():
        raise UserError(
            f"teacher tokenizer ({teacher.path}) and student tokenizer ({student.path}) differ: logit distillation "
            "needs the same tokenizer"
        )
    tok, tok_dir = (s_tok, student.path) if s_tok is not None else (t_tok, teacher.path)
    if len(tok) > tv:
        raise UserError(f"the tokenizer has {len(tok)} tokens but the models' vocabulary is {tv}")
    for s, t in pairs:
        if s >= student.layout.num_layers or t >= teacher.layout.num_layers:
            raise UserError(
                f"--hidden-map pair {s}:{t} is out of range: student has {student.layout.num_layers} layers, "
                f"teacher {teacher.layout.num_layers}"
            )
    return tok, tok_dir


def _load_models(cfg: DistillSettings, t_ckpt: Checkpoint, s_ckpt: Checkpoint, d: parallel.Dist,
                 train: WindowStream | None = None) -> DistillObjective:  # fmt: skip
    """Teacher and student as the objective holds them (sharded under torchrun); with `cfg.quantize`, the student
    fake-quantized and calibrated on the first batch of `train`."""
    t_dtype = parse_dtype(cfg.teacher_dtype, d.device)
    make = parallel.build_meta if d.enabled else lambda c, dt: parallel.load_local(c, dt, d)
    student = make(s_ckpt, torch.float32)  # float32 master weights; bf16 only inside autocast
    teacher = make(t_ckpt, t_dtype)
    for m in (student, teacher):
        try:
            m.set_attn_implementation(cfg.attn_implementation)
        except (ValueError, ImportError) as e:
            raise UserError(f"--attn-implementation {cfg.attn_implementation}: {str(e).splitlines()[0]}") from None
        route_in_float32(m)  # bf16 autocast would otherwise compute router logits in bf16
    if cfg.activation_checkpointing:
        student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    pairs = cfg.layer_pairs()
    if cfg.hidden_weight > 0 and not pairs:
        if s_ckpt.layout.num_layers != t_ckpt.layout.num_layers:
            raise UserError(
                f"--hidden-weight needs --hidden-map: the student has {s_ckpt.layout.num_layers} layers, "
                f"the teacher {t_ckpt.layout.num_layers}"
            )
        pairs = [(i, i) for i in range(s_ckpt.layout.num_layers)]
    objective = DistillObjective(
        student,
        teacher,
        loss=cfg.loss,
        temperature=cfg.temperature,
        top_k=cfg.top_k,
        lm_weight=cfg.lm_weight,
        hidden_weight=cfg.hidden_weight,
        layer_pairs=pairs,
        chunk=cfg.loss_chunk,
    )
    if d.enabled:
        parallel.shard(objective, d, cfg.sharding or "full", _param_dtype(cfg, d))
        parallel.fill_sharded(student, s_ckpt, d)
        parallel.fill_sharded(teacher, t_ckpt, d)
    if cfg.quantize:  # after sharding: calibration runs through the objective, whose root unit holds the embeddings
        if train is None:
            raise ValueError("a quantized student is calibrated on the training stream: pass it")
        quantized.quantize_student(objective, cfg, train, d, _autocast(cfg, d))
    return objective


def _optimizer(cfg: DistillSettings, student) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:

    decay = [p for p in student.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in student.parameters() if p.requires_grad and p.ndim < 2]  # norms, A_log, D, dt_bias
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=(cfg.beta1, cfg.beta2),
    )
    # transformers' schedule gives step 0 an LR of 0 (a wasted step, a tenth of a 10-step candidate run); starting
    # it one step in (last_epoch=0, which needs initial_lr) makes step i use its value at i + 1: the warmup
    # reaches the peak at step warmup - 1 and the last step trains at exactly min_lr_ratio x lr.
    for group in opt.param_groups:
        group["initial_lr"] = group["lr"]
    sched = get_cosine_with_min_lr_schedule_with_warmup(
        opt, cfg.warmup_steps(), cfg.max_steps, min_lr_rate=cfg.min_lr_ratio, last_epoch=0
    )
    return opt, sched


def finished(out: Path, cfg: DistillSettings) -> bool:
    """OUT already holds the result of this very run (a rerun after success is a no-op)."""
    f = out / "distill.json"
    if not f.is_file():
        return False
    try:
        return DistillState.read(f).trajectory == cfg.trajectory()
    except UserError:  # not a distill.json this version wrote: OUT is some other folder, refused or overwritten
        return False


# ---- the loop ---------------------------------------------------------------------------------------------------


def distill(config: DistillSettings, hardware: Hardware | None = None) -> Path:
    """Distil `config.teacher` into `config.student`; returns OUT, a standard checkpoint with metrics.jsonl.

    Run in the geometry of its memory plan on `hardware` (default: this machine, under torchrun the launch's
    nodes and GPUs per node) for this launch's processes: grad_accum, activation_checkpointing, sharding and
    accumulation left None take the plan's choice. Raises UserError for bad input or a plan that does not fit (before anything is
    written), Diverged on a NaN/inf loss (the last good checkpoint stays in OUT.partial), Preempted after saving
    on SIGTERM.
    """
    config.check_paths()
    cfg = with_plan(config, hardware)
    check_attention(cfg.attn_implementation, parallel.pick_device(cfg.device).type)
    out = cfg.output_path
    if finished(out, cfg):
        shutil.rmtree(cfg.run_dir, ignore_errors=True)
        return out
    check_output_dir(out, cfg.overwrite)
    d = parallel.init(cfg.device)
    try:
        return _run(cfg, d)
    finally:
        parallel.shutdown(d)


def with_plan(cfg: DistillSettings, hardware: Hardware | None = None) -> DistillSettings:
    """`cfg` with its geometry (grad_accum, activation_checkpointing, sharding) from the memory plan for this
    launch's WORLD_SIZE processes; refused (UserError, one line) when it does not fit. A run told --device cpu on
    a GPU machine plans on the host (unchecked when the host's RAM is unknown: then one micro-batch per process,
    no checkpointing)."""

    hw = for_device(hardware or launch.launch_hardware(detect()), cfg.device)
    if hw is None:
        fill = {"grad_accum": 1, "activation_checkpointing": False, "sharding": "full", "accumulation": "sharded"}
        return cfg.model_copy(update={k: v for k, v in fill.items() if getattr(cfg, k) is None})
    return launch.planned(cfg, hw, int(os.environ.get("WORLD_SIZE", "1")))[0]


def _run(cfg: DistillSettings, d: parallel.Dist) -> Path:
    micro_bs, rem = divmod(cfg.batch_size, d.world * cfg.grad_accum)
    if rem or micro_bs == 0:
        raise UserError(
            f"--batch-size {cfg.batch_size} must be a multiple of processes ({d.world}) x --grad-accum ({cfg.grad_accum})"
        )
    quantized.check_quantize(cfg, d.device)
    t_ckpt = Checkpoint(resolve_checkpoint(cfg.teacher))
    s_ckpt = Checkpoint(resolve_checkpoint(cfg.student))
    tokenizer, tok_dir = check_pair(t_ckpt, s_ckpt, cfg.layer_pairs())
    train, eval_ids = _streams(cfg, tokenizer)
    objective = _load_models(cfg, t_ckpt, s_ckpt, d, train)
    note = cfg.warmup_note()
    if note and d.main:
        print(f"note: {note}", file=sys.stderr)
    trainer = _Trainer(cfg, d, objective, train, eval_ids, micro_bs)
    stop = {"sigterm": False}
    old_handler = _install_sigterm(stop)
    shown = cfg.progress if cfg.progress is not None else sys.stderr.isatty()
    bar = ProgressBar("distill", cfg.max_steps, shown and d.main, completed=trainer.step, loss="-", kl="-",
                      tps="-", status="loss {task.fields[loss]}  kl {task.fields[kl]}  {task.fields[tps]} tok/s")  # fmt: skip
    try:
        if trainer.step == 0:
            trainer.evaluate()
        objective.train()
        while trainer.step < cfg.max_steps:
            rec = trainer.train_step()
            bar.update(rec["step"], loss=f"{rec['loss']:.4f}", kl=f"{rec['kl']:.4f}", tps=f"{rec['tokens_per_s']:,.0f}")
            step = trainer.step
            if cfg.eval_every and (step % cfg.eval_every == 0 or step == cfg.max_steps):
                trainer.evaluate()
            if step == cfg.max_steps:
                break  # done: a SIGTERM now is answered by finishing the (atomic) final write below
            sigterm = parallel.any_true(d, stop["sigterm"])
            if (cfg.save_every and step % cfg.save_every == 0) or sigterm:
                path = trainer.save()
                if sigterm:
                    raise Preempted(step, path)
        bar.close()
        return _write_final(cfg, d, objective.student, s_ckpt, tok_dir, trainer.log)
    finally:
        bar.close()
        if old_handler is not None:
            signal.signal(signal.SIGTERM, old_handler)


def _streams(cfg: DistillSettings, tokenizer) -> tuple[WindowStream, torch.Tensor]:
    """(training stream, held-out windows [E, seq_len]): the held-out windows come from --eval-data, or from the
    head of the training data, which the stream then never trains on."""
    kw = dict(split=cfg.split, column=cfg.text_column)
    train = WindowStream(cfg.data, tokenizer, cfg.seq_len, streaming=cfg.streaming, **kw)
    eval_ids = torch.zeros(0, cfg.seq_len, dtype=torch.long)
    if cfg.held_out_windows and cfg.eval_every:
        src = WindowStream(cfg.eval_data, tokenizer, cfg.seq_len, **kw) if cfg.eval_data else train
        eval_ids = src.take(cfg.held_out_windows)
        if src is train:
            train.mark_start()
    # A data problem (too little text for one window) fails here, before the models load.
    WindowStream(cfg.data, tokenizer, cfg.seq_len, streaming=cfg.streaming, state=copy.deepcopy(train.state),
                 **kw).take(1)  # fmt: skip
    return train, eval_ids


class _Trainer:
    """The state of a run between steps (step, tokens, optimizer, data position), resumed from the newest
    checkpoint in OUT.partial when there is one."""

    def __init__(self, cfg: DistillSettings, d: parallel.Dist, objective: DistillObjective, train: WindowStream,
                 eval_ids: torch.Tensor, micro_bs: int):  # fmt: skip
        self.cfg, self.d, self.objective, self.train, self.eval_ids = cfg, d, objective, train, eval_ids
        self.micro_bs = micro_bs
        self.opt, self.sched = _optimizer(cfg, objective.student)
        self.run_dir = cfg.run_dir
        if d.main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            state.clean_leftovers(self.run_dir)
            state.check_run(self.run_dir, cfg)
        parallel.barrier(d)
        self.step, self.tokens = 0, 0
        last = state.latest_checkpoint(self.run_dir)
        if last is not None:
            extra = state.load_checkpoint(last, objective.student, self.opt, d)
            self.step, self.tokens = extra["step"], extra["tokens"]
            self.sched.load_state_dict(extra["scheduler"])
            train.load_state_dict(extra["stream"])
            state.set_rng_state(extra["rng"], d.device)
        else:
            torch.manual_seed(cfg.seed)
        resume = self.step if last is not None else None
        self.log = state.MetricsLog(self.run_dir / "metrics.jsonl", d, resume_step=resume)

    def save(self) -> Path:
        extra = {"step": self.step, "tokens": self.tokens, "scheduler": self.sched.state_dict(),
                 "stream": self.train.state_dict(), "rng": state.rng_state(self.d.device)}  # fmt: skip
        return state.save_checkpoint(self.run_dir, self.step, self.objective.student, self.opt, extra, self.d)

    def train_step(self) -> dict[str, Any]:
        """One optimizer step on the next global batch; returns (and logs) its train record."""
        cfg, d, mb = self.cfg, self.d, self.micro_bs
        t0 = time.perf_counter()
        batch = self.train.take(cfg.batch_size)  # every process reads the same global batch, keeps its slice
        mine = batch[d.rank * mb * cfg.grad_accum : (d.rank + 1) * mb * cfg.grad_accum]
        sums = torch.zeros(4, dtype=torch.float64)
        for i, micro in enumerate(mine.split(mb)):
            if d.enabled:
                self._sync_gradients(last=i == cfg.grad_accum - 1)
            with _autocast(cfg, d):
                res = self.objective(micro.to(d.device))
            (res["loss"] / cfg.grad_accum).backward()
            sums += torch.stack([res[k].detach().double().cpu() for k in ("loss", "kl", "lm", "hidden")])
        sums = parallel.all_mean(d, sums / cfg.grad_accum)
        if not torch.isfinite(sums[0]):
            raise Diverged(_diverged_msg("loss", sums[0].item(), self.step + 1, self.run_dir))
        norm = self._clip()
        lr = self.opt.param_groups[0]["lr"]
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        self.step += 1
        self.tokens += cfg.tokens_per_step
        rec = {"type": "train", "step": self.step, "loss": sums[0].item(), "kl": sums[1].item(),
               "lm": sums[2].item(), "hidden": sums[3].item(), "lr": lr, "grad_norm": norm, "tokens": self.tokens,
               "tokens_per_s": cfg.tokens_per_step / (time.perf_counter() - t0)}  # fmt: skip
        self.log.write(rec)
        return rec

    def _sync_gradients(self, last: bool) -> None:
        """Sharded accumulation reduce-scatters after every micro-batch, so a rank only ever holds its shard of the
        float32 gradients; HSDP defers only the all-reduce across nodes to the last micro-batch (its partial sums
        are shards too). Unsharded accumulation skips every collective until the last micro-batch: one
        reduce-scatter per step instead of `grad_accum`, for the whole float32 gradient on every rank (4 bytes per
        student parameter). The memory plan chooses between them and counts the one chosen."""
        if self.cfg.accumulation == "unsharded":
            self.objective.set_requires_gradient_sync(last)
        else:
            self.objective.set_requires_all_reduce(last)

    def _clip(self) -> float:
        params = [p for p in self.objective.student.parameters() if p.grad is not None]
        clip = self.cfg.grad_clip if self.cfg.grad_clip > 0 else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(params, clip)
        norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
        if not math.isfinite(norm):
            raise Diverged(_diverged_msg("gradient norm", norm, self.step + 1, self.run_dir))
        return norm

    def evaluate(self) -> None:
        """Held-out loss, KL, accuracy and agreement of the student, logged as an eval record."""
        if not len(self.eval_ids):
            return
        d, mb, ids_all = self.d, self.micro_bs, self.eval_ids
        self.objective.eval()
        sums = torch.zeros(5, dtype=torch.float64)
        # Every process makes the same number of calls (FSDP2 collectives must match); a process with no
        # windows left scores window 0 and drops the result.
        stride = d.world * mb
        with _autocast(self.cfg, d):
            for k in range(math.ceil(len(ids_all) / stride)):
                ids = ids_all[k * stride + d.rank * mb :][:mb]
                part = self.objective((ids if len(ids) else ids_all[:1]).to(d.device), evaluate=True).cpu()
                sums += part if len(ids) else 0 * part
        sums = parallel.all_sum(d, sums)
        n = max(sums[4].item(), 1.0)
        rec = {"type": "eval", "step": self.step, "loss": sums[0].item() / n, "kl_to_teacher": sums[1].item() / n,
               "accuracy": sums[2].item() / n, "agreement": sums[3].item() / n, "tokens": int(n)}  # fmt: skip
        rec["perplexity"] = math.exp(min(rec["loss"], 700.0))
        self.log.write(rec)
        self.objective.train()


def _write_final(cfg, d, student, s_ckpt: Checkpoint, tok_dir: Path, log: state.MetricsLog) -> Path:
    """Write the distilled student as a checkpoint in the source's dtypes, one tensor at a time: each is gathered
    from its shards (a collective every rank takes part in), cast and handed to rank 0's shard writer, so rank 0's
    host holds one output shard and one full tensor, never the whole student (187 GB in float32 for 47B); the
    other ranks drop each gathered tensor where it is (`_final_tensors`). With --quantize, the serving checkpoint
    `minipuzzle quantize` writes (`quantized.export_student`)."""
    out = cfg.output_path
    extra = _extra_files(cfg, log) if d.main else {}
    if cfg.quantize:
        quantized.export_student(student, cfg, s_ckpt, tok_dir, extra, d)
    else:
        tensors = _final_tensors(student, s_ckpt, d)
        if d.main:
            save_state_dict(tensors, s_ckpt.layout, out, base_config=s_ckpt.config, tokenizer_from=tok_dir,
                            overwrite=cfg.overwrite, extra_files=extra)  # fmt: skip
        else:
            for _ in tensors:  # the other ranks take part in every gather
                pass
    if d.main:
        shutil.rmtree(cfg.run_dir, ignore_errors=True)
    parallel.barrier(d)
    return out


def _extra_files(cfg: DistillSettings, log: state.MetricsLog) -> dict[str, str]:
    return {"metrics.jsonl": log.text(), "distill.json": DistillState.of(cfg).model_dump_json(indent=2) + "\n"}


def _final_tensors(student, s_ckpt: Checkpoint, d):
    """(name, tensor) of every weight of `student`, gathered whole when sharded (FSDP2's DTensors), on the host in
    the dtype the source checkpoint stores it in (a bf16 checkpoint's MoE routers are float32, as transformers
    keeps them: one dtype for all would move their correction bias by up to 2e-4 and change expert choices); a
    tied checkpoint's LM head is left out. Lazy: one tensor at a time. Only rank 0 writes, so on the other ranks
    the tensor is None: they take part in each gather and free its result on the device, with no host copy (64
    ranks each copying 187 GB through their host would be 64 times the save's traffic for nothing)."""

    for name, t in student.state_dict().items():
        if name == "lm_head.weight" and s_ckpt.layout.tie_word_embeddings:
            continue
        full = t.full_tensor() if d.enabled and isinstance(t, DTensor) else t
        if not d.main:
            del full
            yield name, None
            continue
        yield name, full.detach().cpu().to(s_ckpt.stored_dtype(s_ckpt.source_of(name)))


def _diverged_msg(what: str, value: float, step: int, run_dir: Path) -> str:
    last = state.latest_checkpoint(run_dir)
    kept = f"the last good checkpoint {last} is kept" if last else "no checkpoint was written yet"
    return f"{what} is {value} at step {step}: stopped; {kept}; lower --lr or check the data"


def _param_dtype(cfg: DistillSettings, d: parallel.Dist) -> torch.dtype | None:
    """FSDP2 gathers the student's float32 master weights in bf16 on CUDA (what autocast would compute in anyway,
    at half the gathered memory); on the CPU (gloo, the tests) in float32."""
    return torch.bfloat16 if d.device.type == "cuda" and cfg.autocast else None


def _autocast(cfg: DistillSettings, d: parallel.Dist):
    if d.device.type == "cuda" and cfg.autocast:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def _install_sigterm(stop: dict[str, bool]) -> Any:
    """Turn SIGTERM into a flag checked at the end of each step (then: save, stop). Main thread only."""

    def handler(_signum, _frame):
        stop["sigterm"] = True

    try:
        return signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: leave signals alone
        return None
