"""Importance on mixture-of-experts models (Nemotron 3): planted never-chosen experts and dead expert / shared-expert
channels score exactly 0, the removal estimator is the output change of really removing the expert, MoE layers are
a fourth layer kind for depth, the dense axes work on MoE models, and streamed scores equal in-memory ones."""

import copy
import json

import pytest
import torch

from minipuzzle.cut import Plan
from minipuzzle.errors import UserError
from minipuzzle.score.experts import EXPERT_ESTIMATORS, expert_contributions, route
from minipuzzle.score.plots import plot_scores
from minipuzzle.score.scoring import score_checkpoint, score_model
from minipuzzle.testing import plant_dead_units, random_model, run_cli, save_model, tiny_config, tiny_moe_layout

LAYOUT = tiny_moe_layout()  # "ME*EM-": MoE layers 1 and 3, 8 experts in 2 groups of 4, top 2
EVERY = list(range(LAYOUT.num_layers))
WINDOWS = torch.randint(0, LAYOUT.vocab_size, (4, 24), generator=torch.Generator().manual_seed(0))
NEVER = {1: [1, 6], 3: [0, 5]}  # one expert per router group
DEAD = {"expert_ffn": {1: [0, 1, 2, 3], 3: [28, 29, 30, 31]}, "shared_ffn": {1: [5, 6, 40, 47], 3: [0, 1, 2, 3]}}
MOE_AXES = ["experts", "expert_ffn", "shared_ffn"]
ALL_AXES = ["depth", "ffn", "mamba_heads", "mamba_head_dim", "attn_heads", "hidden", *MOE_AXES]


def _keep(full: int, dead: list[int]) -> list[int]:
    return [u for u in range(full) if u not in dead]


def planted_model():
    """A tiny MoE model whose NEVER experts are never chosen, whose DEAD channels are zero, whose hidden channel 7
    is dead and whose last Mamba layer (4) is an identity."""
    plan = Plan(
        layers=[i for i in EVERY if i != 4],
        experts={i: _keep(8, dead) for i, dead in NEVER.items()},
        expert_ffn={i: _keep(32, dead) for i, dead in DEAD["expert_ffn"].items()},
        shared_ffn={i: _keep(48, dead) for i, dead in DEAD["shared_ffn"].items()},
        hidden=_keep(64, [7]),
    )
    model = random_model(LAYOUT, seed=3)
    plant_dead_units(model, plan)
    return model


@pytest.fixture(scope="module")
def planted():
    return planted_model()


@pytest.mark.parametrize("estimator", list(EXPERT_ESTIMATORS))
def test_planted_units_score_exactly_zero(planted, estimator):
    s = score_model(planted, WINDOWS, WINDOWS, ALL_AXES, progress=False, expert_estimator=estimator)
    assert sorted(s["experts"]) == sorted(s["expert_ffn"]) == sorted(s["shared_ffn"]) == [1, 3]
    for i, never in NEVER.items():
        scores = s["experts"][i]
        assert scores.shape == (8,)
        assert scores[never].eq(0).all(), (estimator, i, scores)
        assert scores[_keep(8, never)].gt(0).all(), (estimator, i, scores)
        assert set(torch.argsort(scores)[:2].tolist()) == set(never)
    for axis in ("expert_ffn", "shared_ffn"):
        for i, dead in DEAD[axis].items():
            width = 32 if axis == "expert_ffn" else 48
            assert s[axis][i].shape == (width,)
            assert s[axis][i][dead].eq(0).all() and s[axis][i][_keep(width, dead)].gt(0).all()
    # The dense axes on an MoE model: the dead hidden channel, and an identity Mamba layer, score 0.
    assert s["hidden"][7] == 0 and s["hidden"][_keep(64, [7])].gt(0).all()
    assert s["depth"][4] == 0 and s["depth"][_keep(6, [4])].gt(0).all()
    assert sorted(s["mamba_heads"]) == [0, 4] and sorted(s["attn_heads"]) == [2] and sorted(s["ffn"]) == [5]
    assert s.meta.settings.expert_estimator == estimator


def test_estimators_differ_and_depth_ranks_moe_layers(planted, tmp_path):
    got = {e: score_model(planted, WINDOWS, WINDOWS, ["depth", "experts"], progress=False, expert_estimator=e)
           for e in EXPERT_ESTIMATORS}  # fmt: skip
    live = _keep(8, NEVER[1])
    assert not torch.allclose(got["removal"]["experts"][1][live], got["router_load"]["experts"][1][live])
    assert not torch.allclose(got["output_norm"]["experts"][1][live], got["router_load"]["experts"][1][live])
    s = got["removal"]
    assert s.layer_ranking("moe") == s.layer_ranking("E") and sorted(s.layer_ranking("moe")) == [1, 3]
    summary = s.info().summary
    assert sorted(summary["depth"]["ranking"]["moe"]) == [1, 3] and summary["experts"]["exact_zeros"] == 4
    assert summary["experts"]["order_within_groups"]["1"][0][-1] == 1  # the never-chosen expert of group 0 last
    written = plot_scores(s, tmp_path)  # an 'E' layer has its own colour
    assert [p.name for p in written] == ["depth.png", "width.png"] and all(p.stat().st_size > 0 for p in written)


@pytest.mark.parametrize(
    "router",
    [
        {},
        {"norm_topk_prob": False, "routed_scaling_factor": 2.5},
        {"n_group": 4, "topk_group": 2, "num_experts_per_tok": 3},
        {"n_group": 1, "num_experts_per_tok": 3, "moe_latent_size": 24},
    ],
)
def test_removal_is_the_output_change_of_removing_the_expert(router):
    """Per token, the removal estimator equals |MoE(x) with the expert out of the router - MoE(x)|, measured on
    the real module; unmasked, `route` chooses exactly as transformers' router does."""
    config_only = ("norm_topk_prob", "routed_scaling_factor")  # no Layout field: they shape no weight
    layout = tiny_moe_layout(**{k: v for k, v in router.items() if k not in config_only})
    extra = {k: v for k, v in router.items() if k in config_only}
    model = random_model(layout, seed=2, config={**tiny_config(layout), **extra})
    mixer = model.model.layers[1].mixer
    x = torch.randn(40, layout.hidden_size, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        logits, w, idx = mixer.gate(x)
        mine_idx, mine_w = route(mixer.gate, logits.sigmoid())
        assert torch.equal(mine_idx.sort(-1).values, idx.sort(-1).values)
        assert torch.equal(mine_w.gather(1, mine_idx.argsort(-1)), w.gather(1, idx.argsort(-1)))
        xe = mixer.fc1_latent_proj(x)
        routed = mixer.experts(xe, idx, w)
        got = expert_contributions(mixer, "removal", logits, xe, idx, w, routed)
        full = mixer(x.unsqueeze(0))
        for e in range(layout.n_routed_experts):
            masked = copy.deepcopy(mixer)
            masked.gate.e_score_correction_bias[e] = float("-inf")
            want = (masked(x.unsqueeze(0)) - full)[0].norm(dim=-1)
            assert torch.allclose(got[:, e], want, atol=1e-5), e
        assert got.gt(0).any(0).all()  # every expert matters to some token


@pytest.mark.parametrize("style", ["model", "backbone"])
def test_streamed_equals_in_memory(style, tmp_path):
    model = planted_model()
    path = save_model(model, tmp_path / style, style=style, max_shard_bytes=30_000, split_experts=style == "backbone")
    mem = score_model(model, WINDOWS, WINDOWS, ALL_AXES, progress=False)
    streamed = score_checkpoint(path, WINDOWS, WINDOWS, ALL_AXES, stream=True, progress=False)
    assert streamed.meta.settings.streamed and not mem.meta.settings.streamed
    assert torch.equal(mem["depth"], streamed["depth"]) and torch.equal(mem["hidden"], streamed["hidden"])
    for axis in ["ffn", "mamba_heads", "mamba_head_dim", "attn_heads", *MOE_AXES]:
        a, b = mem[axis], streamed[axis]
        assert a and sorted(a) == sorted(b), axis
        for i in a:
            assert torch.equal(a[i], b[i]), (axis, i)


def test_score_command_on_a_moe_checkpoint(tmp_path, text_file, tokenizer):
    path = save_model(planted_model(), tmp_path / "moe", style="backbone", tokenizer=tokenizer)
    out = tmp_path / "scores"
    code, _, err = run_cli(["score", str(path), "--data", str(text_file), "-o", str(out), "--samples", "3",
                            "--seq-len", "32", "--expert-estimator", "router_load"])  # fmt: skip
    assert code == 0, err
    meta = json.loads((out / "scores.json").read_text())
    assert meta["settings"]["expert_estimator"] == "router_load"
    assert meta["summary"]["experts"]["layers"] == [1, 3] and meta["summary"]["experts"]["exact_zeros"] == 4
    assert meta["summary"]["expert_ffn"]["exact_zeros"] == 8 and meta["summary"]["shared_ffn"]["exact_zeros"] == 8
    assert (out / "depth.png").is_file()
    code, _, err = run_cli(["score", str(path), "--data", str(text_file), "-o", str(tmp_path / "x"),
                            "--expert-estimator", "votes"])  # fmt: skip
    assert code == 2 and "expert" in err and len(err.strip().splitlines()) == 1
    with pytest.raises(UserError, match="unknown expert estimator"):
        score_model(planted_model(), None, WINDOWS, ["experts"], progress=False, expert_estimator="votes")


def test_scores_find_exactly_the_planted_units_and_cutting_them_keeps_the_logits(tmp_path):
    """Scores -> plan -> `minipuzzle cut`: the least important expert of every router group, the zero-scored
    expert and shared-expert channels and the least important layer are exactly the planted ones, and the model
    cut to them computes the same logits."""
    model = planted_model()
    s = score_model(model, WINDOWS, WINDOWS, ["depth", *MOE_AXES], progress=False)
    groups = LAYOUT.n_group
    plan = Plan(
        layers=[i for i in EVERY if i != int(s["depth"].argmin())],
        experts={i: sorted(s.group_order(t, groups)[:, :-1].flatten().tolist()) for i, t in s["experts"].items()},
        expert_ffn={i: torch.where(t > 0)[0].tolist() for i, t in s["expert_ffn"].items()},
        shared_ffn={i: torch.where(t > 0)[0].tolist() for i, t in s["shared_ffn"].items()},
    )
    assert plan.layers == [i for i in EVERY if i != 4]
    assert plan["experts"] == {i: _keep(8, dead) for i, dead in NEVER.items()}
    for axis in ("expert_ffn", "shared_ffn"):
        width = 32 if axis == "expert_ffn" else 48
        assert plan[axis] == {i: _keep(width, dead) for i, dead in DEAD[axis].items()}
    src = save_model(model, tmp_path / "src", style="backbone")
    (tmp_path / "plan.json").write_text(json.dumps(plan.to_dict()))
    code, _, err = run_cli(["cut", str(src), "--plan", str(tmp_path / "plan.json"), "-o", str(tmp_path / "out")])
    assert code == 0, err
    from minipuzzle.checkpoint.build import load_model

    cut = load_model(tmp_path / "out")
    assert cut.num_parameters() == plan.target_layout(LAYOUT).num_params() < model.num_parameters()
    with torch.no_grad():
        ref, got = model(WINDOWS, use_cache=False).logits, cut(WINDOWS, use_cache=False).logits
    assert ((got - ref).norm() / ref.norm()).item() < 1e-6
