"""Every width the search offers can be cut: for every preset, with the default axes and with each axis alone, a
plan at each width of the space passes the cut's own checks (`Plan.validate`, and the grouped expert matmul's
strides in bf16, the dtype the presets ship in)."""

import pytest
import torch

from minipuzzle.anatomy import AXES, LAYER_AXES
from minipuzzle.cut import Plan
from minipuzzle.errors import UserError
from minipuzzle.presets import PRESETS
from minipuzzle.search.space import SearchSpace, layout_axes


def plan_at(layout, axis: str, width: int) -> Plan:
    """Keep layer 0 and the first layer of each kind `axis` shapes (the checks are per layer and widths uniform:
    one layer says what all would), and on `axis` the first width/groups units of each group (which units does not matter to the
    checks, only how many and how they fall in groups)."""
    full, groups = AXES[axis].width(layout), AXES[axis].unit(layout)
    per, k = full // groups, width // groups
    kept = [g * per + j for g in range(groups) for j in range(k)]
    kinds = [AXES[axis].kind] if AXES[axis].kind else set(layout.pattern)  # hidden shapes every kind
    layers = sorted({0, *(layout.pattern.index(k) for k in kinds)})
    if axis == "hidden":
        return Plan(layers=layers, hidden=kept)
    return Plan(layers=layers, **{axis: {i: kept for i in layers if layout.pattern[i] == AXES[axis].kind}})


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_searched_width_passes_the_cuts_checks(name):
    layout = PRESETS[name].layout
    checked = 0
    for axes in (None, *(a for a in layout_axes(layout) if a in LAYER_AXES or a == "hidden")):
        space = SearchSpace.build(layout, None if axes is None else f"depth,{axes}")
        for axis, widths in space.widths.items():
            for w in widths[1:]:  # the first is the source's own width
                plan = plan_at(layout, axis, w)
                plan.target_layout(layout)
                plan.check_expert_strides(layout, torch.bfloat16)
                checked += 1
    assert checked > 0


def test_the_nano3_hidden_steps_are_multiples_of_eight():
    """The case that failed after scoring: hidden 2688 stepped by 84 (2604, 2520, ...), which the cut refuses."""
    layout = PRESETS["nano3-30b-a3b"].layout
    widths = SearchSpace.build(layout, "depth,hidden").widths["hidden"]
    assert len(widths) > 5 and all(w % 8 == 0 for w in widths)
    with pytest.raises(UserError, match="multiple of 8 .*grouped expert matmul"):
        SearchSpace.build(layout, "depth,hidden", steps={"hidden": 84})
