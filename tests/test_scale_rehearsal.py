"""The scale rehearsal's path on a tiny checkpoint: every stage runs in its own process and is measured against
the memory plan. The bounds (0.6 x checkpoint, 30 %) are not asserted: a 3 MB model's peak is the interpreter's."""

import importlib.util
import json
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "scale_rehearsal.py"


def _module():
    spec = importlib.util.spec_from_file_location("scale_rehearsal", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_rehearsal_records_every_stage_against_its_plan(tmp_path):
    sr = _module()
    rec = sr.rehearse("tiny", tmp_path, threads=1, log=lambda _: None)
    assert set(rec["stages"]) == {"score", "prune", "candidate distillation", "cut", "distill", "eval"}
    for name, s in rec["stages"].items():
        # cut imports less than the stages (no datasets, lm-eval): half the baseline is still an interpreter's
        assert s["peak_rss"] > rec["baseline_rss"]["stage"] / 2 > 0, name
        assert s["predicted"] > 0 and s["predicted_with_baseline"] > s["predicted"], name
    # distillation ran under torchrun: two ranks beside the launcher and the stage process, planned on 2 devices
    assert rec["stages"]["distill"]["processes"] >= 4
    assert rec["stages"]["distill"]["interpreters"] == {"stage": 1, "launcher": 1, "model": 2}
    assert rec["baseline_rss"]["launcher"] < rec["baseline_rss"]["stage"] < rec["baseline_rss"]["model"]
    assert rec["stages"]["distill"]["planned_processes"] == 2
    d = rec["stages"]["distill"]
    assert 2 * (d["device_total"] - d["host_buffers"]) + d["host_buffers"] == d["predicted"]  # host: per node
    # prune trained its candidates in a child process: its own process and the children are measured apart
    prune, cand = rec["stages"]["prune"], rec["stages"]["candidate distillation"]
    assert prune["processes"] == 1 and cand["processes"] >= 1 and cand["part"] == "candidate distillation"
    assert 0 < prune["peak_rss"] and 0 < cand["peak_rss"] and prune["part"] != "candidate distillation"
    # the stages wrote what the next one reads: the cut student matches prune's, eval compared it to the teacher
    pruned = json.loads((tmp_path / "run" / "prune" / "config.json").read_text())
    cut = json.loads((tmp_path / "cut" / "config.json").read_text())
    assert pruned["layers_block_type"] == cut["layers_block_type"]
    assert (tmp_path / "run" / "distill" / "config.json").is_file()
    # ... with gradient accumulation, as the 56B recipe's plan runs it: 4 windows a step = 2 ranks x 1 x 2
    ran = json.loads((tmp_path / "run" / "distill" / "distill.json").read_text())["config"]
    assert (ran["batch_size"], ran["grad_accum"]) == (4, 2)
    assert (tmp_path / "run" / "eval").is_dir()
    assert len(rec["checks"]) == 10 and all(isinstance(c["pass"], bool) for c in rec["checks"].values())
