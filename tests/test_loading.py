"""Checkpoints written by transformers' own `save_pretrained` go through every command.

transformers (5.24) writes infinity in config.json as `{"__float__": "Infinity"}`; configs are read through
transformers, so that encoding, and any other it writes, reads as transformers reads it.
"""

import json

import pytest
import torch

from minipuzzle.errors import UserError
from minipuzzle.testing import random_model, run_cli

SMALL = ["--seq-len", "24", "--depth-samples", "2", "--width-samples", "4", "--held-out-windows", "2", "--candidates", "2"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tokenizer):
    """A tiny model saved by `NemotronHForCausalLM.save_pretrained`, with a tokenizer."""
    path = tmp_path_factory.mktemp("hf") / "teacher"
    model = random_model(seed=4)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path, model


def test_transformers_encoding_is_read(saved):
    from transformers import AutoConfig

    from minipuzzle.arch import Layout, load_config
    from minipuzzle.checkpoint.build import load_model

    path, model = saved
    # The premise: the installed transformers writes infinity in its own encoding, which plain JSON readers keep as
    # a dict.
    assert json.loads((path / "config.json").read_text())["time_step_limit"][1] == {"__float__": "Infinity"}
    cfg = load_config(path)
    assert list(cfg.time_step_limit) == list(AutoConfig.from_pretrained(path).time_step_limit) == [0.0, float("inf")]
    assert Layout.from_config(cfg) == Layout.from_config(model.config)
    ids = torch.arange(40).reshape(2, 20)
    with torch.no_grad():
        torch.testing.assert_close(load_model(path)(ids, use_cache=False).logits, model(ids, use_cache=False).logits, rtol=0, atol=0)


def test_every_command_reads_it(saved, tmp_path, text_file):
    from transformers import AutoConfig, NemotronHForCausalLM

    from minipuzzle.checkpoint.build import load_model

    src, _ = saved
    data = str(text_file)
    code, out, err = run_cli(["info", str(src), "--json"])
    assert code == 0, err
    assert json.loads(out)["pattern"] == "M-*M-M*-M-"
    scores = tmp_path / "scores"
    code, _, err = run_cli(["score", str(src), "--data", data, "-o", str(scores), "--samples", "2", "--seq-len", "24"])
    assert code == 0, err
    pruned = tmp_path / "pruned"
    code, _, err = run_cli(["prune", str(src), "--target", "0.8", "--data", data, "--scores", str(scores),
                            "-o", str(pruned), *SMALL])  # fmt: skip
    assert code == 0, err
    plan = tmp_path / "plan.yaml"
    plan.write_text("plan:\n  layers: [0, 1, 2, 3, 4, 5, 6, 7]\n")
    cut = tmp_path / "cut"
    code, _, err = run_cli(["cut", str(src), "--plan", str(plan), "-o", str(cut)])
    assert code == 0, err
    distilled = tmp_path / "distilled"
    code, _, err = run_cli(["distill", "--teacher", str(src), "--student", str(cut), "--data", data,
                            "-o", str(distilled), "--max-steps", "2", "--seq-len", "24", "--batch-size", "2",
                            "--eval-every", "0", "--no-progress"])  # fmt: skip
    assert code == 0, err
    report = tmp_path / "report"
    code, _, err = run_cli(["eval", str(distilled), "--teacher", str(src), "--data", data, "--seq-len", "24",
                            "--held-out-windows", "2", "--no-speed", "-o", str(report)])  # fmt: skip
    assert code == 0, err
    assert json.loads((report / "report.json").read_text())["kl_to_teacher"] > 0
    # What minipuzzle writes, transformers reads back as the same model, without remote code.
    ids = torch.arange(40).reshape(2, 20)
    for folder in (pruned, cut, distilled):
        assert type(AutoConfig.from_pretrained(folder)).__name__ == "NemotronHConfig"
        hf = NemotronHForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        with torch.no_grad():
            torch.testing.assert_close(hf(ids, use_cache=False).logits, load_model(folder)(ids, use_cache=False).logits, rtol=0, atol=0)


def test_unreadable_configs_are_one_line_errors(saved, tmp_path):
    from minipuzzle.arch import load_config

    with pytest.raises(UserError, match="no config.json"):
        load_config(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(UserError, match="cannot read the config"):
        load_config(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mamba2", "hidden_size": 8}))
    with pytest.raises(UserError, match="not a Nemotron-H config"):
        load_config(tmp_path)
    code, _, err = run_cli(["info", str(tmp_path)])
    assert code == 2 and "not a Nemotron-H config" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
