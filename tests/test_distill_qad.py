"""Quantization-aware distillation (`distill --quantize`) on the CPU with FP8 (NVFP4 is a `gpu` test).

References are independent of the code under test: the resumed run is compared with an uninterrupted one (and
must not calibrate at all: calibration is made to fail there); the exported checkpoint is reloaded by the PTQ
loader and compared with the in-memory fake-quantized student the training ended with; QAD with a learning rate
too small to move a float32 weight is compared with PTQ (`quantize_model` + `export_quantized`) of the same
student on the same windows read by a stream of their own; 2 processes under torchrun are compared with one;
refusals check exit code 2, one line, nothing written; the memory term against autograd's saved tensors.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from measured import saved_storages
from safetensors.torch import load_file

from minipuzzle.testing import run_cli

pytest.importorskip("modelopt")

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS, SAVE_EVERY = 8, 2


def _args(pair, out: Path, *more: str, steps: int = STEPS) -> list[str]:
    teacher, student, data = pair
    return ["distill", "--teacher", str(teacher), "--student", str(student), "--data", str(data), "-o", str(out),
            "--max-steps", str(steps), "--seq-len", "32", "--batch-size", "4", "--grad-accum", "2", "--lr", "3e-3",
            "--warmup", "1", "--save-every", str(SAVE_EVERY), "--eval-every", "4", "--held-out-windows", "2",
            "--no-progress", "--quantize", "fp8", *more]  # fmt: skip


def _env() -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(torch.uint8)


def _steps_saved(out: Path) -> list[int]:
    ck = out.with_name(out.name + ".partial") / "checkpoints"
    return [int(p.name.split("-")[1]) for p in ck.iterdir() if p.name.startswith("step-")] if ck.is_dir() else []


def test_killed_qad_run_resumes_from_its_scales_to_identical_weights(pair, tmp_path, monkeypatch):
    import minipuzzle.distill.quantized as quantized

    ref_out, out = tmp_path / "ref", tmp_path / "out"
    assert run_cli(_args(pair, ref_out))[0] == 0
    # SIGKILL a real process right after it wrote a checkpoint.
    proc = subprocess.Popen([sys.executable, "-m", "minipuzzle.cli", *_args(pair, out)], env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    deadline = time.time() + 150
    while not _steps_saved(out):
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        assert time.time() < deadline, "no checkpoint within 150 s"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert not out.exists() and 0 < max(_steps_saved(out)) < STEPS

    # The rerun must take every scale from the checkpoint: calibrating again fails it.
    def no_calibration(*a, **k):
        raise AssertionError("a resumed QAD run calibrated again")

    restored = []
    real_restore = quantized.restore_points
    monkeypatch.setattr(quantized, "quantize_model", no_calibration)
    monkeypatch.setattr(quantized, "restore_points", lambda s, c: restored.append(real_restore(s, c)) or restored[-1])
    code, _, err = run_cli(_args(pair, out))
    assert code == 0, err[-2000:]
    assert restored and restored[0] > 0

    a, b = load_file(ref_out / "model.safetensors"), load_file(out / "model.safetensors")
    assert a.keys() == b.keys() and any(k.endswith("input_scale") for k in a)
    for k in a:  # FP8 weights, their scales, input scales and the bf16 tensors: bit for bit
        assert _bits(a[k]).equal(_bits(b[k])), k
    rows = lambda p: [json.loads(x) for x in (p / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    strip = lambda r: {k: v for k, v in r.items() if k != "tokens_per_s"}  # noqa: E731
    assert [strip(r) for r in rows(ref_out)] == [strip(r) for r in rows(out)]
    assert json.loads((out / "distill.json").read_text())["config"]["quantize"] == "fp8"


def _first_batch(pair, n: int, seq_len: int) -> torch.Tensor:
    from minipuzzle.data import load_tokenizer
    from minipuzzle.distill.stream import WindowStream

    return WindowStream(str(pair[2]), load_tokenizer(pair[1]), seq_len).take(n)


def _round_kept_to_bf16(student) -> None:
    """Round every tensor the export stores in bf16 (all but the quantized weights and the float32 routers)."""
    from minipuzzle.quantize.configs import quantized_modules

    quant = set(quantized_modules(student))
    fp32 = tuple(getattr(student, "_keep_in_fp32_modules_strict", None) or ())
    for n, p in student.named_parameters():
        if n in quant or (n.endswith(".weight") and n.removesuffix(".weight") in quant) or any(f in n for f in fp32):
            continue
        p.copy_(p.to(torch.bfloat16).float())


def _watch_export(monkeypatch, ids) -> dict:
    """Wrap the QAD export so that, just before it, the trained student's logits on `ids` (its kept tensors
    rounded to bf16, as the checkpoint stores them) land in the returned dict under "logits"."""
    import minipuzzle.distill.quantized as quantized

    seen = {}
    real_export = quantized.export_student

    def spy(student, *a, **k):
        with torch.no_grad():
            _round_kept_to_bf16(student)
            seen["logits"] = student.eval()(ids, use_cache=False).logits
        return real_export(student, *a, **k)

    monkeypatch.setattr(quantized, "export_student", spy)
    return seen


def test_qad_export_reloads_as_the_trained_student(pair, tmp_path, monkeypatch):
    """The checkpoint a QAD run writes, reloaded by the PTQ loader, computes what the fake-quantized student
    computed at the end of training (its kept tensors rounded to bf16, as the checkpoint stores them)."""
    from minipuzzle.quantize.load import load_quantized

    ids = _first_batch(pair, 2, 32)
    seen = _watch_export(monkeypatch, ids)
    out = tmp_path / "qad"
    assert run_cli(_args(pair, out, "--save-every", "0", steps=4))[0] == 0
    assert json.loads((out / "quantize.json").read_text())["precision"] == "fp8"
    assert json.loads((out / "hf_quant_config.json").read_text())["quantization"]["quant_algo"] == "FP8"
    back = load_quantized(out)
    with torch.no_grad():
        got = back(ids, use_cache=False).logits
    torch.testing.assert_close(got, seen["logits"], atol=1e-5, rtol=1e-5)


def test_qad_at_a_vanishing_learning_rate_is_ptq_of_the_student(pair, tmp_path):
    """One step at lr 1e-30 (the CLI takes lr > 0; no float32 weight above 1e-22 moves) exports what PTQ of the
    student writes when calibrated on the same windows, the first training batch, in the same micro-batches."""
    from minipuzzle.checkpoint.build import load_model
    from minipuzzle.checkpoint.read import Checkpoint
    from minipuzzle.quantize.calibrate import quantize_model
    from minipuzzle.quantize.export import export_quantized

    out = tmp_path / "qad"
    args = _args(pair, out, "--save-every", "0", "--eval-every", "0", "--held-out-windows", "0", steps=1)
    args[args.index("--lr") + 1] = "1e-30"
    assert run_cli(args)[0] == 0
    student = load_model(Checkpoint(pair[1]), dtype=torch.float32)
    quantize_model(student, "fp8", _first_batch(pair, 4, 32), batch_size=2)
    export_quantized(student, tmp_path / "ptq", summary={})
    a, b = load_file(out / "model.safetensors"), load_file(tmp_path / "ptq" / "model.safetensors")
    assert a.keys() == b.keys()
    exact = [k for k in a if a[k].dtype == torch.float8_e4m3fn or k.endswith("_scale")]
    assert len(exact) > 8
    for k in a:
        if k in exact:
            assert _bits(a[k]).equal(_bits(b[k])), k
        else:
            torch.testing.assert_close(a[k].float(), b[k].float(), atol=1e-29, rtol=0)


@pytest.mark.parametrize("case", ["nvfp4_cpu", "unknown"])
def test_refusals_before_any_model_loads(pair, tmp_path, case):
    args = _args(pair, tmp_path / "out", "--device", "cpu")
    args[args.index("--quantize") + 1] = {"nvfp4_cpu": "nvfp4", "unknown": "int4"}[case]
    code, _, err = run_cli(args)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert {"nvfp4_cpu": "nvfp4 needs a CUDA GPU", "unknown": "--quantize 'int4'"}[case] in err
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_nvfp4_qad_trains_and_reloads(pair, tmp_path, monkeypatch):
    """NVFP4 QAD on a GPU: the loss falls, and the exported NVFP4 checkpoint reloads as the trained student."""
    from minipuzzle.quantize.export import weight_bytes
    from minipuzzle.quantize.load import load_quantized

    ids = _first_batch(pair, 2, 32).cuda()
    seen = _watch_export(monkeypatch, ids)
    out = tmp_path / "nvfp4"
    args = _args(pair, out, "--save-every", "0", "--device", "cuda", "--no-autocast", steps=12)
    args[args.index("--quantize") + 1] = "nvfp4"
    code, _, err = run_cli(args)
    assert code == 0, err[-2000:]
    evals = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"eval"' in x]
    assert evals[-1]["kl_to_teacher"] < evals[0]["kl_to_teacher"]
    assert json.loads((out / "hf_quant_config.json").read_text())["quantization"]["quant_algo"] == "NVFP4"
    b = weight_bytes(out)
    assert b["quantized"] * 2 == b["quantized_params"]
    back = load_quantized(out, device="cuda")
    with torch.no_grad():
        got = back(ids, use_cache=False).logits
    torch.testing.assert_close(got, seen["logits"], atol=1e-4, rtol=1e-4)


def test_two_processes_match_one_and_resume_from_their_sharded_checkpoint(pair, tmp_path):
    """QAD under torchrun + FSDP2 (2 gloo processes, --grad-accum 2: one sequence per micro-step each), stopped by
    SIGTERM after a sharded checkpoint and resumed on 2 processes, exports what one process exports: the same
    scales (calibrated on the same windows, restored from the checkpoint), and FP8 weights that differ only where
    float sums in another order move a weight across a rounding boundary (one FP8 step, rarely)."""
    ref_out, out = tmp_path / "ref", tmp_path / "out"
    assert run_cli(_args(pair, ref_out))[0] == 0
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "minipuzzle.cli",
           *_args(pair, out)]  # fmt: skip
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 240
    while not _steps_saved(out):
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        assert time.time() < deadline, "no checkpoint from torchrun within 240 s"
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)  # torchrun forwards it to both workers
    log = proc.communicate(timeout=120)[0]
    assert "stopped by SIGTERM after step" in log, log[-3000:]
    assert not out.exists() and max(_steps_saved(out)) < STEPS
    done = subprocess.run(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:]
    assert json.loads((out / "distill.json").read_text())["config"]["quantize"] == "fp8"

    a, b = load_file(ref_out / "model.safetensors"), load_file(out / "model.safetensors")
    assert a.keys() == b.keys()
    scales = [k for k in a if k.endswith(("input_scale", "weight_scale"))]
    assert len(scales) > 8
    for k in scales:
        torch.testing.assert_close(b[k], a[k], rtol=1e-6, atol=0)
    for k in a:
        if a[k].dtype == torch.float8_e4m3fn:
            x, y = a[k].float(), b[k].float()
            step = (x.abs().clamp(min=2**-6) * 2**-3)  # one E4M3 step: 3 mantissa bits (subnormals: 2^-9)
            assert ((x - y).abs() <= step + 2**-9).all(), k
            assert (x != y).float().mean() < 0.01, k
        elif k not in scales:
            torch.testing.assert_close(b[k].float(), a[k].float(), atol=3e-4, rtol=0)


def _saved_bytes(model, ids) -> int:
    """Bytes of the distinct non-parameter storages autograd saves for the backward of one training forward."""
    return saved_storages(lambda: model(ids, use_cache=False).logits.sum(), exclude=list(model.parameters()))


def test_plan_counts_what_fake_quantization_adds_to_a_step():
    """Measured on a tiny model in float32 on the CPU: what autograd saves with FP8 fake quantizers minus what it
    saves without, plus the largest pair of rounded copies (weight and input) one quantized linear makes, equals
    the plan's QAD term; and the distill plan adds exactly that term to its activations."""
    from minipuzzle.hardware import Hardware
    from minipuzzle.memory import distill_memory
    from minipuzzle.memory.terms import qad_step_bytes
    from minipuzzle.quantize.calibrate import quantize_model
    from minipuzzle.settings import DistillSettings
    from minipuzzle.testing import random_model, tiny_layout

    layout = tiny_layout()
    ids = torch.randint(0, layout.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    plain = _saved_bytes(random_model(layout).train(), ids)
    q = quantize_model(random_model(layout), "fp8", ids, batch_size=2).train()
    copies = {}
    for name, mod in q.named_modules():
        for which in ("weight_quantizer", "input_quantizer"):
            quant = getattr(mod, which, None)
            if quant is not None and quant.is_enabled:
                quant.register_forward_hook(lambda m, a, out, n=name, w=which: copies.__setitem__((n, w), out.nbytes))
    extra = _saved_bytes(q, ids) - plain
    transient = max(copies[(n, "weight_quantizer")] + copies[(n, "input_quantizer")] for n, _ in copies)
    assert extra > 0 and transient > 0
    assert qad_step_bytes(layout, 64, 4, checkpointing=False) == extra + transient

    hw = Hardware(device="cpu", gpu_memory=64 * 2**30)
    ds = DistillSettings(max_steps=1, seq_len=32, batch_size=2, grad_accum=1, activation_checkpointing=False)
    base = distill_memory(layout, layout, hw, ds).memory.activations
    qad = distill_memory(layout, layout, hw, ds.model_copy(update={"quantize": "fp8"})).memory.activations
    assert qad - base == extra + transient
