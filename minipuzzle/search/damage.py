"""Predicted damage of a layout, from the importance scores. What the solver minimises.

The model (simple on purpose, every term in the same unit: the depth score of a layer):

* Dropping layer i costs its depth score d_i (the damage of removing that layer alone); dropped layers add up.
* A kept layer whose units are cut loses the fraction f_i of its importance that the cut units carried
  (scores normalised to sum to 1 within the layer, so f_i = the summed normalised scores of the dropped units),
  and costs d_i * f_i: cutting every unit of a layer costs the same as dropping it.
* Mamba layers cut on two axes keep (1 - f_heads)(1 - f_channels) of their importance; mixture-of-experts layers
  likewise (1 - f_experts)(1 - f_expert_channels)(1 - f_shared_channels). Cutting hidden channels (fraction f_h
  of the hidden scores) scales every kept layer's value by (1 - f_h).
* `weights[axis]` scales that axis's fraction (capped at 1) to trust an axis less or more; default 1.

So damage = D - sum over kept layers of d_i (1 - f_i)(1 - f_h), with D = sum of all d_i; it is reported relative
to D (0 = nothing important removed, 1 = everything). Without depth scores every layer counts 1. Units with a zero
score cost nothing, so planted dead units are always cut first.
"""

from __future__ import annotations

import numpy as np

from minipuzzle.anatomy import AXES, LEADING_KINDS, WIDTH_AXES, leading_layer_problem
from minipuzzle.errors import UserError
from minipuzzle.search.space import SearchSpace


def as_float_array(t) -> np.ndarray:
    """A tensor or array-like as a float64 numpy array on the CPU."""
    return np.asarray(t.detach().double().cpu().numpy() if hasattr(t, "detach") else t, dtype=np.float64)


def rank_desc(scores: np.ndarray) -> np.ndarray:
    """Indices from most to least important; equal scores keep index order, so zero scores sort last."""
    return np.lexsort((np.arange(len(scores)), -scores))


class DamageModel:
    """Damage of (widths, layer counts) predicted from `scores` for the layouts of `space`."""

    def __init__(self, scores, space: SearchSpace, weights: dict[str, float] | None = None):
        self.space = space
        src = space.source
        if scores.pattern and scores.pattern != src.pattern:
            raise UserError(f"scores were computed for pattern {scores.pattern!r}, the model has {src.pattern!r}")
        self.weights = {a: 1.0 for a in WIDTH_AXES} | dict(weights or {})
        if "depth" in space.axes:
            if "depth" not in scores:
                raise UserError("the scores have no depth scores: re-run `minipuzzle score` with the depth axis")
            d = as_float_array(scores["depth"])
            if d.shape != (src.num_layers,):
                raise UserError(f"depth scores have shape {tuple(d.shape)}, expected ({src.num_layers},)")
            self.depth = np.clip(np.nan_to_num(d, nan=0.0), 0.0, None)
        else:
            self.depth = np.ones(src.num_layers)
        self.total = float(self.depth.sum()) or 1.0
        # Layers of each kind from most to least important: the solver keeps a prefix of this order.
        self.order: dict[str, list[int]] = {}
        for kind in space.kinds:
            idx = np.array([i for i, ch in enumerate(src.pattern) if ch == kind], dtype=np.int64)
            self.order[kind] = idx[rank_desc(self.depth[idx])].tolist() if len(idx) else []
        # _dropped[axis][layer][width]: fraction of that layer's importance on the axis lost at that width (layer
        # -1 for hidden); only searched axes have a table.
        self._dropped: dict[str, dict[int, dict[int, float]]] = {}
        for axis in WIDTH_AXES:
            if len(space.widths[axis]) < 2:
                continue
            self._dropped[axis] = self._fractions(scores, axis)

    def _fractions(self, scores, axis: str) -> dict[int, dict[int, float]]:
        src, widths = self.space.source, self.space.widths[axis]
        groups, kind = AXES[axis].unit(src), AXES[axis].kind
        if kind is None:  # one table for every layer (hidden), kept as layer -1
            if axis not in scores:
                raise UserError(f"the scores have no {axis} scores: re-run `minipuzzle score` with {axis}")
            per_layer = {-1: scores[axis]}
        else:
            per_layer = scores[axis]
            want = [i for i, ch in enumerate(src.pattern) if ch == kind]
            missing = [i for i in want if i not in per_layer]
            if missing:
                raise UserError(f"the scores have no {axis} scores for layer {missing[0]}: re-run score")
        full = AXES[axis].width(src)  # `--widths` lists need not hold the source's width
        out = {}
        for i, t in per_layer.items():
            s = np.clip(np.nan_to_num(as_float_array(t).reshape(-1), nan=0.0), 0.0, None)
            if len(s) != full:
                raise UserError(f"{axis} scores of layer {i} have {len(s)} entries, expected {full}")
            total = s.sum()
            norm = s / total if total > 0 else s
            # Per group (grouped axes keep the same count in each group), the cheapest units go first.
            per_group = np.sort(norm.reshape(groups, -1), axis=1)
            cum = np.concatenate([np.zeros((groups, 1)), np.cumsum(per_group, axis=1)], axis=1).sum(axis=0)
            out[i] = {w: float(min(1.0, cum[(full - w) // groups] * self.weights[axis])) for w in widths}
        return out

    @property
    def scored_axes(self) -> tuple[str, ...]:
        """The width axes the space searches (more than one width), whose cuts cost importance."""
        return tuple(self._dropped)

    def dropped_fraction(self, axis: str, width: int, layer: int | None = None) -> float:
        """Fraction f of layer `layer`'s importance on `axis` that its least important units carry when `width`
        stay (the weight applied, at most 1). `layer` None for hidden; 0 for an axis the space does not search."""
        table = self._dropped.get(axis)
        return 0.0 if table is None else table[-1 if layer is None else layer][width]

    def kept_fraction(self, kind: str, layer: int, widths: dict[str, int]) -> float:
        """Share of layer `layer`'s importance kept at `widths` (hidden included)."""
        keep = 1.0
        for axis in self._dropped:
            if AXES[axis].kind is None:
                keep *= 1.0 - self.dropped_fraction(axis, widths[axis])
            elif AXES[axis].kind == kind:
                keep *= 1.0 - self.dropped_fraction(axis, widths[axis], layer)
        return keep

    def layer_values(self, widths: dict[str, int]) -> dict[str, np.ndarray]:
        """Per kind, the value d_i (1 - f_i)(1 - f_h) of each layer, in keep order (most important first)."""
        return {
            kind: np.array([self.depth[i] * self.kept_fraction(kind, i, widths) for i in order], dtype=np.float64)
            for kind, order in self.order.items()
        }

    def lower_bound(self, widths: dict[str, int]) -> float:
        """Damage at these widths with every layer kept: no layout with these widths does better."""
        return (self.total - sum(float(v.sum()) for v in self.layer_values(widths).values())) / self.total

    def damage(self, widths: dict[str, int], counts: dict[str, int]) -> float:
        """Relative predicted damage of keeping the top `counts[kind]` layers of each kind at `widths`."""
        vals = self.layer_values(widths)
        kept = sum(float(vals[k][: counts.get(k, 0)].sum()) for k in self.order)
        return (self.total - kept) / self.total

    def kept_layers(self, counts: dict[str, int]) -> list[int]:
        """Source indices of the layers kept, ascending: the top-ranked `counts[kind]` of each kind.

        A pruned model must not start with an MLP or MoE layer the source did not start with
        (`anatomy.leading_layer_problem`). When the top-ranked layers would, the kept set is the best one (most
        depth score) that starts right: for each layer p that may lead, keep p, no MLP or MoE layer before it, and
        otherwise the top-ranked of each kind. Counts, and so costs, are unchanged; the damage grows by the score
        given up, which `damage` does not see (the first layers nearly always rank high, so this is rare)."""
        pattern = self.space.source.pattern
        top = sorted(i for k in self.order for i in self.order[k][: counts.get(k, 0)])
        if not leading_layer_problem(pattern, top):
            return top
        best, best_value = top, -np.inf  # no start works: Plan.validate names the problem
        for p, lead in enumerate(pattern):
            if counts.get(lead, 0) == 0 or (p and lead not in LEADING_KINDS):
                continue
            kept = self._kept_after(p, counts)
            if kept is not None and float(self.depth[kept].sum()) > best_value:
                best, best_value = kept, float(self.depth[kept].sum())
        return best

    def _kept_after(self, p: int, counts: dict[str, int]) -> list[int] | None:
        """The top-ranked layers of each kind with layer p kept and no MLP or MoE layer before it (None if the
        counts cannot be met that way)."""
        out = [p]
        for kind, order in self.order.items():
            n = counts.get(kind, 0) - (kind == self.space.source.pattern[p])
            pick = [i for i in order if i != p and (kind in LEADING_KINDS or i > p)][:n]
            if len(pick) < n:
                return None
            out += pick
        return sorted(out)
