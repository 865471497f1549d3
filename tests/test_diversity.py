"""The measured set of prune against brute force: every fitting layout of a tiny space enumerated, dominance
checked pair by pair, families read off the widths and counts directly."""

import itertools

import pytest

from minipuzzle.anatomy import AXES
from minipuzzle.search import DamageModel, SearchSpace, in_pool, make_budget, search
from minipuzzle.search.diversity import BEST, NEXT, families, measured_set
from minipuzzle.testing import tiny_layout, tiny_moe_layout
from tests.test_search import synthetic_scores
from tests.test_search_moe import synthetic_scores as moe_scores


def fitting(space, budget):
    """Every (widths, counts) of the space that fits, with its parameter count."""
    out = []
    for widths in space.width_combos():
        for counts in itertools.product(*[range(lo, hi + 1) for lo, hi in space.layers.values()]):
            counts = dict(zip(space.kinds, counts))
            lay = space.layout(widths, counts)
            if budget.fits(lay):
                out.append((widths, counts, lay.num_params()))
    return out


def undominated(points):
    """The points no other point keeps as many layers of each kind and as wide an axis as (pairwise)."""

    def ge(a, b):
        return all(a[1][k] >= b[1][k] for k in b[1]) and all(a[0][x] >= b[0][x] for x in b[0])

    return [p for p in points if not any(q is not p and ge(q, p) and (q[0], q[1]) != (p[0], p[1]) for q in points)]


def family(src, widths, counts):
    """depth / experts / width cut, read off the source's counts and widths."""
    cut = []
    if any(n < src.count(k) for k, n in counts.items()):
        cut.append("depth")
    if widths["experts"] < src.n_routed_experts if src.is_moe else False:
        cut.append("experts")
    if any(w < AXES[a].width(src) for a, w in widths.items() if a != "experts"):
        cut.append("width")
    return f"{cut[0]} only" if len(cut) == 1 else "mixed"


def order(model, p):
    return (round(model.damage(p[0], p[1]), 12), -p[2])


def check_against_brute_force(src, space, model, budget, k):
    points = fitting(space, budget)
    nd = sorted(undominated(points), key=lambda p: order(model, p))
    best_of = {}
    for p in nd:
        best_of.setdefault(family(src, p[0], p[1]), p)
    nd_keys = [(p[0], p[1]) for p in nd]
    for method in ("enumerate", "mip"):
        # The solver's family search alone: the best undominated layout of each family, or nothing.
        for name, parts in families(space).items():
            found = [c for fam in parts for c in search(space, budget, model, 1, method, band=0.0, family=fam)]
            assert [c.damage for c in sorted(found, key=lambda c: c.damage)[:1]] == pytest.approx(
                [model.damage(*best_of[name][:2])] if name in best_of else [], abs=1e-12
            )
            assert all(family(src, c.widths, c.counts) == name for c in found)
        got = measured_set(space, budget, model, k, method)
        keys = [(c.widths, c.counts) for c in got]
        assert all(key in nd_keys for key in keys), "a measured layout is dominated by a fitting one"
        assert len({str(key) for key in keys}) == len(keys)
        assert [c.damage for c in got] == sorted(c.damage for c in got)
        by_why = {c.extra["why"]: c for c in got}
        assert by_why[BEST].damage == pytest.approx(model.damage(*nd[0][:2]), abs=1e-12)
        # The best of every family is there, with the least damage of that family's undominated layouts.
        fams = {c.extra["family"]: c for c in got if c.extra["why"] in (BEST, f"best {c.extra['family']}")}
        assert set(fams) == set(best_of)
        for name, ref in best_of.items():
            assert fams[name].damage == pytest.approx(model.damage(*ref[:2]), abs=1e-12)
            assert family(src, fams[name].widths, fams[name].counts) == name
        # The rest are the next best undominated layouts by predicted damage.
        rest = sorted(c.damage for c in got if c.extra["why"] == NEXT)
        others = [model.damage(*p[:2]) for p in nd if (p[0], p[1]) not in keys]
        assert len(got) == min(len(nd), max(k, len(best_of)))
        if rest and others:
            assert max(rest) <= min(others) + 1e-12
        for c in got:
            assert in_pool(space, budget, c.widths, c.counts, 0.05)  # the band's pool holds every one
            assert c.extra["budget_used"] == pytest.approx(c.params / budget.params)
    return got, best_of, nd, points


@pytest.mark.parametrize("axes", ["depth,ffn", "depth,mamba_heads,attn_heads", "depth,ffn,hidden"])
def test_measured_set_is_undominated_and_spans_the_families(axes):
    src = tiny_layout(hidden_size=16)
    space = SearchSpace.build(src, axes, steps={"ffn": 8, "hidden": 4}, min_width=0.25)
    model = DamageModel(synthetic_scores(src, seed=3), space)
    budget = make_budget(src, target="0.85")
    got, best_of, nd, points = check_against_brute_force(src, space, model, budget, k=4)
    assert set(best_of) == {"depth only", "width only", "mixed"}
    assert len(nd) < len(points)  # dominated layouts exist and were left out
    # The band's top candidates by predicted damage do include a dominated layout here: what the filter removes.
    band_top = search(space, budget, model, k=4, band=0.05)
    nd_keys = [(p[0], p[1]) for p in nd]
    if axes == "depth,ffn":
        assert any((c.widths, c.counts) not in nd_keys for c in band_top)


@pytest.mark.parametrize("axes", ["depth,experts,expert_ffn", "experts,expert_ffn,shared_ffn"])
def test_moe_families_experts_against_widths(axes):
    src = tiny_moe_layout(hidden_size=32, mamba_num_heads=4)
    space = SearchSpace.build(src, axes, min_width=0.25 if "depth" not in axes else 0.5, steps={"shared_ffn": 16})
    model = DamageModel(moe_scores(src, seed=5), space)
    budget = make_budget(src, target="0.85")
    got, best_of, _, _ = check_against_brute_force(src, space, model, budget, k=2)
    want = {"experts only", "width only", "mixed"} | ({"depth only"} if "depth" in axes else set())
    assert set(best_of) == want
    assert len(got) >= len(want) > 2  # k below the number of families still measures every family


def test_family_search_without_a_member_returns_nothing():
    """Width-only layouts cannot reach a budget that needs more than the narrowest widths save."""
    src = tiny_layout(intermediate_size=24, hidden_size=16)
    space = SearchSpace.build(src, "depth,ffn", min_width=0.9)
    model = DamageModel(synthetic_scores(src), space)
    budget = make_budget(src, target="0.7")
    for method in ("enumerate", "mip"):
        assert search(space, budget, model, 1, method, band=0.0, family={("ffn",): True, ("depth",): False}) == []
        got = measured_set(space, budget, model, 4, method)
        assert "width only" not in {c.extra["family"] for c in got}
