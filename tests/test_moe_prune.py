"""`minipuzzle prune` on a mixture-of-experts model: planted never-chosen experts and dead expert channels, asked
for exactly the parameters left without them, are exactly what it removes."""

import json

import pytest
import torch

from minipuzzle.cut import Plan
from minipuzzle.testing import plant_dead_units, random_model, run_cli, save_model, tiny_moe_layout

DEAD_EXPERTS = [1, 6]  # one in each of the two router groups of 4
# Half of every routed expert's 32 channels: widths stay multiples of 16, which transformers' grouped expert
# matmuls need (their strides must be multiples of 16 bytes) and the search keeps by default.
DEAD_CHANNELS = list(range(1, 32, 2))


@pytest.fixture(scope="module")
def dead_moe_checkpoint(tmp_path_factory, tokenizer):
    lay = tiny_moe_layout()
    moe = [i for i, c in enumerate(lay.pattern) if c == "E"]
    plan = Plan(
        layers=list(range(lay.num_layers)),
        experts={i: [e for e in range(lay.n_routed_experts) if e not in DEAD_EXPERTS] for i in moe},
        expert_ffn={i: [c for c in range(lay.moe_intermediate_size) if c not in DEAD_CHANNELS] for i in moe},
    )
    model = random_model(lay, seed=3)
    plant_dead_units(model, plan)
    return model, save_model(model, tmp_path_factory.mktemp("dead-moe") / "ckpt", tokenizer=tokenizer)


@pytest.mark.parametrize("stream", [False, True])
def test_prune_removes_exactly_the_planted_experts_and_channels(dead_moe_checkpoint, text_file, tmp_path, stream):
    from transformers import AutoModelForCausalLM

    model, ckpt = dead_moe_checkpoint
    lay = tiny_moe_layout()
    expected = lay.replace(n_routed_experts=lay.n_routed_experts - len(DEAD_EXPERTS),
                           moe_intermediate_size=lay.moe_intermediate_size - len(DEAD_CHANNELS))  # fmt: skip
    out = tmp_path / "out"
    args = ["prune", str(ckpt), "--target", str(expected.num_params()), "--axes", "experts,expert_ffn",
            "--step", "experts=2", "--data", str(text_file), "-o", str(out), "--seq-len", "32",
            "--width-samples", "8", "--held-out-windows", "4", "--candidates", "3"]  # fmt: skip
    # In memory with the default per-expert channel choice, streamed with the shared one: both find the planted set.
    code, _, err = run_cli(args + (["--stream", "--expert-channels", "shared"] if stream else []))
    assert code == 0, err
    rep = json.loads((out / "prune_report.json").read_text())
    plan = rep["chosen"]["plan"]
    assert rep["chosen"]["result"]["params"] == expected.num_params()
    for i in (1, 3):  # the MoE layers of "ME*EM-"
        assert plan["experts"][str(i)] == [e for e in range(8) if e not in DEAD_EXPERTS]
        alive = [c for c in range(32) if c not in DEAD_CHANNELS]
        if stream:
            assert plan["expert_ffn"][str(i)] == alive
        else:  # one list per source expert; every kept expert keeps exactly its live channels
            per_expert = plan["expert_channels"][str(i)]
            assert [per_expert[e] for e in range(8) if e not in DEAD_EXPERTS] == [alive] * 6
    assert rep["candidates"][0]["kl_to_teacher"] < 1e-6  # float32 summation order only
    pruned = AutoModelForCausalLM.from_pretrained(out).float().eval()
    assert pruned.config.n_routed_experts == 6 and pruned.config.moe_intermediate_size == 16
    ids = torch.randint(0, 320, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = model(ids, use_cache=False).logits, pruned(ids).logits
    assert ((a - b).norm() / a.norm()).item() < 1e-6
