"""Recipes: strict schema with errors that name the key, every shipped recipe plans offline, and a whole run on a
tiny model that a rerun skips."""

import json
import math
import sys
from pathlib import Path

import pytest
import yaml

from minipuzzle.errors import UserError
from minipuzzle.recipe import RECIPES_DIR, load_recipe, parse_recipe, plan_run, prune_settings
from minipuzzle.testing import run_cli

SHIPPED = sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


def test_shipped_recipes_exist():
    shipped = {"nemotron-h-56b-to-47b", "nemotron-h-8b-to-4b", "nano-12b-v2-to-9b", "nemotron-3-nano-30b-to-22b"}
    assert shipped | {"demo"} <= set(SHIPPED)


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_recipe_dry_run_offline(name):
    code, out, err = run_cli(["run", name, "--dry-run", "--json"])
    assert code == 0, err
    plan = json.loads(out)
    assert [s["stage"] for s in plan["stages"]][:2] == ["score", "prune"]
    assert plan["total_gpu_hours"] > 0


def test_56b_recipe_is_minipuzzle_as_published():
    r = load_recipe("nemotron-h-56b-to-47b")
    assert r.prune.axes == ("depth", "ffn") and r.prune.steps == {"ffn": 1024}
    assert r.prune.min_width * 32768 == 24576
    assert (r.score.depth_samples, r.score.width_samples) == (128, 1024)
    assert (r.prune.memory, r.prune.precision, r.prune.context) == ("31.7GiB", "fp4", 1048576)
    assert r.distill.tokens == 63e9 and r.distill.seq_len == 8192 and r.distill.batch_size == 768
    assert r.distill.loss == "forward_kl" and r.distill.lm_weight == 0 and r.distill.launcher == "torchrun"
    plan = plan_run(r)
    distill = next(s for s in plan["stages"] if s["stage"] == "distill")
    assert distill["tokens"] >= 63e9


def test_recipe_norm_compensation_reaches_the_prune_settings():
    doc = _demo_doc()
    assert prune_settings(parse_recipe(doc)).norm_compensation is True
    doc["prune"]["norm_compensation"] = False
    assert prune_settings(parse_recipe(doc)).norm_compensation is False
    doc["prune"]["norm_compensation"] = "maybe"
    with pytest.raises(UserError, match=r"prune\.norm_compensation"):
        parse_recipe(doc)


def _demo_doc():
    return yaml.safe_load((RECIPES_DIR / "demo.yaml").read_text())


@pytest.mark.parametrize(
    "mutate, needle",
    [
        (lambda d: d["prune"].update(budgett="1"), "prune.budgett: unknown key"),
        (lambda d: d.update(extra={}), "extra: unknown key"),
        (lambda d: d["distill"].update(lr="fast"), "distill.lr"),
        (lambda d: d["prune"].update(axes=["depth", "wings"]), "prune.axes"),
        (lambda d: d["score"].update(depth_samples=0), "score.depth_samples"),
        (lambda d: d["score"].update(width_agg="abs_mean,median"), "score.width_agg: invalid width agg"),
        (lambda d: d["eval"].update(speed_batch=0), "eval.speed_batch"),
        (lambda d: d["prune"].pop("target"), "prune"),
        (lambda d: d["distill"].update(quantize="fp8"), "distill.quantize already exports the quantized student"),
    ],
)
def test_schema_errors_name_the_key(mutate, needle):
    doc = _demo_doc()
    doc["prune"].pop("memory", None)
    mutate(doc)
    with pytest.raises(UserError, match=needle.replace(".", r"\.")):
        parse_recipe(doc)


def test_bad_recipe_file_is_one_line_exit_2(tmp_path):
    bad = tmp_path / "bad.yaml"
    doc = _demo_doc()
    doc["model"]["sorce"] = "x"
    bad.write_text(yaml.safe_dump(doc))
    code, out, err = run_cli(["run", str(bad), "--dry-run"])
    assert code == 2 and "model.sorce" in err and len(err.strip().splitlines()) == 1
    code, _, err = run_cli(["run", "no-such-recipe", "--dry-run"])
    assert code == 2 and "recipe not found" in err


def test_whole_run_on_a_tiny_model_then_rerun_skips(tmp_path, tiny_checkpoint, tokenizer):
    """score -> prune -> distill -> eval -> report on a tiny model; a rerun does nothing; another recipe in the
    same folder is refused."""
    if tiny_checkpoint.name != "model":
        pytest.skip("one weight style is enough for the runner")
    from minipuzzle.testing import stdlib_text_folder

    texts = stdlib_text_folder(tmp_path / "texts", 6)
    held = sorted(p.name for p in texts.iterdir())[:1]
    doc = {
        "name": "tiny",
        "model": {"source": str(tiny_checkpoint), "dtype": "float32"},
        "data": {"source": str(texts), "held_out_files": held},
        "score": {"depth_samples": 4, "width_samples": 8, "seq_len": 32},
        "prune": {
            "target": "0.85",
            "axes": ["depth", "ffn"],
            "candidates": 2,
            "held_out_windows": 4,
            "candidate_distill_tokens": 256,
        },
        "distill": {
            "max_steps": 4,
            "seq_len": 32,
            "batch_size": 4,
            "lr": 1e-3,
            "warmup": 1,
            "save_every": 2,
            "eval_every": 2,
        },
        "quantize": {"precision": "fp8", "samples": 4, "seq_len": 32},
        "eval": {"held_out_windows": 4, "seq_len": 32, "speed": False},
    }
    recipe_file = tmp_path / "tiny.yaml"
    recipe_file.write_text(yaml.safe_dump(doc))
    run_dir = tmp_path / "run"
    code, out, err = run_cli(["run", str(recipe_file), "-o", str(run_dir)])
    assert code == 0, err
    for stage in ("score/scores.json", "prune/prune_report.json", "distill/metrics.jsonl", "eval/report.json"):
        assert (run_dir / stage).is_file(), stage
    assert (run_dir / "report.html").is_file()
    cands = json.loads((run_dir / "prune" / "prune_report.json").read_text())["candidates"]
    assert all("kl_to_teacher" in c["before_distill"] for c in cands)  # each candidate was distilled briefly
    # The undistilled student is evaluated on the same windows, and the page shows both.
    assert (run_dir / "eval_pruned" / "report.json").is_file()
    assert "Distillation: before and after" in (run_dir / "report.html").read_text()
    # The distilled student quantized to FP8 and evaluated on the same windows, shown beside the bf16 one.
    assert json.loads((run_dir / "quantize" / "quantize.json").read_text())["source"] == str(run_dir / "distill")
    quant = json.loads((run_dir / "eval_quantized" / "report.json").read_text())
    assert quant["tokens"] == json.loads((run_dir / "eval" / "report.json").read_text())["tokens"]
    assert "Quantization: teacher, bf16 and quantized student" in (run_dir / "report.html").read_text()
    # The held-out file was never used for training: the train folder lacks it.
    assert held[0] not in {p.name for p in (run_dir / "data" / "train").iterdir()}
    from minipuzzle.checkpoint.read import Checkpoint

    teacher, student = Checkpoint(tiny_checkpoint).layout, Checkpoint(run_dir / "distill").layout
    assert student.num_params() <= 0.85 * teacher.num_params()
    report = json.loads((run_dir / "eval" / "report.json").read_text())
    assert report["kl_to_teacher"] > 0
    mtime = (run_dir / "eval" / "report.json").stat().st_mtime_ns
    code, out, err = run_cli(["run", str(recipe_file), "-o", str(run_dir)])
    assert code == 0 and out.count("skipped") == 6 and "[score] done already" in out
    assert (run_dir / "eval" / "report.json").stat().st_mtime_ns == mtime
    # A dry run given the run folder plans distillation and eval for the student prune wrote, as the run does.
    def distill_part(*extra):
        code, out, err = run_cli(["run", str(recipe_file), "--dry-run", "--json", *extra])
        assert code == 0, err
        return next(s for s in json.loads(out)["memory"]["stages"] if s["stage"] == "distill")["parts"][0]

    # Hand count on one CPU device (no sharding, no autocast copy), every checkpoint float32: the teacher's 4 bytes
    # a parameter, the student's float32 master weights (4), AdamW's two moments (8) and gradients (4) plus the
    # chunked loss's float32 head-gradient accumulator [V, h]. Parameters are counted from the safetensors headers.
    from safetensors import safe_open

    def stored_params(folder):
        n = 0
        for f in folder.glob("*.safetensors"):
            with safe_open(str(f), "pt") as st:
                n += sum(math.prod(st.get_slice(k).get_shape()) for k in st.keys())
        return n

    ps, pt = stored_params(run_dir / "prune"), stored_params(tiny_checkpoint)
    assert ps < pt
    got = distill_part("-o", str(run_dir))["memory"]
    head = student.vocab_size * student.hidden_size
    want = {"weights": 4 * pt, "master_weights": 4 * ps, "optimizer_state": 8 * ps, "gradients": 4 * ps + 4 * head}
    assert {k: got[k] for k in want} == want
    assert distill_part()["memory"]["master_weights"] == 4 * pt  # no folder: the teacher bounds the student
    doc["prune"]["target"] = "0.7"
    recipe_file.write_text(yaml.safe_dump(doc))
    code, _, err = run_cli(["run", str(recipe_file), "-o", str(run_dir)])
    assert code == 2 and "different recipe" in err


def test_recipe_ranks_on_eval_text_or_a_head_that_distillation_skips(tmp_path, tiny_checkpoint, monkeypatch):
    """With held-out files, prune ranks on them; with one plain file, on the head of the training text, and the
    final distillation takes at least those tokens as its (never trained on) evaluation windows."""
    import math

    from minipuzzle import runner
    from minipuzzle.prune import stage as pipeline
    from minipuzzle.testing import stdlib_text_folder

    if tiny_checkpoint.name != "model":
        pytest.skip("one weight style is enough for the runner")
    texts = stdlib_text_folder(tmp_path / "texts", 3)
    held_file = sorted(p.name for p in texts.iterdir())[0]
    calls = []
    monkeypatch.setattr(pipeline, "prune", lambda *a, **kw: calls.append((a, kw)))
    doc = {"name": "t", "model": {"source": str(tiny_checkpoint)},
           "data": {"source": str(texts), "held_out_files": [held_file]},
           "score": {"seq_len": 64}, "prune": {"target": "0.85", "held_out_windows": 10},
           "distill": {"max_steps": 3, "seq_len": 32, "eval_every": 0}}  # fmt: skip
    for data, separate in (({"source": str(texts), "held_out_files": [held_file]}, True),
                           ({"source": str(texts / held_file)}, False)):  # fmt: skip
        recipe = parse_recipe(doc | {"data": data})
        rd = runner.prepare_data(recipe, tmp_path / f"run{separate}" / "data")
        assert rd.separate_held_out is separate
        runner._prune(recipe, tiny_checkpoint, rd, tmp_path / f"run{separate}", progress=False)
        (_, _, _, train), kw = calls[-1]
        cfg = runner.distill_settings(recipe, tiny_checkpoint, rd, tmp_path, progress=False)
        if separate:
            assert kw["held_out_data"] == rd.held_out and held_file not in {p.name for p in Path(train).iterdir()}
            assert cfg.eval_data == rd.held_out
        else:
            assert kw["held_out_data"] is None and train == rd.train == cfg.data
            assert cfg.eval_data is None and cfg.eval_every >= 1
            assert cfg.held_out_windows * cfg.seq_len >= 10 * 64 and cfg.held_out_windows == math.ceil(10 * 64 / 32)


def test_recipe_sets_every_distill_field_and_torchrun_rebuilds_the_settings(tmp_path, pair):
    """The distill section is DistillSettings (hidden_map and all); the torchrun command generated from the
    settings parses back, through the real `distill` command, to the same settings."""

    from minipuzzle import runner
    from minipuzzle.cli import commands_of
    from minipuzzle.distill import launch
    from minipuzzle.settings import DistillSettings

    doc = _demo_doc()
    doc["distill"] |= {"tokens": "40960", "hidden_weight": 0.5, "hidden_map": "0:0,1:2", "beta2": 0.99,
                       "streaming": True, "autocast": False, "launcher": "torchrun", "nproc_per_node": 4}  # fmt: skip
    doc["distill"].pop("max_steps")
    doc["model"] |= {"dtype": "bfloat16", "device": "cpu"}
    recipe = parse_recipe(doc)
    rd = runner.RunData(train="train-dir", held_out="held-dir")
    (tmp_path / "prune").symlink_to(pair[1])
    settings = runner.distill_settings(recipe, pair[0], rd, tmp_path, progress=False)
    assert settings.max_steps == 20 and settings.layer_pairs() == [(0, 0), (1, 2)] and settings.beta2 == 0.99
    assert (settings.teacher_dtype, settings.device, settings.eval_data) == ("bfloat16", "cpu", "held-dir")
    cmd = launch.torchrun_command(settings, 1, 4)
    assert cmd[:5] == [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=4"]
    assert "--hidden-map" in cmd
    args = cmd[cmd.index("distill") + 1 :]
    ctx = commands_of("minipuzzle.distill.command")["distill"].make_context("distill", args)
    # The command's other options (--gpu-memory / --gpus) are not distillation settings.
    assert DistillSettings(**{k: v for k, v in ctx.params.items() if k in DistillSettings.model_fields}) == settings


@pytest.mark.parametrize("key, value", [("teacher", "x"), ("split", "validation"), ("teacher_dtype", "float32")])
def test_recipe_refuses_distill_fields_the_run_decides(key, value):
    doc = _demo_doc()
    doc["distill"][key] = value
    with pytest.raises(UserError, match=f"distill: {key} is set by the run"):
        parse_recipe(doc)
    doc["distill"].pop(key)
    doc["distill"]["warmup"] = -1
    with pytest.raises(UserError, match=r"distill\.warmup"):
        parse_recipe(doc)


def test_settings_name_the_depth_metrics_and_width_statistic_scoring_knows():
    from minipuzzle.score.depth import DEPTH_METRICS
    from minipuzzle.score.experts import DEFAULT_EXPERT_ESTIMATOR, EXPERT_ESTIMATORS
    from minipuzzle.score.width import DEFAULT_AGG
    from minipuzzle.settings import DEFAULT_WIDTH_AGG
    from minipuzzle.settings import DEPTH_METRICS as NAMED
    from minipuzzle.settings import EXPERT_ESTIMATORS as ESTIMATORS

    assert NAMED == tuple(DEPTH_METRICS)
    assert DEFAULT_WIDTH_AGG == DEFAULT_AGG
    assert ESTIMATORS == tuple(EXPERT_ESTIMATORS) and ESTIMATORS[0] == DEFAULT_EXPERT_ESTIMATOR
