"""The distillation loop end to end on a tiny teacher and a lossy depth-pruned student (one process, CPU)."""

import json

import pytest
import torch

from minipuzzle.artifacts import DistillState
from minipuzzle.distill.loop import Diverged, distill
from minipuzzle.distill.losses import DistillObjective
from minipuzzle.errors import UserError
from minipuzzle.settings import DistillSettings
from minipuzzle.testing import random_model, run_cli, save_model, tiny_layout

pytestmark = pytest.mark.usefixtures("one_thread")


def _cfg(pair, out, **kw):
    teacher, student, data = pair
    base = dict(teacher=str(teacher), student=str(student), data=str(data), output=str(out), max_steps=16,
                seq_len=32, batch_size=4, lr=3e-3, warmup=2, eval_every=8, held_out_windows=4, save_every=8)  # fmt: skip
    base.update(kw)
    return DistillSettings(**base)


def test_heldout_kl_falls_and_output_is_a_standard_checkpoint(pair, tmp_path):
    from transformers import AutoModelForCausalLM

    cfg = _cfg(pair, tmp_path / "out")
    out = distill(cfg)
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = {r["step"]: r for r in recs if r["type"] == "eval"}
    train = [r for r in recs if r["type"] == "train"]
    assert sorted(evals) == [0, 8, 16] and [r["step"] for r in train] == list(range(1, 17))
    assert evals[0]["kl_to_teacher"] > 0.02  # the pruned student is clearly lossy
    assert evals[16]["kl_to_teacher"] < 0.6 * evals[0]["kl_to_teacher"]
    assert evals[16]["agreement"] > evals[0]["agreement"]
    assert all(r["tokens_per_s"] > 0 and r["lr"] > 0 for r in train)
    assert not (tmp_path / "out.partial").exists()

    model = AutoModelForCausalLM.from_pretrained(out)
    before = AutoModelForCausalLM.from_pretrained(pair[1])
    ids = torch.randint(0, 320, (1, 16))
    assert not torch.allclose(model(ids, use_cache=False).logits, before(ids, use_cache=False).logits)
    assert (out / "tokenizer.json").is_file() and json.loads((out / "distill.json").read_text())["config"]

    # Rerunning the finished command is a no-op that returns the same folder.
    stamp = (out / "model.safetensors").stat().st_mtime_ns
    assert distill(_cfg(pair, tmp_path / "out")) == out
    assert (out / "model.safetensors").stat().st_mtime_ns == stamp

    # distill.json is the typed DistillState of this run; a key it does not know makes it no proof of a finished
    # run: the rerun refuses the non-empty folder instead of returning it.
    done = DistillState.read(out / "distill.json")
    # The plan's geometry is what ran: on the CPU one micro-batch of the whole batch, no recomputation.
    ran = cfg.model_copy(update={"grad_accum": 1, "activation_checkpointing": False, "sharding": "full",
                                 "accumulation": "sharded"})  # fmt: skip
    assert done.config == ran and done.trajectory == ran.trajectory() and done.warmup_steps == 1
    doc = json.loads((out / "distill.json").read_text())
    (out / "distill.json").write_text(json.dumps({**doc, "finished": True}))
    with pytest.raises(UserError, match="finished: unknown key"):
        DistillState.read(out / "distill.json")
    with pytest.raises(UserError, match="not empty"):
        distill(_cfg(pair, tmp_path / "out"))


def test_nan_loss_stops_with_message_and_keeps_last_checkpoint(pair, tmp_path, monkeypatch):
    calls = {"n": 0}
    forward = DistillObjective.forward

    def poisoned(self, ids, evaluate=False):
        res = forward(self, ids, evaluate)
        if not evaluate:
            calls["n"] += 1
            if calls["n"] >= 3:
                res = dict(res, loss=res["loss"] * float("nan"))
        return res

    monkeypatch.setattr(DistillObjective, "forward", poisoned)
    with pytest.raises(Diverged, match=r"loss is nan at step 3.*step-00000002 is kept"):
        distill(_cfg(pair, tmp_path / "out", save_every=2, eval_every=0))
    assert not (tmp_path / "out").exists()
    ck = sorted(p.name for p in (tmp_path / "out.partial" / "checkpoints").iterdir())
    assert ck == ["step-00000002"]


def _cli(pair, out, *extra):
    teacher, student, data = pair
    args = ["distill", "--teacher", str(teacher), "--student", str(student), "--data", str(data), "-o", str(out),
            "--max-steps", "2", "--seq-len", "32", "--batch-size", "2", "--eval-every", "0", "--no-progress"]  # fmt: skip
    return run_cli(args + list(extra))


@pytest.fixture(scope="module")
def odd_models(tmp_path_factory, tokenizer):
    from minipuzzle.testing import make_tokenizer

    root = tmp_path_factory.mktemp("odd")
    small_vocab = save_model(random_model(tiny_layout(vocab_size=256)), root / "v256", tokenizer=tokenizer)
    other_tok = save_model(random_model(), root / "othertok", tokenizer=make_tokenizer(300))
    return small_vocab, other_tok


def test_bad_input_is_one_line_exit_2_and_writes_nothing(pair, odd_models, tmp_path):
    teacher, student, data = pair
    short = tmp_path / "short.txt"
    short.write_text("x = 1\n")
    cases = [
        (["--student", str(odd_models[0])], "vocabulary"),
        (["--student", str(odd_models[1])], "tokenizer"),
        (["--data", str(tmp_path / "missing.txt")], "not found"),
        (["--data", str(short)], "less than one window"),
        (["--batch-size", "3", "--grad-accum", "2"], "multiple"),
        (["--hidden-weight", "1", "--hidden-map", "0:0,9:9"], "out of range"),
        (["--hidden-weight", "1"], "needs --hidden-map"),
        (["--teacher", str(tmp_path / "nope")], "not found"),
        (["--loss", "mse"], "unknown --loss"),
        (["--tokens", "lots"], "--tokens"),
    ]
    out = tmp_path / "out"
    for extra, needle in cases:
        code, _, err = _cli(pair, out, *extra)
        assert code == 2, (extra, err)
        assert err.startswith("error: ") and err.count("\n") == 1 and needle in err, (extra, err)
        assert not out.exists() and not (tmp_path / "out.partial").exists(), extra
    # A non-empty output folder is refused before any work.
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, _, err = _cli(pair, out)
    assert code == 2 and "not empty" in err and (out / "keep.txt").read_text() == "mine"


def test_warmup_longer_than_the_run_is_clamped_and_logged(pair, tmp_path):
    out = tmp_path / "out"
    code, _, err = _cli(pair, out, "--max-steps", "60", "--warmup", "80", "--seq-len", "8", "--batch-size", "1",
                        "--save-every", "0")  # fmt: skip
    assert code == 0, err[-2000:]
    assert "--warmup 80 is more than 10% of the 60-step run: warming up for 6 steps" in err
    lrs = [json.loads(line)["lr"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    peak = lrs.index(max(lrs))
    assert 0 < peak < 59 and lrs[0] < lrs[peak] and lrs[-1] < lrs[peak]
    assert all(a > b for a, b in zip(lrs[peak:], lrs[peak + 1 :]))  # it decays after the warmup
    assert json.loads((out / "distill.json").read_text())["warmup_steps"] == 6
