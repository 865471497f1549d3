"""GPU readiness check: one run, one JSON, every part measured on its own.

    bash benchmarks/gpu_check.sh               # one H100/H200: ~6 minutes, JSON in $OUT or benchmarks/results/
    bash benchmarks/gpu_check.sh --cpu-smoke   # the same path on a tiny model on the CPU (part a only collects)

Parts, in the order they run (each in its own try/except; the JSON is rewritten after every part, so a run that
is killed still leaves the figures of the parts that finished):

  gpu_tests    `pytest -m gpu tests/` in a subprocess: pass/fail counts.
  checkpoint   a random ~1.2B-parameter Nemotron-H (hidden 2048, the 56B's opening 24 layers, vocab 131072) written
               as bf16 safetensors shards on local disk; the teacher of every later part.
  scoring      streamed importance scoring (`score_checkpoint(stream=True)`, depth + width) on CUDA: tokens/s and
               peak GPU memory against this script's own estimate (`predict_scoring_peak`; no memory-plan module
               exists yet).
  eval_speed   `minipuzzle.evaluate.speed.measure_speed`: prefill and decode tokens/s of the teacher in bf16.
  distill      `minipuzzle.distill.distill` of a ~0.82B student cut from the teacher by `cut_checkpoint` (8
               layers dropped, FFN and Mamba heads narrowed): tokens/s after warm-up, MFU = (6 N_student + 2 N_teacher) x tokens/s / the
               card's dense bf16 peak, peak GPU memory.

For each part `kernels` says whether transformers' fast Mamba kernels (mamba-ssm / causal-conv1d) ran or its
PyTorch reference path: the Mamba functions of transformers' modeling_nemotron_h are wrapped with call counters
and each knows which implementation it dispatches to. Token ids: scoring and eval use random ids over the whole
vocabulary; distillation reads the Python standard library through the demo teacher's 4096-token tokenizer (ids
below 4096; the logits are still over the full vocabulary, so the cost is the same).

Each part runs under a time budget (the loops stop early and report what they measured) so the whole check stays
under 7 minutes even on the slow PyTorch Mamba path.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import gc
import inspect
import json
import math
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import sysconfig
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from minipuzzle.arch import ATTENTION, MAMBA, MLP, Layout  # noqa: E402
from minipuzzle.kernels import dispatch_of  # noqa: E402

DEMO_TOKENIZER = REPO / "minipuzzle" / "assets" / "demo-teacher"
# Dense (no sparsity) bf16 tensor-core peaks from NVIDIA's datasheets, matched on torch.cuda.get_device_name.
BF16_PEAK = (("H200", 989e12), ("H100 NVL", 835e12), ("H100 PCIe", 756e12), ("H100", 989e12), ("A100", 312e12))
# The functions through which transformers' NemotronH Mamba mixer reaches a CUDA kernel or its PyTorch reference.
MAMBA_FUNCS = (
    "mamba2_split_conv1d_scan_combined",
    "mamba2_chunk_scan",
    "mamba2_selective_state_update",
    "causal_conv1d_fn",
    "causal_conv1d_update",
)
LEGACY_METHODS = ("cuda_kernels_forward", "torch_forward")  # older transformers chose per call between these


# ---- sizes ------------------------------------------------------------------------------------------------------


@dataclass
class Sizes:
    """Everything the run's cost depends on; `gpu()` for the real check, `smoke()` for the CPU."""

    device: str
    dtype: torch.dtype
    layout: Layout
    drop_layers: tuple[int, ...]  # teacher layers the student loses
    student_ffn: int  # FFN channels the student keeps
    student_mamba_heads: int  # Mamba heads the student keeps per layer (the same number from every group)
    score_seq: int
    score_batch: int  # rows per block call while scoring
    score_max_rows: int
    score_budget_bytes: int  # residual-stream budget for a row chunk (fixes the chunk size, hence the memory)
    distill_seq: int
    distill_batch: int
    distill_accum: int
    distill_steps: int
    eval_prompt: int
    eval_decode: int
    eval_repeats: int
    budgets: dict[str, float] = field(default_factory=dict)  # seconds per part
    total_seconds: float = 400.0

    @staticmethod
    def gpu() -> Sizes:
        layout = Layout(
            pattern="M-M-M-M*-M-M-M-M-M*-M-M-",  # the 56B's first 24 layers: Mamba/MLP pairs, attention every ~10
            hidden_size=2048, intermediate_size=6144, num_attention_heads=16, num_key_value_heads=8, head_dim=128,
            mamba_num_heads=64, mamba_head_dim=64, n_groups=8, ssm_state_size=128, vocab_size=131072,
        )  # fmt: skip
        return Sizes(
            device="cuda", dtype=torch.bfloat16, layout=layout, drop_layers=tuple(range(10, 18)),
            student_ffn=4096, student_mamba_heads=40,
            score_seq=2048, score_batch=2, score_max_rows=8, score_budget_bytes=2 * 2**30,
            distill_seq=2048, distill_batch=8, distill_accum=4, distill_steps=10,
            eval_prompt=2048, eval_decode=64, eval_repeats=3,
            budgets={"gpu_tests": 120, "checkpoint": 60, "scoring": 75, "eval_speed": 45, "distill": 170},
            total_seconds=400,
        )  # fmt: skip

    @staticmethod
    def smoke() -> Sizes:
        layout = Layout(
            pattern="M-M-M-M*-M-M-", hidden_size=64, intermediate_size=128, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, mamba_num_heads=8, mamba_head_dim=8, n_groups=2, ssm_state_size=16,
            vocab_size=4096,
        )  # fmt: skip
        return Sizes(
            device="cpu", dtype=torch.float32, layout=layout, drop_layers=(9, 10), student_ffn=96, student_mamba_heads=6,
            score_seq=64, score_batch=2, score_max_rows=4, score_budget_bytes=2**24,
            distill_seq=64, distill_batch=4, distill_accum=2, distill_steps=5,
            eval_prompt=32, eval_decode=8, eval_repeats=2,
            budgets={"gpu_tests": 120, "checkpoint": 60, "scoring": 60, "eval_speed": 60, "distill": 120},
            total_seconds=600,
        )  # fmt: skip


# ---- the report -------------------------------------------------------------------------------------------------


class Report:
    """The JSON document, rewritten (atomically) after every part."""

    def __init__(self, path: Path, doc: dict):
        self.path, self.doc, self.t0 = path, doc, time.perf_counter()
        self.doc.setdefault("parts", {})

    def save(self) -> None:
        self.doc["elapsed_s"] = round(time.perf_counter() - self.t0, 1)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.doc, indent=2, default=str) + "\n")
        os.replace(tmp, self.path)

    def remaining(self, total: float) -> float:
        return total - (time.perf_counter() - self.t0)

    @contextlib.contextmanager
    def part(self, name: str, probe: KernelProbe | None = None):
        """Record a part: its figures (the dict yielded), status, seconds, error text and the Mamba path it took."""
        rec: dict = {"status": "running"}
        self.doc["parts"][name] = rec
        self.save()
        t0 = time.perf_counter()
        mark = probe.mark() if probe else None
        try:
            yield rec
            rec["status"] = "ok" if rec.get("status") == "running" else rec["status"]
        except Exception as e:  # one part's failure must not lose the others' figures
            rec["status"] = "error"
            rec["error"] = f"{type(e).__name__}: {e}"[:2000]
            rec["traceback_tail"] = traceback.format_exc()[-3000:]
        finally:
            rec["seconds"] = round(time.perf_counter() - t0, 2)
            if probe is not None and "kernels" not in rec:
                rec["kernels"] = probe.since(mark)
            _free_device_memory()
            self.save()
            print(_summary_line(name, rec), flush=True)


def _summary_line(name: str, rec: dict) -> str:
    keys = ("passed", "failed", "num_params", "tokens_per_s", "depth_tokens_per_s", "width_tokens_per_s",
            "peak_memory_gib", "predicted_peak_gib", "prefill_tokens_per_s", "decode_tokens_per_s", "mfu",
            "steps_measured")  # fmt: skip
    figs = ", ".join(f"{k}={_fmt(rec[k])}" for k in keys if rec.get(k) is not None)
    path = rec.get("kernels", {}).get("mamba_path", "") if isinstance(rec.get("kernels"), dict) else ""
    err = f"  ERROR {rec['error'][:300]}" if rec.get("error") else ""
    return (
        f"[{name}] {rec['status']} in {rec.get('seconds', 0):.1f}s  {figs}  {('mamba: ' + path) if path else ''}{err}"
    )


def _fmt(v) -> str:
    return f"{v:,.3g}" if isinstance(v, float) else str(v)


def _free_device_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ---- which Mamba implementation ran ------------------------------------------------------------------------------


class KernelProbe:
    """Counts calls into transformers' NemotronH Mamba functions and knows which implementation each dispatches to.

    transformers 5.x resolves every one of them at import time to the mamba-ssm / causal-conv1d CUDA kernel when
    that package imports, else to its PyTorch reference (`use_kernel_func_from_hub_with_fallback`, whose closure
    holds `is_new_implementation`). The mixer looks them up as module globals at call time, so wrapping the module
    attributes counts every call. Older transformers chose per call between `cuda_kernels_forward` and
    `torch_forward` (gated by `is_fast_path_available`): those methods are counted too when they exist.
    """

    def __init__(self):
        from transformers.models.nemotron_h import modeling_nemotron_h as mod

        self.mod = mod
        self.calls: dict[str, int] = {}
        self.kernel: dict[str, bool | None] = {}
        self.impl: dict[str, str | None] = {}
        for name in MAMBA_FUNCS:
            fn = getattr(mod, name, None)
            if callable(fn):
                self.kernel[name], self.impl[name] = dispatch_of(fn)
                setattr(mod, name, self._counted(name, fn))
        mixer = getattr(mod, "NemotronHMamba2Mixer", None)
        for meth in LEGACY_METHODS:
            if mixer is not None and callable(getattr(mixer, meth, None)):
                self.kernel[meth] = meth == "cuda_kernels_forward"
                setattr(mixer, meth, self._counted(meth, getattr(mixer, meth)))

    def _counted(self, name: str, fn):
        self.calls[name] = 0

        @functools.wraps(fn)
        def counted(*args, **kwargs):
            self.calls[name] += 1
            return fn(*args, **kwargs)

        return counted

    def static(self) -> dict:
        """What is installed and what each function resolved to, before anything runs."""
        import importlib.util

        import transformers

        return {
            "transformers": transformers.__version__,
            "mamba_ssm_installed": importlib.util.find_spec("mamba_ssm") is not None,
            "causal_conv1d_installed": importlib.util.find_spec("causal_conv1d") is not None,
            "is_fast_path_available": getattr(self.mod, "is_fast_path_available", "absent in this transformers"),
            "pytorch_chunk_scan": self.fallback_style(),
            "dispatch": {k: {"kernel": self.kernel[k], "implementation": self.impl.get(k)} for k in self.kernel},
        }

    def fallback_style(self) -> str:
        """How this transformers' PyTorch chunk scan contracts: "fallback-einsum" (newer releases) or
        "fallback-products" (5.17 and earlier: broadcast products of [tokens, chunk, heads, state] in float32)."""
        fn = getattr(self.mod, "mamba2_chunk_scan", None)
        try:
            src = inspect.getsource(inspect.unwrap(fn))
        except (TypeError, OSError):
            return "fallback-products"
        return "fallback-einsum" if "einsum" in src else "fallback-products"

    def mark(self) -> dict[str, int]:
        return dict(self.calls)

    def since(self, mark: dict[str, int]) -> dict:
        """Calls since `mark` and the verdict: fast kernels, PyTorch fallback, mixed, or no Mamba call seen."""
        calls = {k: v - mark.get(k, 0) for k, v in self.calls.items() if v - mark.get(k, 0)}
        fast = sorted(k for k in calls if self.kernel.get(k))
        slow = sorted(k for k in calls if self.kernel.get(k) is False)
        if fast and not slow:
            verdict = "fast kernels (mamba-ssm / causal-conv1d)"
        elif slow and not fast:
            verdict = "pytorch fallback"
        elif fast and slow:
            verdict = f"mixed: kernels for {', '.join(fast)}; pytorch for {', '.join(slow)}"
        else:
            verdict = "no Mamba call observed"
        return {"mamba_path": verdict, "calls": calls}


# ---- the checkpoint ---------------------------------------------------------------------------------------------


def write_random_checkpoint(layout: Layout, path: Path, device: str, dtype: torch.dtype, seed: int = 0) -> dict:
    """A random Nemotron-H checkpoint at `path`, generated tensor by tensor on `device` (a 1B model never exists
    whole on the host) and stored in `dtype` in 1 GB shards, with the demo teacher's tokenizer.

    Initialisation follows `minipuzzle.testing.random_model` (weights ~ 0.5/sqrt(fan_in), norms near one, stable
    A_log and dt_bias), which keeps a 24-layer random model's activations finite in bf16.
    """

    from minipuzzle.checkpoint.build import build_model
    from minipuzzle.checkpoint.write import ShardWriter, copy_tokenizer, write_config

    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    base = {"layer_norm_epsilon": 1e-5, "max_position_embeddings": 8192}
    meta = build_model(layout, layout.to_config(base))
    gen = torch.Generator(device).manual_seed(seed)
    writer = ShardWriter(path, 10**9)
    for name, p in meta.state_dict().items():
        shape = tuple(p.shape)
        if name.endswith("A_log"):
            t = torch.log(torch.rand(shape, generator=gen, device=device) * 4 + 0.5)
        elif name.endswith("dt_bias"):
            t = torch.randn(shape, generator=gen, device=device) * 0.5 - 1.0
        elif p.ndim == 1:
            t = 1.0 + torch.randn(shape, generator=gen, device=device) * 0.2
        else:
            fan_in = shape[-1] if p.ndim == 2 else math.prod(shape[1:])
            t = torch.randn(shape, generator=gen, device=device) * (0.5 / fan_in**0.5) * (2.0 if p.ndim != 2 else 1.0)
        writer.add(name, t.to(dtype))
    writer.close()
    write_config(path, layout.to_config(base), dtype)
    copy_tokenizer(DEMO_TOKENIZER, path)
    return {"path": str(path), "bytes": sum(f.stat().st_size for f in path.glob("*.safetensors"))}


# ---- memory -----------------------------------------------------------------------------------------------------


def predict_scoring_peak(
    layout: Layout, *, seq_len: int, batch: int, depth_rows: int, width_rows: int, dtype_bytes: int,
    chunk_size: int, mamba_path: str,
) -> dict[str, int]:  # fmt: skip
    """This script's estimate of torch.cuda.max_memory_allocated while scoring a checkpoint streamed (there is no
    memory-plan module yet): what stays loaded + one layer + a row chunk's residual-stream copies + one block call.

    resident: embeddings, LM head and final norm at the compute dtype. layer: the largest layer's weights (one is
    loaded at a time). states: the depth pass keeps L+1 copies of the chunk's residual stream [rows, T, h], the
    width pass 2. transient: the largest temporary of one block call on `batch` rows: the in_proj output plus, on
    PyTorch's Mamba path, its float32 broadcast products ([tokens, chunk, heads, state] for C*B, [tokens, heads,
    head_dim, state] for B*x; transformers releases that contract with einsum keep only [tokens, chunk, heads]
    scores) - the kernels keep no such product; the MLP's up-projection; attention's q/k/v. `mamba_path` is
    "kernels", "fallback-products" or "fallback-einsum" (see `KernelProbe.fallback_style`).
    """
    h, L, V, T = layout.hidden_size, layout.num_layers, layout.vocab_size, seq_len
    H, P, N, ell = layout.mamba_num_heads, layout.mamba_head_dim, layout.ssm_state_size, chunk_size
    tok = batch * T
    resident = (2 * V * h + h) * dtype_bytes
    layer = max(layout.layer_params(k) for k in set(layout.pattern)) * dtype_bytes
    states = max((L + 1) * depth_rows, 2 * width_rows) * T * h * dtype_bytes
    mamba = tok * (layout.mamba_in_proj_rows + layout.mamba_conv_dim) * dtype_bytes
    if mamba_path == "kernels":
        mamba += tok * layout.mamba_intermediate * 4
    elif mamba_path == "fallback-products":
        mamba += tok * (max(ell * H * N, ell * H * P, H * P * N) + 3 * H * max(N, P)) * 4
    else:
        mamba += tok * (5 * ell * H + 8 * H * max(N, P)) * 4
    transient = (
        max(
            mamba if MAMBA in layout.pattern else 0,
            2 * tok * layout.intermediate_size * dtype_bytes if MLP in layout.pattern else 0,
            3 * tok * (layout.num_attention_heads + 2 * layout.num_key_value_heads) * layout.head_dim * dtype_bytes
            if ATTENTION in layout.pattern
            else 0,
        )
        + 2 * tok * h * dtype_bytes
    )
    parts = {"resident": resident, "layer": layer, "states": states, "transient": transient}
    parts["total"] = sum(parts.values())
    return parts


@contextlib.contextmanager
def peak_memory(device: str):
    """Yields a dict that gets {"peak_bytes", "kind"}: CUDA's max allocated, or the process's peak RSS on CPU."""
    out: dict = {}
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        out["baseline_bytes"] = torch.cuda.memory_allocated()
        yield out
        torch.cuda.synchronize()
        out.update(peak_bytes=torch.cuda.max_memory_allocated(), kind="torch.cuda.max_memory_allocated")
    else:
        yield out
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        out.update(peak_bytes=peak, kind="process peak RSS since start (CPU smoke: not per part)")


def gib(n: float) -> float:
    return round(n / 2**30, 3)


# ---- parts ------------------------------------------------------------------------------------------------------


def part_gpu_tests(rec: dict, timeout: float, smoke: bool) -> None:
    """`pytest -m gpu` in a subprocess; counts parsed from pytest's summary line."""
    target = ["tests/test_distill_gpu.py"] if smoke else ["tests/"]
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-rA", "-p", "no:cacheprovider",
           "--continue-on-collection-errors", *target]  # fmt: skip
    rec["command"] = " ".join(cmd[1:])
    try:
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)
        out, rec["returncode"] = proc.stdout + proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        rec["status"], rec["returncode"] = "timeout", None
        rec["error"] = f"pytest did not finish in {timeout:.0f}s"
    for n, what in re.findall(r"(\d+) (passed|failed|errors?|skipped|deselected|xfailed|xpassed)", out[-600:]):
        rec["errors" if what.startswith("error") else what] = int(n)
    rec.setdefault("passed", 0)
    rec.setdefault("failed", 0)
    seen = re.findall(r"mamba-ssm kernels (used|not installed)", out)
    rec["tests_report_mamba_ssm"] = seen[-1] if seen else None
    rec["output_tail"] = out[-2500:]
    if rec.get("failed") or rec.get("errors") or (rec.get("returncode") not in (0, 5, None)):
        rec["status"] = "failed"


def part_scoring(rec: dict, s: Sizes, ckpt: Path, budget: float, probe: KernelProbe) -> None:
    """Streamed scoring: a 1-row calibration call, then as many rows as the budget allows (at most score_max_rows)."""
    from minipuzzle.score.layerwise import rows_per_chunk
    from minipuzzle.score.scoring import score_checkpoint

    lay = s.layout
    mark = probe.mark()
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, lay.vocab_size, (s.score_max_rows, s.score_seq), generator=gen)
    kw = dict(stream=True, device=s.device, dtype=s.dtype, batch_size=s.score_batch,
              budget_bytes=s.score_budget_bytes, progress=False)  # fmt: skip
    t0 = time.perf_counter()
    score_checkpoint(ckpt, ids[:1], ids[:1], **kw)  # calibration; also warms up kernels and the page cache
    one = time.perf_counter() - t0
    rows = max(1, min(s.score_max_rows, int((budget - one) * 0.7 / one)))
    rec["calibration_1_row_s"] = round(one, 2)
    rec.update(rows=rows, seq_len=s.score_seq, batch=s.score_batch, token_ids="random over the full vocabulary",
               dtype=str(s.dtype).removeprefix("torch."), stream=True, depth_metric="mse_hidden")  # fmt: skip
    with peak_memory(s.device) as mem:
        t0 = time.perf_counter()
        scores = score_checkpoint(ckpt, ids[:rows], ids[:rows], **kw)
        total = time.perf_counter() - t0
    timing = scores.meta.timing
    tokens = rows * s.score_seq
    rec.update(
        seconds_scoring=round(total, 2), width_seconds=timing["width_seconds"], depth_seconds=timing["depth_seconds"],
        tokens_per_s=2 * tokens / total, width_tokens_per_s=tokens / timing["width_seconds"],
        depth_tokens_per_s=tokens / timing["depth_seconds"],
        depth_block_calls_per_s=tokens / s.score_seq * lay.num_layers * (lay.num_layers + 1) / 2 / timing["depth_seconds"],
        depth_scores_finite=bool(torch.isfinite(scores["depth"]).all()),
    )  # fmt: skip
    bpe = torch.empty((), dtype=s.dtype).element_size()
    h = lay.hidden_size
    depth_rows = rows_per_chunk(rows, s.score_seq, h, lay.num_layers + 1, s.dtype, s.score_budget_bytes, s.device)
    width_rows = rows_per_chunk(rows, s.score_seq, h, 2, s.dtype, s.score_budget_bytes, s.device)
    path = "kernels" if probe.since(mark)["mamba_path"].startswith("fast") else probe.fallback_style()
    pred = predict_scoring_peak(lay, seq_len=s.score_seq, batch=s.score_batch, depth_rows=depth_rows,
                                width_rows=width_rows, dtype_bytes=bpe, chunk_size=_chunk_size(ckpt),
                                mamba_path=path)  # fmt: skip
    rec.update(
        peak_memory_bytes=mem["peak_bytes"], peak_memory_kind=mem["kind"], peak_memory_gib=gib(mem["peak_bytes"])
    )
    rec["predicted_peak_gib"] = gib(pred["total"])
    rec["prediction"] = {
        "source": "this script's estimate (benchmarks/gpu_check.py: predict_scoring_peak), not a library memory plan",
        "assumes_mamba_path": path,
        "parts_gib": {k: gib(v) for k, v in pred.items()},
        "measured_over_predicted": round(mem["peak_bytes"] / pred["total"], 3) if s.device == "cuda" else None,
    }
    rec["checkpoint_gib"] = gib(sum(f.stat().st_size for f in Path(ckpt).glob("*.safetensors")))


def _chunk_size(ckpt: Path) -> int:
    from transformers import NemotronHConfig

    cfg = json.loads((Path(ckpt) / "config.json").read_text())
    return int(cfg.get("chunk_size") or NemotronHConfig().chunk_size)


def part_eval_speed(rec: dict, s: Sizes, ckpt: Path) -> None:
    """Prefill and decode tokens/s of the teacher, loaded whole in bf16 (fp32 on the CPU)."""
    from minipuzzle.checkpoint.build import load_model
    from minipuzzle.evaluate.speed import measure_speed

    model = load_model(ckpt, dtype=s.dtype, device=s.device)
    with contextlib.suppress(Exception):
        model.set_attn_implementation("sdpa")
    rec["attn_implementation"] = getattr(model.config, "_attn_implementation", None)
    res = measure_speed(model, batch=1, prompt_len=s.eval_prompt, decode_tokens=s.eval_decode, repeats=s.eval_repeats)
    rec.update(res)
    rec["peak_memory_gib"] = gib(res["peak_memory_bytes"])
    del model


def make_student(s: Sizes, teacher: Path, out: Path) -> Path:
    """The student: the teacher through `cut_checkpoint` with layers dropped, every kept MLP narrowed and every
    kept Mamba layer losing heads (the first of each group kept: for speed any choice costs the same). The hidden
    size stays: DistillObjective.forward reshapes the teacher's states with the student's width."""
    from minipuzzle.cut import Plan, cut_checkpoint

    lay = s.layout
    keep = [i for i in range(lay.num_layers) if i not in s.drop_layers]
    per, k = lay.mamba_num_heads // lay.n_groups, s.student_mamba_heads // lay.n_groups
    heads = [g * per + j for g in range(lay.n_groups) for j in range(k)]
    plan = Plan(
        layers=keep,
        ffn={i: list(range(s.student_ffn)) for i in keep if lay.pattern[i] == MLP},
        mamba_heads={i: heads for i in keep if lay.pattern[i] == MAMBA},
    )
    return cut_checkpoint(teacher, plan, out, overwrite=True, progress=False)


def part_distill(rec: dict, s: Sizes, teacher: Path, scratch: Path, budget: float, peak_flops: float | None) -> None:
    """`distill()` for `distill_steps` steps; a timer sends SIGTERM at the budget (the loop's own preemption:
    it saves a checkpoint and stops). A CUDA out-of-memory error retries once with half the micro-batch."""
    from minipuzzle.checkpoint.read import Checkpoint

    t0 = time.perf_counter()
    student = make_student(s, teacher, scratch / "student")
    rec["cut_s"] = round(time.perf_counter() - t0, 2)
    n_t, n_s = Checkpoint(teacher).layout.num_params(), Checkpoint(student).layout.num_params()
    rec.update(teacher_params=n_t, student_params=n_s, student_layout=Checkpoint(student).layout.pattern)
    accum = s.distill_accum
    while True:
        try:
            _run_distill(rec, s, teacher, student, scratch / f"distilled-{accum}", accum, budget - rec["cut_s"])
            break
        except torch.OutOfMemoryError as e:
            rec.setdefault("oom_retries", []).append(f"micro-batch {s.distill_batch // accum}: {str(e)[:200]}")
            if len(rec["oom_retries"]) > 1 or s.distill_batch % (2 * accum):
                raise
        accum *= 2  # here, not in the except block: the traceback there still holds the models' memory
        _free_device_memory()
    flops_per_token = 6 * n_s + 2 * n_t
    rec["flops_per_token"] = flops_per_token
    rec["peak_bf16_flops"] = peak_flops
    if peak_flops and rec.get("tokens_per_s"):
        rec["mfu"] = flops_per_token * rec["tokens_per_s"] / peak_flops


def _run_distill(rec, s: Sizes, teacher: Path, student: Path, out: Path, accum: int, budget: float) -> None:
    from minipuzzle.distill.loop import Diverged, Preempted, distill
    from minipuzzle.settings import DistillSettings

    cfg = DistillSettings(
        teacher=str(teacher), student=str(student), data=sysconfig.get_paths()["stdlib"], output=str(out),
        max_steps=s.distill_steps, seq_len=s.distill_seq, batch_size=s.distill_batch, grad_accum=accum,
        lr=1e-4, warmup=1, eval_every=0, save_every=0, device=s.device, attn_implementation="sdpa", overwrite=True,
    )  # fmt: skip
    rec.update(seq_len=s.distill_seq, global_batch=s.distill_batch, grad_accum=accum,
               micro_batch=s.distill_batch // accum, max_steps=s.distill_steps,
               precision="teacher bf16; student float32 master weights under bf16 autocast (the loop's design)"
               if s.device == "cuda" else "float32 (CPU)",
               data="Python standard library through the demo tokenizer (4096 tokens)")  # fmt: skip
    _record_plan(rec, cfg)
    with peak_memory(s.device) as mem, _sigterm_after(max(budget - 30, 5)):
        try:
            distill(cfg)
        except Preempted as e:
            rec["stopped"] = f"at the time budget: {e}"
        except Diverged as e:  # a random bf16 model may; the steps before it still tell the speed
            rec["stopped"] = f"diverged: {e}"
    rec.update(
        peak_memory_bytes=mem["peak_bytes"], peak_memory_kind=mem["kind"], peak_memory_gib=gib(mem["peak_bytes"])
    )
    metrics = out / "metrics.jsonl" if (out / "metrics.jsonl").is_file() else cfg.run_dir / "metrics.jsonl"
    steps = [json.loads(x) for x in metrics.read_text().splitlines() if '"train"' in x]
    warm = steps[2:] if len(steps) > 3 else steps[1:] or steps
    rec["steps_done"] = len(steps)
    rec["steps_measured"] = len(warm)
    rec["step_tokens_per_s"] = [round(x["tokens_per_s"], 1) for x in steps]
    rec["tokens_per_s"] = len(warm) * cfg.tokens_per_step / sum(cfg.tokens_per_step / x["tokens_per_s"] for x in warm)
    rec["loss_first_last"] = [steps[0]["loss"], steps[-1]["loss"]]


def _record_plan(rec: dict, cfg) -> None:
    """The memory plan of this one-process run (what `distill` checks before it starts) beside the measured peak;
    the multi-process FSDP2 path (bf16 gathers, float32 masters) is the gpu test
    test_distill_gpu.py::test_fsdp2_gathers_the_student_in_bf16_and_keeps_float32_master_weights."""
    from minipuzzle.distill.launch import plan_for
    from minipuzzle.hardware import detect

    hw = detect()  # on a CUDA machine the Mamba path that will run is detected (minipuzzle.kernels)
    part = plan_for(cfg, hw, 1)
    rec["plan"] = {"launch": part.geometry.describe(), "fits": part.fits, "predicted_device_bytes": part.device_total,
                   "predicted_device_gib": gib(part.device_total), "mamba_path_planned": hw.mamba_text()}  # fmt: skip


@contextlib.contextmanager
def _sigterm_after(seconds: float):
    """From `seconds` on, send this process SIGTERM every 5 s until the block ends: the distill loop answers it by
    saving a checkpoint and raising Preempted after the current step. Repeated because one that arrives before
    the loop has installed its handler (while models load) is swallowed by the no-op handler set here, which also
    keeps a late one from killing the process after the loop has restored it."""
    done = threading.Event()

    def watchdog():
        if done.wait(seconds):
            return
        while not done.is_set():
            os.kill(os.getpid(), signal.SIGTERM)
            done.wait(5)

    old = signal.signal(signal.SIGTERM, lambda *_: None)
    t = threading.Thread(target=watchdog, daemon=True)
    t.start()
    try:
        yield
    finally:
        done.set()
        t.join()
        signal.signal(signal.SIGTERM, old)


# ---- compatibility ----------------------------------------------------------------------------------------------


def device_info(device: str) -> dict:
    import platform

    import transformers

    info = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "cuda_runtime": torch.version.cuda, "host_cpus": os.cpu_count()}  # fmt: skip
    if device == "cuda":
        p = torch.cuda.get_device_properties(0)
        info.update(name=p.name, total_memory_gib=gib(p.total_memory), capability=f"{p.major}.{p.minor}",
                    sm_count=p.multi_processor_count)  # fmt: skip
    else:
        info["name"] = "cpu"
    return info


def bf16_peak(name: str) -> float | None:
    for key, flops in BF16_PEAK:
        if key in name:
            return flops
    return None


# ---- main -------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny model on the CPU; the gpu tests only collect")
    ap.add_argument("--out", type=Path, default=None, help="JSON path (default $OUT/gpu_check.json or results/)")
    ap.add_argument("--scratch", type=Path, default=Path(os.environ.get("GPU_CHECK_SCRATCH", "/tmp/gpu_check")))
    args = ap.parse_args(argv)
    smoke = args.cpu_smoke or os.environ.get("GPU_CHECK_CPU_SMOKE") == "1"
    sizes = Sizes.smoke() if smoke else Sizes.gpu()
    if not smoke and not torch.cuda.is_available():
        print("gpu_check: no CUDA device; run with --cpu-smoke for the CPU path", file=sys.stderr)
        return 2
    name = "gpu_check_cpu_smoke.json" if smoke else "gpu_check.json"
    out = args.out or (Path(os.environ["OUT"]) / name if os.environ.get("OUT") else REPO / "benchmarks/results" / name)
    report = Report(out, {"check": "minipuzzle GPU readiness (issue 12, deliverable 6)", "mode":
                          "cpu-smoke" if smoke else "gpu", "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                          time.gmtime())})  # fmt: skip
    rep = report.doc
    rep["device"] = device_info(sizes.device)
    peak_flops = bf16_peak(rep["device"]["name"]) if not smoke else None
    rep["peak_bf16_flops"] = peak_flops
    rep["sizes"] = {k: (str(v) if isinstance(v, torch.dtype) else v) for k, v in dataclasses.asdict(sizes).items()
                    if k != "layout"}  # fmt: skip
    rep["teacher_layout"] = dict(sizes.layout.summary(), num_params=sizes.layout.num_params())
    probe = KernelProbe()
    rep["kernels_static"] = probe.static()
    report.save()
    print(f"gpu_check: {rep['mode']} on {rep['device']['name']}; JSON -> {out}", flush=True)
    run_parts(report, sizes, probe, args.scratch, smoke, peak_flops)
    report.save()
    print(f"\ngpu_check summary ({rep['device']['name']}, transformers {rep['kernels_static']['transformers']}, "
          f"mamba-ssm installed: {rep['kernels_static']['mamba_ssm_installed']}):")  # fmt: skip
    for name, rec in rep["parts"].items():
        print("  " + _summary_line(name, rec))
    print(f"gpu_check: done in {report.doc['elapsed_s']}s; JSON -> {out}", flush=True)
    return 0


def run_parts(report: Report, s: Sizes, probe: KernelProbe, scratch: Path, smoke: bool, peak_flops) -> None:
    def budget(part: str, reserve: float = 0.0) -> float:
        return max(10.0, min(s.budgets[part], report.remaining(s.total_seconds) - reserve))

    with report.part("gpu_tests") as rec:
        part_gpu_tests(rec, budget("gpu_tests", reserve=240), smoke)
    # A warm machine keeps /tmp between calls: a leftover distillation would resume instead of being measured.
    shutil.rmtree(scratch, ignore_errors=True)
    teacher = scratch / "teacher"
    with report.part("checkpoint") as rec:
        rec.update(write_random_checkpoint(s.layout, teacher, s.device, s.dtype))
        rec["num_params"] = s.layout.num_params()
        rec["gib"] = gib(rec["bytes"])
    if report.doc["parts"]["checkpoint"]["status"] != "ok":
        return
    with report.part("scoring", probe) as rec:
        part_scoring(rec, s, teacher, budget("scoring", reserve=180), probe)
    with report.part("eval_speed", probe) as rec:
        part_eval_speed(rec, s, teacher)
    with report.part("distill", probe) as rec:
        part_distill(rec, s, teacher, scratch, budget("distill", reserve=5), peak_flops)


if __name__ == "__main__":
    sys.exit(main())
