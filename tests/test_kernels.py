"""The plan counts the Mamba path that will run: the fused kernels only where transformers resolved its Mamba
functions to them on a CUDA machine, else its PyTorch path with its float32 temporaries."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from minipuzzle.hardware import Hardware, resolve, with_detected_kernels
from minipuzzle.kernels import detect_mamba_path
from minipuzzle.recipe import RECIPES_DIR, parse_recipe, plan_run

GIB = 2**30


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="a CUDA machine: its path is what is installed")
def test_this_machine_runs_the_pytorch_path():
    here = detect_mamba_path()
    assert not here.fused and "no CUDA device" in here.why
    if not any(__import__("importlib").util.find_spec(p) for p in ("mamba_ssm", "causal_conv1d")):
        on_gpu = detect_mamba_path(cuda_available=True)
        assert not on_gpu.fused and "mamba-ssm and causal-conv1d not installed" in on_gpu.why


def _fake_packages(root, broken: bool):
    """mamba_ssm and causal_conv1d with the functions transformers looks up (or a mamba_ssm that fails to import,
    as one built for another torch does)."""
    ops = root / "mamba_ssm" / "ops" / "triton"
    ops.mkdir(parents=True)
    (root / "mamba_ssm" / "__init__.py").write_text("raise ImportError('built for another torch')\n" if broken else "")
    (root / "mamba_ssm" / "ops" / "__init__.py").write_text("")
    (ops / "__init__.py").write_text("")
    kernels = {"ssd_combined": ("mamba_chunk_scan_combined", "mamba_split_conv1d_scan_combined"),
               "selective_state_update": ("selective_state_update",)}  # fmt: skip
    for mod, fns in kernels.items():
        (ops / f"{mod}.py").write_text("".join(f"def {fn}(*args, **kwargs):\n    raise RuntimeError\n" for fn in fns))
    (root / "causal_conv1d").mkdir()
    (root / "causal_conv1d" / "__init__.py").write_text(
        "def causal_conv1d_fn(*a, **k):\n    raise RuntimeError\n\ndef causal_conv1d_update(*a, **k):\n    raise RuntimeError\n"
    )


@pytest.mark.parametrize("broken", [False, True])
def test_the_kernels_count_only_where_transformers_resolved_them(tmp_path, broken):
    """In a fresh interpreter (transformers resolves its Mamba functions once, at import) with the two packages on
    the path: fused when they import, the PyTorch path, naming the functions, when one does not."""
    _fake_packages(tmp_path, broken)
    code = textwrap.dedent("""
        import json
        from minipuzzle.kernels import detect_mamba_path
        p = detect_mamba_path(cuda_available=True)
        print(json.dumps([p.fused, p.why]))
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.getcwd(), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    fused, why = json.loads(out.stdout.strip().splitlines()[-1])
    if broken:
        assert not fused and "could not import the kernels for" in why and "chunk_scan" in why
    else:
        assert fused and why == "fused Mamba kernels (mamba-ssm, causal-conv1d)"


def test_on_a_cuda_machine_what_is_installed_decides():
    claimed = Hardware(gpu_memory="80GiB", gpus_per_node=8, mamba_kernels=True)
    assert claimed.fused_mamba
    here = with_detected_kernels(claimed, cuda_available=True)  # this machine has no mamba-ssm
    assert not here.fused_mamba and "PyTorch Mamba path" in here.describe()
    # Planning from a machine without CUDA: the recipe's or the option's word stands, and unknown is the PyTorch path.
    assert with_detected_kernels(claimed, cuda_available=False).fused_mamba
    assert not resolve(None, {"gpu_memory": "80GiB"}).fused_mamba
    assert resolve(None, {"gpu_memory": "80GiB", "mamba_kernels": True}).fused_mamba
    assert not resolve(Hardware(device="cpu", gpu_memory="8GiB"), {"mamba_kernels": True}).fused_mamba


def test_the_56b_plan_without_kernels_lowers_its_batches_and_refuses_distillation_in_one_line():
    """transformers' PyTorch scan keeps float32 temporaries of [tokens, heads, state]: per micro-batch of 8192
    tokens the 47B student's checkpointed activations are over three times what the fused kernels keep."""
    plans = {}
    for kernels in (True, False):
        doc = yaml.safe_load((RECIPES_DIR / "nemotron-h-56b-to-47b.yaml").read_text())
        doc["hardware"]["mamba_kernels"] = kernels
        plans[kernels] = plan_run(parse_recipe(doc))
    parts = {k: {(p["stage"], p["name"]): p for s in v["memory"]["stages"] for p in s["parts"]} for k, v in plans.items()}
    fused, slow = parts[True], parts[False]
    assert plans[True]["refusal"] is None
    for key in (("score", "depth pass"), ("score", "width pass"), ("prune", "ranking"), ("eval", "held-out")):
        assert slow[key]["fits"] and slow[key]["geometry"]["micro_batch"] < fused[key]["geometry"]["micro_batch"], key
    d_fused, d_slow = fused[("distill", "distill")], slow[("distill", "distill")]
    assert d_fused["fits"] and not d_slow["fits"]
    assert d_slow["memory"]["activations"] > 3 * d_fused["memory"]["activations"]
    refusal = plans[False]["refusal"]
    assert "\n" not in refusal and "does not fit" in refusal and "PyTorch Mamba path" in refusal


def test_the_plan_counts_the_attention_implementation_distillation_runs():
    """The demo recipe distilled with eager attention: the dry run names the path it counts, the distill part's
    launch says eager, and its checkpointed activations grow by the [heads x T] float32 scores per query of one
    attention block recomputed in the backward (and the teacher's forward), far beyond SDPA's."""
    plans = {}
    for impl in ("sdpa", "eager"):
        doc = yaml.safe_load((RECIPES_DIR / "demo.yaml").read_text())
        doc["distill"]["attn_implementation"] = impl
        plans[impl] = plan_run(parse_recipe(doc))
    parts = {k: {p["name"]: p for s in v["memory"]["stages"] for p in s["parts"]} for k, v in plans.items()}
    sdpa, eager = parts["sdpa"]["distill"], parts["eager"]["distill"]
    assert plans["sdpa"]["memory"]["attention"].startswith("SDPA")
    assert plans["eager"]["memory"]["attention"].startswith("eager") and "SDPA" in plans["eager"]["memory"]["attention"]
    assert eager["geometry"]["attention"] == "eager" and sdpa["geometry"]["attention"] == "sdpa"
    # At least the scores one recomputed student block keeps: float32 softmax over [heads, T] per token.
    doc = yaml.safe_load((RECIPES_DIR / "demo.yaml").read_text())
    tokens = eager["geometry"]["micro_batch"] * doc["distill"]["seq_len"]
    assets = Path(__import__("minipuzzle").__file__).parent / "assets"
    heads = json.loads((assets / "demo-teacher" / "config.json").read_text())["num_attention_heads"]
    grew = eager["memory"]["activations"] - sdpa["memory"]["activations"]
    assert grew >= tokens * 4 * heads * doc["distill"]["seq_len"]
    # Eval and scoring run transformers' default (SDPA) whatever distillation runs.
    assert parts["eager"]["held-out"]["memory"] == parts["sdpa"]["held-out"]["memory"]


def test_flash_attention_where_it_cannot_run_is_refused_in_one_line(tmp_path):
    from minipuzzle.testing import run_cli

    code, _, err = run_cli(["distill", "--teacher", "demo", "--student", "demo", "--data", str(tmp_path),
                            "-o", str(tmp_path / "out"), "--max-steps", "1", "--device", "cpu",
                            "--attn-implementation", "flash_attention_2"])  # fmt: skip
    assert code == 2 and err.count("\n") == 1 and "flash_attention_2 needs a CUDA GPU" in err, err
    assert not (tmp_path / "out").exists()
    code, _, err = run_cli(["distill", "--teacher", "demo", "--student", "demo", "--data", str(tmp_path),
                            "-o", str(tmp_path / "out"), "--attn-implementation", "flash"])  # fmt: skip
    assert code == 2 and "attn" in err and err.count("\n") == 1, err


def test_every_attention_implementation_the_settings_accept_has_a_planned_path():
    """The plan's attention paths and the implementations `--attn-implementation` accepts are one list: a new
    implementation without a planned path (or a path no setting can pick) fails here."""
    from typing import get_args

    from minipuzzle.kernels import ATTENTION_PATHS
    from minipuzzle.settings import DistillSettings

    accepted = get_args(DistillSettings.model_fields["attn_implementation"].annotation)
    assert set(accepted) == set(ATTENTION_PATHS)
