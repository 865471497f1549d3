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
  fp8_speed    prefill and decode tokens/s and peak GPU memory of the teacher in FP8 against bf16 (eval_speed's
               measurement, both on one model): `quantize_model(model, "fp8", windows)` on standard-library text,
               then, on a GPU with FP8 tensor cores, Model Optimizer's `mtq.compress` to FP8 weights and its
               per-tensor FP8 GEMM (torch._scaled_mm); `fp8_path` says whether that ran or fake quantization did
               (the CPU smoke: those figures are not FP8 speed). Last, so an overrun costs no other part.

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
import importlib
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
import warnings
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
    fp8_calib_windows: int  # calibration windows of the FP8 part (standard-library text, like distillation's)
    fp8_calib_seq: int
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
            eval_prompt=2048, eval_decode=64, eval_repeats=3, fp8_calib_windows=8, fp8_calib_seq=512,
            # On an H200 (benchmarks/results/gpu_check_h200.json) the parts took 25, 3, 42, 9 and 66 s; fp8_speed
            # (~45 s expected: a bf16 and an FP8 measurement, calibration, torch.compile of the FP8 GEMM, whose
            # cold-cache time is the unknown, hence a 75 s cap) runs last, so distill keeps fp8_speed's budget in
            # reserve and its cap drops from 170 s to 150 s.
            budgets={"gpu_tests": 120, "checkpoint": 60, "scoring": 75, "eval_speed": 45, "distill": 150,
                     "fp8_speed": 75},
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
            eval_prompt=32, eval_decode=8, eval_repeats=2, fp8_calib_windows=4, fp8_calib_seq=32,
            budgets={"gpu_tests": 120, "checkpoint": 60, "scoring": 60, "eval_speed": 60, "distill": 120,
                     "fp8_speed": 60},
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
            "steps_measured", "bf16_prefill_tokens_per_s", "bf16_decode_tokens_per_s", "bf16_peak_memory_gib",
            "prefill_speedup", "decode_speedup", "fp8_gemm")  # fmt: skip
    figs = ", ".join(f"{k}={_fmt(rec[k])}" for k in keys if rec.get(k) is not None)
    if rec.get("figures_are", "").startswith("fake-quant"):  # the FP8 part on the CPU or a pre-Hopper GPU
        figs += "  (fake-quant figures, not FP8 speed)"
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


# Model Optimizer 0.47's real FP8 path: `mtq.compress` turns each QuantLinear into a RealQuantLinear whose weight is
# stored as float8_e4m3fn (a QTensorWrapper) and flags those with enabled input and weight quantizers to run a
# registered low-precision GEMM; the per-tensor FP8 one (`Fp8PerTensorLinear`, torch._scaled_mm with the calibrated
# amax / 448 as scales) lives in this module, which `backends/__init__.py` does not import: without importing it no
# GEMM matches and each layer silently dequantizes its weight to bf16 per call.
FP8_GEMM_MODULE = "modelopt.torch.quantization.backends.fp8_per_tensor_gemm"
FP8_GEMM_TEXT = ("real FP8 GEMM via modelopt.torch.quantization.compress + backends.fp8_per_tensor_gemm "
                 "(torch._scaled_mm, e4m3 weights and inputs, per-tensor static scales)")  # fmt: skip


class PartTimeout(Exception):
    """Raised in the main thread when a part's time budget is spent (see `_raise_after`)."""


@contextlib.contextmanager
def _raise_after(seconds: float):
    """Raise PartTimeout in this (main) thread once `seconds` have passed: a hard stop for a part made of calls
    that cannot be told to stop early (model loading, torch.compile, measure_speed). SIGALRM's handler runs between
    Python bytecodes, so a CUDA call in flight finishes first."""

    def fire(*_):
        raise PartTimeout(f"time budget of {seconds:.0f}s spent")

    old = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 1.0))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def _speed_figures(res: dict) -> dict:
    """The figures of one `measure_speed` result kept for the comparison (the settings are recorded once)."""
    keys = ("prefill_tokens_per_s", "decode_tokens_per_s", "prefill_tokens_per_s_range", "decode_tokens_per_s_range",
            "prefill_s", "decode_s", "peak_memory_bytes", "baseline_memory_bytes", "weights_bytes")  # fmt: skip
    out = {k: res[k] for k in keys}
    out.update(peak_memory_gib=gib(res["peak_memory_bytes"]), weights_gib=gib(res["weights_bytes"]))
    return out


def real_fp8_unavailable(model) -> str | None:
    """Why Model Optimizer's real FP8 GEMM cannot run for `model`, or None when it can: it needs CUDA with FP8
    tensor cores (compute capability >= 8.9, `backends.utils.fp8_compatible`), its backend module, and every
    quantized linear's in/out features a multiple of 16 (torch._scaled_mm's requirement on K and N)."""
    device = next(model.parameters()).device
    if device.type != "cuda":
        return f"no CUDA device (model on {device.type}): torch._scaled_mm's FP8 GEMM needs an FP8-capable GPU"
    cap = torch.cuda.get_device_capability(device)
    if cap < (8, 9):
        return f"compute capability {cap[0]}.{cap[1]} < 8.9: this GPU has no FP8 tensor cores"
    try:
        importlib.import_module(FP8_GEMM_MODULE)
    except Exception as e:  # an older or newer Model Optimizer without this backend
        return f"{FP8_GEMM_MODULE} does not import: {type(e).__name__}: {e}"
    odd = [n for n, m in model.named_modules() if getattr(getattr(m, "weight_quantizer", None), "is_enabled", False)
           and isinstance(getattr(m, "weight", None), torch.Tensor) and m.weight.ndim == 2
           and any(d % 16 for d in m.weight.shape)]  # fmt: skip
    if odd:
        return f"{len(odd)} quantized linear layers have a dimension not divisible by 16 (e.g. {odd[0]})"
    return None


def compress_fp8(model) -> dict:
    """`mtq.compress` on a model `quantize_model` calibrated for FP8: weights stored as float8_e4m3fn and (where the
    backend is imported and the GPU supports it) matmuls through the FP8 GEMM. Returns what it converted."""
    from modelopt.torch.quantization.nn.modules.quant_linear import RealQuantLinear

    from minipuzzle.quantize.configs import mtq

    with contextlib.suppress(Exception):  # registers Fp8PerTensorLinear where it imports (see FP8_GEMM_MODULE)
        importlib.import_module(FP8_GEMM_MODULE)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Real quantization has been applied ... still experimental"
        mtq().compress(model)
    flagged = [m for m in model.modules() if isinstance(m, RealQuantLinear) and getattr(m, "_use_real_quant_gemm", 0)]
    fp8 = [m for m in flagged if m.weight.dtype == torch.float8_e4m3fn]
    return {"modules_flagged_for_real_gemm": len(flagged), "modules_with_fp8_weights": len(fp8),
            "weights_bytes": sum(p.numel() * p.element_size() for p in model.parameters())}  # fmt: skip


@contextlib.contextmanager
def _quiet_real_quant():
    """Silence RealQuantLinear's per-layer warning that no real-quant GEMM matched (one multi-line warning per layer
    on the CPU): `fp8_gemm_matches` counts those layers into the JSON instead."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="RealQuantLinear: No real-quant GEMM found")
        yield


def fp8_gemm_matches(model) -> dict:
    """After a forward: how many compressed layers matched Model Optimizer's FP8 GEMM (RealQuantLinear caches the
    registry's match in `_real_quant_gemm_impl` on its first call), and how many found none (their weight is
    dequantized to the compute dtype per call)."""
    from modelopt.torch.quantization.nn.modules.quant_linear import RealQuantLinear

    gemm = getattr(sys.modules.get(FP8_GEMM_MODULE), "Fp8PerTensorLinear", None)
    flagged = [m for m in model.modules() if isinstance(m, RealQuantLinear) and getattr(m, "_use_real_quant_gemm", 0)]
    impls = [getattr(m, "_real_quant_gemm_impl", "not called") for m in flagged]
    return {
        "fp8_gemm": sum(1 for f in impls if gemm is not None and f == gemm.apply),
        "no_gemm_found": sum(1 for f in impls if f is None),
        "other_gemm": sum(1 for f in impls if f not in (None, "not called") and (gemm is None or f != gemm.apply)),
        "not_called": sum(1 for f in impls if isinstance(f, str)),
    }


@contextlib.contextmanager
def _count_fp8_gemm_calls():
    """Counts calls of Model Optimizer's `fp8_per_tensor_gemm` (looked up as a module global by
    Fp8PerTensorLinear.forward on every call, so wrapping the module attribute sees each one)."""
    mod = sys.modules.get(FP8_GEMM_MODULE)
    counter = {"calls": 0}
    fn = getattr(mod, "fp8_per_tensor_gemm", None)
    if fn is None:
        yield counter
        return

    @functools.wraps(fn)
    def counted(*args, **kwargs):
        counter["calls"] += 1
        return fn(*args, **kwargs)

    mod.fp8_per_tensor_gemm = counted
    try:
        yield counter
    finally:
        mod.fp8_per_tensor_gemm = fn


def _logit_gap(a: torch.Tensor, b: torch.Tensor) -> dict:
    a, b = a.float(), b.float()
    return {"max_abs_diff": float((a - b).abs().max()), "max_abs_ref": float(b.abs().max()),
            "cosine": float(torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0)),
            "top1_agreement": float((a.argmax(-1) == b.argmax(-1)).float().mean())}  # fmt: skip


def part_fp8_speed(rec: dict, s: Sizes, ckpt: Path, budget: float) -> None:
    """FP8 prefill and decode tokens/s against bf16 on the teacher, measured like `part_eval_speed`
    (`measure_speed`: warmed up, `eval_repeats` repeats, median and range).

    One model: loaded in bf16 and measured; post-training quantized in place by the project's
    `quantize_model(model, "fp8", windows)` (Model Optimizer's hybrid FP8 recipe, max calibration on standard-
    library text windows through the teacher's tokenizer, the distill part's data); on an FP8-capable GPU then
    compressed to real FP8 weights and GEMMs (`compress_fp8`) and checked against the fake-quantized logits;
    measured again. Where real FP8 cannot run (the CPU smoke, a pre-Hopper GPU) the fake-quantized model is
    measured and `fp8_path` says so: those figures are the cost of simulating FP8, not FP8 speed. Under a hard
    time budget (`_raise_after`): figures measured before it ran out stay in the record."""
    from minipuzzle.checkpoint.build import load_model
    from minipuzzle.data import load_tokenizer, token_windows
    from minipuzzle.evaluate.speed import measure_speed
    from minipuzzle.quantize.calibrate import quantize_model
    from minipuzzle.quantize.configs import BASE_CONFIG, quantized_modules

    rec["budget_s"] = round(budget, 1)
    speed = dict(batch=1, prompt_len=s.eval_prompt, decode_tokens=s.eval_decode, repeats=s.eval_repeats)
    # "bf16" names the baseline; on the CPU smoke it is float32 (`baseline_dtype`).
    rec["settings"] = dict(speed, baseline_dtype=str(s.dtype).removeprefix("torch."))
    t0 = time.perf_counter()
    try:
        with _raise_after(budget):
            model = load_model(ckpt, dtype=s.dtype, device=s.device)
            with contextlib.suppress(Exception):
                model.set_attn_implementation("sdpa")
            data = sysconfig.get_paths()["stdlib"]
            windows = token_windows(data, load_tokenizer(ckpt), s.fp8_calib_seq, s.fp8_calib_windows, seed=0)
            rec["calibration"] = {"data": "Python standard library through the teacher's (demo) tokenizer",
                                  "windows": len(windows), "seq_len": s.fp8_calib_seq, "precision": "fp8",
                                  "base_config": BASE_CONFIG["fp8"], "algorithm": "max"}  # fmt: skip
            probe = windows[:1].to(s.device)  # logits of real text: bf16 vs fake FP8 vs real FP8
            with torch.no_grad():
                ref = model(input_ids=probe, use_cache=False).logits[0, -64:].float().cpu()
            bf16 = measure_speed(model, **speed)
            rec["bf16"] = _speed_figures(bf16)
            rec.update(bf16_prefill_tokens_per_s=bf16["prefill_tokens_per_s"],
                       bf16_decode_tokens_per_s=bf16["decode_tokens_per_s"],
                       bf16_peak_memory_gib=gib(bf16["peak_memory_bytes"]))  # fmt: skip
            t = time.perf_counter()
            quantize_model(model, "fp8", windows, batch_size=max(1, min(4, len(windows))))
            rec["calibration"]["seconds"] = round(time.perf_counter() - t, 2)
            rec["quantized_modules"] = len(quantized_modules(model))
            with torch.no_grad():
                fake = model(input_ids=probe, use_cache=False).logits[0, -64:].float().cpu()
            rec["fake_fp8_vs_bf16_logits"] = _logit_gap(fake, ref)
            why = real_fp8_unavailable(model)
            if why is None:
                rec["compress"] = compress_fp8(model)
                with _count_fp8_gemm_calls() as calls, torch.no_grad(), _quiet_real_quant():
                    t = time.perf_counter()
                    try:
                        real = model(input_ids=probe, use_cache=False).logits[0, -64:].float().cpu()  # .cpu() syncs
                    except Exception as e:  # e.g. torch.compile of the GEMM without a working Triton / C compiler
                        from modelopt.torch.quantization.backends.gemm_registry import disable_real_quant_gemm

                        rec["real_fp8_error"] = f"{type(e).__name__}: {e}"[:1000]
                        disable_real_quant_gemm(model)  # the FP8 weights stay; each layer dequantizes them
                        real = model(input_ids=probe, use_cache=False).logits[0, -64:].float().cpu()
                    rec["first_real_fp8_forward_s"] = round(time.perf_counter() - t, 2)  # torch.compile's cost
                rec["gemm_match"] = dict(fp8_gemm_matches(model), calls_in_first_forward=calls["calls"])
                rec["real_fp8_vs_fake_fp8_logits"] = _logit_gap(real, fake)
                rec["real_fp8_vs_bf16_logits"] = _logit_gap(real, ref)
                m = rec["gemm_match"]
                if rec.get("real_fp8_error"):
                    rec.update(fp8_gemm="fp8 weights, bf16 matmuls",
                               fp8_path="FP8 weight storage only: the real FP8 GEMM failed (real_fp8_error); "
                               "every layer dequantizes its FP8 weight per call")  # fmt: skip
                elif m["fp8_gemm"] and not m["no_gemm_found"] and not m["other_gemm"]:
                    rec.update(fp8_gemm="real", fp8_path=FP8_GEMM_TEXT)
                else:  # compressed, but (some) layers dequantize their FP8 weights instead of running FP8 GEMMs
                    rec.update(fp8_gemm="fp8 weights, bf16 matmuls",
                               fp8_path=f"FP8 weight storage only: {m['no_gemm_found']} of "
                               f"{m['fp8_gemm'] + m['no_gemm_found'] + m['other_gemm']} compressed layers found no "
                               f"FP8 GEMM in Model Optimizer's registry and dequantize per call")  # fmt: skip
                rec["figures_are"] = "FP8 speed on this GPU"
            else:
                rec.update(fp8_gemm="fake", fp8_path=f"fake quantization: {why}")
                rec["figures_are"] = (
                    "fake-quant CPU numbers (FP8 simulated: weights and inputs rounded to e4m3 and back in float32):"
                    " they exercise the script, they are not FP8 speed" if s.device == "cpu" else
                    "fake-quant numbers (FP8 simulated in bf16): the cost of simulation, not FP8 speed")  # fmt: skip
            _free_device_memory()
            with _count_fp8_gemm_calls() as calls, _quiet_real_quant():
                fp8 = measure_speed(model, **speed)
            rec["fp8"] = _speed_figures(fp8)
            if "gemm_match" in rec:
                rec["gemm_match"]["calls_during_measurement"] = calls["calls"]
            rec.update(prefill_tokens_per_s=fp8["prefill_tokens_per_s"], decode_tokens_per_s=fp8["decode_tokens_per_s"],
                       peak_memory_gib=gib(fp8["peak_memory_bytes"]),
                       prefill_speedup=fp8["prefill_tokens_per_s"] / bf16["prefill_tokens_per_s"],
                       decode_speedup=fp8["decode_tokens_per_s"] / bf16["decode_tokens_per_s"],
                       peak_memory_ratio=fp8["peak_memory_bytes"] / bf16["peak_memory_bytes"])  # fmt: skip
            if s.device == "cpu":
                rec["peak_memory_note"] = "CPU: process RSS sampled during each measurement, not device memory"
                # The real path's conversion still runs here, so the smoke exercises it: weights become float8,
                # no GEMM matches off CUDA and each layer dequantizes per call (checked against fake quantization).
                rec["compress"] = compress_fp8(model)
                with torch.no_grad(), _quiet_real_quant():
                    stored = model(input_ids=probe, use_cache=False).logits[0, -64:].float().cpu()
                rec["gemm_match"] = fp8_gemm_matches(model)
                rec["fp8_weights_dequantized_vs_fake_fp8_logits"] = _logit_gap(stored, fake)
    except PartTimeout as e:
        rec["status"] = "timeout"
        rec["stopped"] = f"{e} after {time.perf_counter() - t0:.0f}s; the figures recorded before it stay"


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
    # fp8_speed runs last, so a part that overruns (torch.compile on a cold machine) cannot take time from the
    # others; distill keeps its budget in reserve, and its own hard stop (`_raise_after`) bounds it.
    with report.part("distill", probe) as rec:
        part_distill(rec, s, teacher, scratch, budget("distill", reserve=s.budgets["fp8_speed"] + 5), peak_flops)
    with report.part("fp8_speed", probe) as rec:
        part_fp8_speed(rec, s, teacher, budget("fp8_speed", reserve=2))


if __name__ == "__main__":
    sys.exit(main())
