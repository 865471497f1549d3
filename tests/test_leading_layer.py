"""A pruned model never starts with an MLP or MoE layer that the source did not start with.

transformers 5.25.0 crashes on a cached forward (the default, and generate()) of a NemotronH whose layer 0 holds no
cache. The search keeps a Mamba or attention layer in front (the best such choice, checked here by brute force over
every kept set); a hand-written plan that would not is refused in one line, by the library and by `minipuzzle cut`.
"""

import itertools

import numpy as np
import pytest
import torch
import yaml

from minipuzzle.cut import Plan
from minipuzzle.errors import UserError
from minipuzzle.score.scores import Scores
from minipuzzle.search import DamageModel, SearchSpace
from minipuzzle.testing import run_cli, tiny_layout, tiny_moe_layout


def brute_force_kept(pattern: str, depth: np.ndarray, counts: dict[str, int]) -> tuple[float, list[int]]:
    """The most depth score any kept set with `counts` layers of each kind reaches, among the sets that start with
    a Mamba or attention layer or with the source's own layer 0; and one such set."""
    by_kind = {k: [i for i, c in enumerate(pattern) if c == k] for k in set(pattern)}
    best = (-1.0, [])
    for choice in itertools.product(*(itertools.combinations(by_kind[k], counts.get(k, 0)) for k in sorted(by_kind))):
        kept = sorted(i for part in choice for i in part)
        if kept and (kept[0] == 0 or pattern[kept[0]] in "M*"):
            best = max(best, (float(depth[kept].sum()), kept))
    return best


@pytest.mark.parametrize("pattern", ["M-*M-M*-M-", "M-M-*-M-", "-M*M--M*", "*--M-M"])
def test_search_keeps_the_best_set_that_starts_with_a_cache(pattern):
    src = tiny_layout(pattern=pattern)
    space = SearchSpace.build(src, "depth", min_layers=0.3)
    rng = np.random.default_rng(0)
    checked = 0
    for trial in range(30):
        depth = rng.random(src.num_layers) + 0.01
        depth[0] *= 0.01 * (trial % 2)  # layer 0 the least important in half the trials: the top set drops it
        model = DamageModel(Scores(pattern=pattern, depth=torch.tensor(depth)), space)
        for counts in itertools.product(*(range(1, pattern.count(k) + 1) for k in "M-*")):
            counts = dict(zip("M-*", counts))
            value, _ = brute_force_kept(pattern, depth, counts)
            kept = model.kept_layers(counts)
            assert {k: sum(pattern[i] == k for i in kept) for k in "M-*"} == counts
            assert kept[0] == 0 or pattern[kept[0]] in "M*", (counts, kept)
            assert float(depth[kept].sum()) == pytest.approx(value), (counts, kept)
            checked += 1
    assert checked > 100


def test_plans_that_lead_with_an_mlp_or_moe_layer_are_refused():
    dense = tiny_layout()  # M-*M-M*-M-
    with pytest.raises(UserError, match="leaves layer 1, a mlp layer, first") as e:
        Plan(layers=list(range(1, dense.num_layers))).target_layout(dense)
    assert "\n" not in str(e.value)
    Plan(layers=list(range(2, dense.num_layers))).target_layout(dense)  # attention first
    moe = tiny_moe_layout()  # ME*EM-
    with pytest.raises(UserError, match="leaves layer 1, a moe layer, first"):
        Plan(layers=list(range(1, moe.num_layers))).target_layout(moe)
    # A source that starts with an MLP layer is the user's: keeping it first is no new problem.
    mlp_first = tiny_layout(pattern="-M*M--M*")
    Plan.keep_all(mlp_first).target_layout(mlp_first)
    Plan(layers=[0, 2, 3]).target_layout(mlp_first)
    with pytest.raises(UserError, match="leaves layer 4, a mlp layer, first"):
        Plan(layers=[4, 6, 7]).target_layout(mlp_first)


def test_cut_refuses_such_a_plan_in_one_line(tiny_checkpoint, tmp_path):
    plan = tmp_path / "plan.yaml"
    plan.write_text(yaml.safe_dump({"layers": list(range(1, tiny_layout().num_layers))}))
    out = tmp_path / "out"
    code, _, err = run_cli(["cut", str(tiny_checkpoint), "--plan", str(plan), "-o", str(out)])
    assert code == 2 and "a mlp layer, first" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()
