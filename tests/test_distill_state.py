"""The typed files of an unfinished distillation run: run.json (a DistillState) and metrics.jsonl on resume."""

import json

import pytest

from minipuzzle.artifacts import DistillState, EvalRow, TrainRow, read_metrics
from minipuzzle.distill import state
from minipuzzle.distill.parallel import Dist
from minipuzzle.errors import UserError
from minipuzzle.settings import DistillSettings


def _cfg(**kw) -> DistillSettings:
    base = dict(teacher="t", student="s", data="d.txt", output="out", max_steps=40, warmup=10, seq_len=8)
    return DistillSettings(**{**base, **kw})


def test_run_json_is_a_distill_state_and_guards_the_trajectory(tmp_path):
    cfg = _cfg()
    state.check_run(tmp_path, cfg)
    rec = DistillState.read(tmp_path / "run.json")
    assert rec == DistillState.of(cfg) and rec.warmup_steps == 4 and rec.config.lr == cfg.lr
    state.check_run(tmp_path, _cfg(progress=True, save_every=3))  # settings outside the trajectory may change
    with pytest.raises(UserError, match=r"unfinished run with lr=0\.0001, not 0\.002: rerun it with the same"):
        state.check_run(tmp_path, _cfg(lr=2e-3))
    assert DistillState.read(tmp_path / "run.json") == rec  # the refused run did not overwrite the record

    doc = json.loads((tmp_path / "run.json").read_text())
    for bad, needle in [
        ({**doc, "started": "yesterday"}, "started: unknown key"),
        ({**doc, "config": {**doc["config"], "lr_schedule": "linear"}}, "unknown setting --lr-schedule"),
        ({**doc, "trajectory": {**doc["trajectory"], "lr": 1.0}}, "trajectory differs"),
        ({k: v for k, v in doc.items() if k != "teacher"}, "teacher: Field required"),
    ]:
        (tmp_path / "run.json").write_text(json.dumps(bad))
        with pytest.raises(UserError, match=needle) as err:
            state.check_run(tmp_path, cfg)
        assert "\n" not in str(err.value) and str(err.value).startswith(str(tmp_path / "run.json")), needle


def _train(step: int) -> dict:
    return dict(type="train", step=step, loss=2.0 / step, kl=1.0 / step, lm=0.0, hidden=0.0, lr=1e-3,
                grad_norm=0.5, tokens=8 * step, tokens_per_s=1234.5)  # fmt: skip


def test_metrics_log_keeps_typed_rows_up_to_the_checkpoint(tmp_path):
    path, d = tmp_path / "metrics.jsonl", Dist()
    log = state.MetricsLog(path, d, resume_step=None)
    ev = dict(type="eval", step=0, loss=3.0, kl_to_teacher=0.5, accuracy=0.1, agreement=0.2, tokens=64,
              perplexity=20.09)  # fmt: skip
    for rec in [ev] + [_train(i) for i in range(1, 6)]:
        log.write(rec)
    written = path.read_text()
    with open(path, "a") as fh:
        fh.write('{"type": "train", "step": 6, "lo')  # the line SIGKILL cut
    state.MetricsLog(path, d, resume_step=3)
    rows = read_metrics(path)
    assert [type(r) for r in rows] == [EvalRow, TrainRow, TrainRow, TrainRow] and rows[-1].step == 3
    assert path.read_text() == "".join(written.splitlines(keepends=True)[:4])  # kept rows are byte for byte

    with pytest.raises(ValueError, match="grad_norm"):
        log.write({k: v for k, v in _train(4).items() if k != "grad_norm"})
    path.write_text(path.read_text().replace('"type":"train"', '"type":"train","note":1', 1))
    with pytest.raises(UserError, match=r"line 2 is not a metrics row .*train\.note: unknown key") as err:
        state.MetricsLog(path, d, resume_step=3)
    assert "\n" not in str(err.value)


def test_a_run_recorded_with_the_older_window_name_still_resumes(tmp_path):
    """run.json written when distillation called its held-out window count `eval_windows`: the same settings
    resume it, different ones are still refused."""
    cfg = _cfg(held_out_windows=12)
    state.check_run(tmp_path, cfg)
    doc = json.loads((tmp_path / "run.json").read_text())
    for part in ("trajectory", "config"):
        if "held_out_windows" in doc[part]:
            doc[part]["eval_windows"] = doc[part].pop("held_out_windows")
    assert "eval_windows" in doc["config"]
    (tmp_path / "run.json").write_text(json.dumps(doc))
    state.check_run(tmp_path, cfg)  # accepted: the same run
    with pytest.raises(UserError, match="unfinished run with lr="):
        state.check_run(tmp_path, _cfg(held_out_windows=12, lr=2e-3))
