"""`minipuzzle prune` end to end on tiny random models: planted dead units, errors, dry run, streaming."""

import json

import pytest
import torch

from minipuzzle.testing import random_model, run_cli, save_model, tiny_layout

DEAD_LAYERS = (3, 4, 5)  # a Mamba, an MLP and an attention layer of "M-*M-M*-M-"
DEAD_FFN = [3, 11, 40, 41, 77, 90]
DEAD_HEADS = [1, 6]  # one head in each of the two Mamba groups
DEAD_HIDDEN = [0, 9, 33, 50]


def plant_dead_units(model):
    """Zero every weight into and out of the DEAD_* units (minipuzzle.testing does the zeroing)."""
    from minipuzzle.cut import Plan
    from minipuzzle.testing import plant_dead_units as plant

    lay = tiny_layout()
    keep = [i for i in range(lay.num_layers) if i not in DEAD_LAYERS]
    heads = [h for h in range(lay.mamba_num_heads) if h not in DEAD_HEADS]
    plan = Plan(
        layers=keep,
        ffn={i: [c for c in range(lay.intermediate_size) if c not in DEAD_FFN] for i in keep if lay.pattern[i] == "-"},
        mamba_heads={i: heads for i in keep if lay.pattern[i] == "M"},
        hidden=[c for c in range(lay.hidden_size) if c not in DEAD_HIDDEN],
    )
    plant(model, plan)
    return model


@pytest.fixture(scope="module")
def dead_checkpoint(tmp_path_factory, tokenizer):
    model = plant_dead_units(random_model(seed=1))
    return model, save_model(model, tmp_path_factory.mktemp("dead") / "ckpt", tokenizer=tokenizer)


def expected_layout():
    lay = tiny_layout()
    pattern = "".join(c for i, c in enumerate(lay.pattern) if i not in DEAD_LAYERS)
    return lay.replace(
        pattern=pattern,
        intermediate_size=lay.intermediate_size - len(DEAD_FFN),
        mamba_num_heads=lay.mamba_num_heads - len(DEAD_HEADS),
        hidden_size=lay.hidden_size - len(DEAD_HIDDEN),
    )


ALL_AXES = "depth,ffn,mamba_heads,hidden"
SMALL = ["--seq-len", "32", "--depth-samples", "4", "--width-samples", "8", "--held-out-windows", "4", "--candidates", "3"]  # fmt: skip


@pytest.mark.parametrize("stream", [False, True])
def test_prune_removes_exactly_the_dead_units(dead_checkpoint, text_file, tmp_path, stream):
    from transformers import AutoModelForCausalLM

    model, ckpt = dead_checkpoint
    target = expected_layout().num_params()
    out = tmp_path / "out"
    args = ["prune", str(ckpt), "--target", str(target), "--axes", ALL_AXES, "--data", str(text_file), "-o", str(out)]
    code, stdout, err = run_cli(args + SMALL + (["--stream"] if stream else []))
    assert code == 0, err
    rep = json.loads((out / "prune_report.json").read_text())
    assert rep["chosen"]["plan"]["layers"] == [i for i in range(10) if i not in DEAD_LAYERS]
    check_measured_rows(rep["candidates"], stdout)
    assert rep["chosen"]["result"]["params"] == target
    assert (out / "candidates.png").is_file() and (out / "cuts.png").is_file()
    assert rep["candidates"][0]["kl_to_teacher"] < 1e-6
    pruned = AutoModelForCausalLM.from_pretrained(out).float().eval()
    ids = torch.randint(0, 320, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = model(ids, use_cache=False).logits, pruned(ids).logits
    assert ((a - b).norm() / a.norm()).item() < 1e-4


def check_measured_rows(rows, stdout):
    """Why each candidate was measured: one best predicted, none kept by a wider or deeper measured one, the
    predicted ranks a permutation, and the CLI prints them beside the measured ranks."""
    assert sorted(r["predicted_rank"] for r in rows) == list(range(1, len(rows) + 1))
    assert [r["why"] for r in rows].count("best predicted") == 1
    assert all(r["why"] in ("best predicted", "next best predicted", f"best {r['family']}") for r in rows)
    assert all(0 < r["budget_used"] <= 1 for r in rows)
    for a in rows:
        for b in rows:
            wider = all(a["layers"][k] >= n for k, n in b["layers"].items()) and all(
                a["widths"][x] >= w for x, w in b["widths"].items()
            )
            assert a is b or not wider, (a, b)
    assert "measured rank  predicted rank  why measured" in stdout


def test_prune_without_norm_compensation_ranks_and_cuts_uncompensated(dead_checkpoint, text_file, tmp_path):
    """--no-norm-compensation reaches the ranked candidates and the cut: removing the dead hidden channels is no
    longer free (the compensated run above measures KL < 1e-6 on the same layout)."""
    _, ckpt = dead_checkpoint
    out = tmp_path / "out"
    target = expected_layout().num_params()
    args = ["prune", str(ckpt), "--target", str(target), "--axes", ALL_AXES, "--data", str(text_file), "-o", str(out)]
    code, _, err = run_cli(args + SMALL + ["--no-norm-compensation"])
    assert code == 0, err
    rep = json.loads((out / "prune_report.json").read_text())
    assert rep["chosen"]["plan"]["norm_compensation"] is False
    assert rep["chosen"]["plan"]["hidden"] == [c for c in range(64) if c not in DEAD_HIDDEN]
    assert min(r["kl_to_teacher"] for r in rep["candidates"]) > 1e-4


def test_streamed_ranking_matches_in_memory(dead_checkpoint, text_file):
    from minipuzzle.checkpoint.build import load_model
    from minipuzzle.cut import Plan
    from minipuzzle.prune.ranking import measure_in_memory, measure_streamed

    _, ckpt = dead_checkpoint
    plans = [
        Plan(layers=[0, 1, 2, 6, 7, 8, 9], ffn={i: list(range(0, 96, 2)) for i in (1, 7, 9)}, hidden=list(range(40))),
        Plan(layers=[0, 1, 2, 3, 4, 6, 7, 8, 9]),
    ]
    windows = torch.randint(0, 320, (3, 16), generator=torch.Generator().manual_seed(1))
    mem = measure_in_memory(load_model(ckpt), plans, windows)
    # All windows in one group, and one window per group (a host-memory budget smaller than one window).
    for streamed in (measure_streamed(ckpt, plans, windows), measure_streamed(ckpt, plans, windows, host_bytes=1)):
        for a, b in zip(mem, streamed, strict=True):
            for k in ("loss", "accuracy", "kl_to_teacher", "agreement"):
                assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-6)


def test_bad_input_is_one_line_exit_2(dead_checkpoint, text_file, tmp_path):
    _, ckpt = dead_checkpoint
    out = tmp_path / "never"
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    cases = [
        ["--target", "10000000000"],
        ["--target", "0.9", "--axes", "depth,widthz"],
        ["--target", "0.9", "--data", str(empty)],
    ]
    for extra in cases:
        code, _, err = run_cli(
            ["prune", str(ckpt), "-o", str(out), *extra, *(["--data", str(text_file)] if "--data" not in extra else [])]
        )
        assert code == 2 and err.count("\n") == 1 and err.startswith("error:"), err
        assert not out.exists()
    code, _, err = run_cli(["prune", "56b", "--target", "47b", "-o", str(out)])
    assert code == 2 and "--model-path" in err and not out.exists()


def test_dry_run_56b_offline():
    code, out, err = run_cli(["prune", "56b", "--target", "47b", "--dry-run", "--json"])
    assert code == 0, err
    plan = json.loads(out)
    assert plan["feasible_layouts"] > 0 and plan["cost"]["gpu_hours_h100"] > 0
    assert plan["space"]["widths"]["ffn"]["step"] == 1024
    # Depth scoring with prefix reuse costs L/2 + 1 passes over the depth windows (118 layers -> 60).
    cost = plan["cost"]
    assert cost["depth_passes"] == 60
    assert cost["gpu_hours_h100"] == pytest.approx(cost["flops_total"] / cost["assumed_flops_per_second"] / 3600)


def test_search_writes_layout_yaml(dead_checkpoint, text_file, tmp_path):
    import yaml

    from minipuzzle.score.scoring import score_checkpoint

    _, ckpt = dead_checkpoint
    windows = torch.randint(0, 320, (4, 32), generator=torch.Generator().manual_seed(2))
    s = score_checkpoint(ckpt, windows, windows, axes=["depth", "ffn"], progress=False)
    s.save(tmp_path)
    out = tmp_path / "layout.yaml"
    code, _, err = run_cli(["search", str(ckpt), "--scores", str(tmp_path), "--target", "0.8", "-o", str(out)])
    assert code == 0, err
    doc = yaml.safe_load(out.read_text())
    assert doc["result"]["params"] <= int(tiny_layout().num_params() * 0.8)
    # Measured: the checkpoint cut by the written plan holds the parameters the search reported.
    from minipuzzle.checkpoint.build import load_model

    code, _, err = run_cli(["cut", str(ckpt), "--plan", str(out), "-o", str(tmp_path / "cut")])
    assert code == 0, err
    assert sum(p.numel() for p in load_model(tmp_path / "cut").parameters()) == doc["result"]["params"]


def test_candidates_distilled_before_the_choice(dead_checkpoint, text_file, tmp_path, monkeypatch):
    """--candidate-distill-steps: every candidate is distilled briefly, in a process of its own (the prune
    process trains nothing: its memory stays scoring's and ranking's), and ranked on its distilled figures."""
    import minipuzzle.distill.loop as distill_loop

    def not_here(*a, **k):
        raise AssertionError("candidate distillation ran inside the prune process")

    monkeypatch.setattr(distill_loop, "distill", not_here)
    _, ckpt = dead_checkpoint
    out = tmp_path / "out"
    args = ["prune", str(ckpt), "--target", "0.8", "--data", str(text_file), "-o", str(out), *SMALL]
    code, _, err = run_cli([*args, "--candidate-distill-steps", "2", "--candidates", "2"])
    assert code == 0, err
    rows = json.loads((out / "prune_report.json").read_text())["candidates"]
    assert len(rows) == 2
    for r in rows:
        assert r["kl_to_teacher"] >= 0 and "kl_to_teacher" in r["before_distill"]
    # The ranking figures are the distilled students', not copies of the undistilled ones.
    assert any(r["kl_to_teacher"] != r["before_distill"]["kl_to_teacher"] for r in rows)
    assert [r["kl_to_teacher"] for r in rows] == sorted(r["kl_to_teacher"] for r in rows)


def test_dry_run_counts_the_band_and_samples_sets_both():
    base = ["prune", "56b", "--memory", "31.7GiB", "--precision", "fp4", "--context", "1M", "--step", "ffn=1024",
            "--min-width", "0.75", "--dry-run"]  # fmt: skip
    code, out, err = run_cli([*base, "--json", "--samples", "7"])
    assert code == 0, err
    plan = json.loads(out)
    assert plan["band"] == 0.05 and 0 < plan["pool_layouts"] < plan["feasible_layouts"]
    assert plan["cost"]["tokens"] == (7 + 7 + 64) * 512
    # Measured: the default 4 (more than the 3 families); without candidate distillation one measurement is one
    # held-out pass, and ranking is the parent's pass plus one per measured layout.
    cost = plan["cost"]
    assert plan["families"] == ["depth only", "width only", "mixed"] and cost["candidates_measured"] == 4
    assert cost["flops_ranking"] == pytest.approx(5 * cost["flops_per_measurement"])
    code, out, _ = run_cli([*base, "--json", "--samples", "7", "--depth-samples", "3", "--band", "0"])
    plan0 = json.loads(out)
    assert plan0["cost"]["tokens"] == (3 + 7 + 64) * 512  # the specific option wins
    assert plan0["pool_layouts"] < plan["pool_layouts"]
    code, out, _ = run_cli(base)
    assert (
        code == 0 and f"candidate pool (within 5% below the budget, or unable to grow): {plan['pool_layouts']:,}" in out
    )
    code, _, err = run_cli([*base, "--band", "1.5"])
    assert code == 2 and err.count("\n") == 1 and "--band" in err


def record(monkeypatch, seen: dict, module, name: str, key: str, pick):
    """Wrap module.name so that seen[key] = pick(args) of its first call; the real function still runs."""
    real = getattr(module, name)

    def wrapper(*args, **kwargs):
        seen.setdefault(key, pick(args))
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapper)


def test_ranking_windows_are_never_scored_or_distilled_on(dead_checkpoint, text_file, tmp_path, monkeypatch):
    """Without --held-out-data the ranking windows are the head of --data: no calibration window is one of them,
    and candidate distillation holds exactly them out (its evaluation windows, never trained on)."""
    import minipuzzle.distill.launch as launch
    import minipuzzle.score.scoring as importance
    from minipuzzle.data import iter_documents, iter_tokens, load_tokenizer, pack
    from minipuzzle.distill.stream import WindowStream
    from minipuzzle.prune import stage as pipeline

    _, ckpt = dead_checkpoint
    seen = {}
    record(monkeypatch, seen, importance, "score_checkpoint", "calib", lambda a: torch.cat(a[1:3]))
    record(monkeypatch, seen, pipeline, "rank", "held", lambda a: a[2])
    record(monkeypatch, seen, launch, "launch", "cfg", lambda a: a[0])  # the candidate's distillation process
    settings = pipeline.PruneSettings(target=str(int(tiny_layout().num_params() * 0.8)),
                                      candidates=1, seq_len=32, depth_samples=4, width_samples=40,
                                      held_out_windows=6, candidate_distill_steps=1,
                                      candidate_distill_batch=2)  # fmt: skip
    rep = pipeline.prune(str(ckpt), tmp_path / "out", settings, str(text_file), progress=False)
    tok = load_tokenizer(ckpt)
    stream = [tuple(w) for w in pack(iter_tokens(tok, iter_documents(text_file)), 32)]
    held = [tuple(w) for w in seen["held"].tolist()]
    assert held == stream[:6]
    calib = [tuple(w) for w in seen["calib"].tolist()]
    assert len(calib) == 44 and all(stream.index(w) >= 6 for w in calib)
    cfg = seen["cfg"]
    assert cfg.eval_every >= 1 and cfg.held_out_windows == 6
    assert WindowStream(cfg.data, tok, cfg.seq_len).take(cfg.held_out_windows).tolist() == seen["held"].tolist()
    assert "not scored on" in rep["data"]["held_out_source"]


def test_held_out_data_is_what_candidates_are_ranked_on(dead_checkpoint, text_file, tmp_path, monkeypatch):
    from minipuzzle.data import load_tokenizer, token_windows
    from minipuzzle.prune import stage as pipeline
    from minipuzzle.testing import stdlib_text_files

    _, ckpt = dead_checkpoint
    other = tmp_path / "held.txt"
    other.write_text(stdlib_text_files(6)[-1].read_text())
    seen = {}
    record(monkeypatch, seen, pipeline, "rank", "held", lambda a: a[2])
    args = ["--target", "0.8", "--data", str(text_file), "-o", str(tmp_path / "out"), *SMALL]
    code, _, err = run_cli(["prune", str(ckpt), *args, "--held-out-data", str(other)])
    assert code == 0, err
    want = token_windows(other, load_tokenizer(ckpt), 32, 4, 0)
    assert torch.equal(seen["held"], want)
    rep = json.loads((tmp_path / "out" / "prune_report.json").read_text())
    assert rep["data"]["held_out_source"] == str(other) and rep["data"]["held_out_windows"] == len(want)
    code, _, err = run_cli(["prune", str(ckpt), *args[:-len(SMALL)], "-o", str(tmp_path / "no"),
                            "--held-out-data", str(text_file)])  # fmt: skip
    assert code == 2 and "same text" in err and err.count("\n") == 1 and not (tmp_path / "no").exists()


def test_ranking_and_scoring_run_the_memory_plan(dead_checkpoint, text_file, tmp_path, monkeypatch):
    """A recipe's hardware section decides how prune scores and ranks: on hardware too small for the parent and a
    cut candidate in memory, ranking streams at the plan's batch, row chunks and host group, in its dtype; with
    room, it loads the parent. Scoring takes the plan's stream, batch and row budget."""
    import minipuzzle.score.scoring as importance
    from minipuzzle.hardware import Hardware
    from minipuzzle.memory import ranking_memory
    from minipuzzle.prune import ranking
    from minipuzzle.prune import stage as pipeline
    from minipuzzle.recipe import parse_recipe, prune_settings

    _, ckpt = dead_checkpoint
    layout = tiny_layout()
    doc = {"name": "t", "model": {"source": str(ckpt), "device": "cpu"}, "data": {"source": str(text_file)},
           "score": {"seq_len": 32, "depth_samples": 4, "width_samples": 8, "batch_size": 4},
           "prune": {"target": "0.8", "candidates": 2, "held_out_windows": 6}}  # fmt: skip
    big = Hardware(device="cpu", gpu_memory="64GiB")
    ps = prune_settings(parse_recipe(doc))
    whole = ranking_memory(layout, big, seq_len=32, held_out_windows=6, batch_size=1, stored_bytes=4, stream=False)
    streamed = ranking_memory(layout, big, seq_len=32, held_out_windows=6, batch_size=1, stored_bytes=4, stream=True)
    assert streamed.device_total < whole.device_total
    small = Hardware(device="cpu", gpu_memory=int(whole.device_total / 0.9) - 1)
    seen = {}

    def spy(module, name: str):
        real = getattr(module, name)

        def wrapper(*args, **kwargs):
            seen[name] = kwargs | {"args": args}
            return real(*args, **kwargs)

        monkeypatch.setattr(module, name, wrapper)

    spy(ranking, "measure_streamed")
    spy(ranking, "measure_in_memory")
    spy(importance, "score_checkpoint")
    # Hand counts (float32, 32-token windows, h = 64, so a window's residual state is 32 x 64 x 4 = 8,192 B).
    # With room: ranking's forward takes all 6 held-out windows, scoring the recipe's batch of 4. On the small
    # device ranking streams, each chunk holding all 6 windows' rows and the host the parent's final states of all 6
    # (6 x 8,192 B, far under the host group's cap); its forward batch, and scoring's, drop to 2 (the batch the plan
    # fits there: a regression figure, not derived here). Either way scoring fits every width-pass row in one chunk:
    # 8 windows x 2 residual states (the state and its final norm) x 8,192 B = 131,072 B, and does not stream (the
    # small device holds the 0.7 MB parent whole).
    for hw, how, batch, score_batch in ((small, "measure_streamed", 2, 2), (big, "measure_in_memory", 6, 4)):
        seen.clear()
        pipeline.prune(str(ckpt), tmp_path / how, ps, str(text_file), progress=False, hardware=hw)
        assert list(seen) == ["score_checkpoint", how]
        got = seen[how]
        assert got["args"][3] == batch  # the forward batch
        if how == "measure_streamed":
            assert (got["dtype"], got["chunk_rows"], got["args"][4]) == (torch.float32, 6, "cpu")
            assert got["host_bytes"] == 6 * 8192
        else:
            assert next(got["args"][0].parameters()).dtype == torch.float32
        sc = seen["score_checkpoint"]
        assert (sc["stream"], sc["batch_size"], sc["budget_bytes"]) == (False, score_batch, 8 * 2 * 8192)
        assert sc["dtype"] == torch.float32 and sc["device"] == "cpu" and sc["width_agg"] == "abs_mean,l2"


@pytest.mark.parametrize("streamed", [False, True])
def test_a_candidate_checkpoint_measures_as_its_plan(dead_checkpoint, tmp_path, streamed):
    """A candidate given as a checkpoint folder (how distilled candidates are measured) gets the figures its plan
    gets when cut on the fly, streamed or in memory."""
    from minipuzzle.checkpoint.build import load_model
    from minipuzzle.checkpoint.read import Checkpoint
    from minipuzzle.cut import Plan, cut_checkpoint
    from minipuzzle.prune.ranking import measure_in_memory, measure_streamed

    model, ckpt = dead_checkpoint
    plan = Plan(layers=[0, 1, 2, 4, 5])
    cut = cut_checkpoint(Checkpoint(ckpt), plan, tmp_path / "cut", progress=False)
    ids = torch.randint(0, 320, (3, 16), generator=torch.Generator().manual_seed(0))
    if streamed:
        by_plan, by_folder = (measure_streamed(Checkpoint(ckpt), [c], ids, batch_size=2) for c in (plan, cut))
    else:
        by_plan, by_folder = (measure_in_memory(load_model(ckpt), [c], ids, batch_size=2) for c in (plan, cut))
    assert by_folder == by_plan and by_plan[0]["kl_to_teacher"] > 0
