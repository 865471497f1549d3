"""Forwards that need no cache build none: scoring, ranking, distillation and held-out metrics.

transformers builds a DynamicCache on every NemotronH forward unless told `use_cache=False`: memory for nothing,
and on a GPU it keeps the forward off the fused Mamba kernel path. Every DynamicCache that the NemotronH model
constructs is counted here.
"""

import pytest
import torch

from minipuzzle.testing import random_model


@pytest.fixture
def caches(monkeypatch):
    """A list that gains one entry per DynamicCache the NemotronH model builds."""
    import transformers.models.nemotron_h.modeling_nemotron_h as modeling

    built = []

    class Counting(modeling.DynamicCache):
        def __init__(self, *args, **kwargs):
            built.append(1)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(modeling, "DynamicCache", Counting)
    return built


@pytest.fixture(scope="module")
def setup():
    model = random_model(seed=5)
    ids = torch.randint(0, model.config.vocab_size, (3, 20), generator=torch.Generator().manual_seed(0))
    return model, ids


def test_counter_sees_a_default_forward(setup, caches):
    model, ids = setup
    with torch.no_grad():
        model(ids[:1])
    assert len(caches) == 1  # without use_cache=False transformers does build one


def test_metrics_and_ranking_build_no_cache(setup, caches):
    from minipuzzle.cut import Plan
    from minipuzzle.evaluate.runner import held_out_stats
    from minipuzzle.metrics import token_stats
    from minipuzzle.prune.ranking import measure_in_memory

    model, ids = setup
    token_stats(model, ids, teacher=model, batch_size=2)
    held_out_stats(model, ids, teacher=model, batch_size=2)
    measure_in_memory(model, [Plan(layers=[0, 1, 2, 3, 5, 6, 7, 8, 9])], ids, batch_size=2)
    assert caches == []


def test_distillation_builds_no_cache(setup, caches):
    from minipuzzle.distill.losses import DistillObjective

    teacher, ids = setup
    student = random_model(seed=6).train()
    obj = DistillObjective(student, teacher, hidden_weight=0.5, layer_pairs=[(2, 2)], lm_weight=0.5)
    obj(ids)["loss"].backward()
    obj(ids, evaluate=True)
    assert caches == []
