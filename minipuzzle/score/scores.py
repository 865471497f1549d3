"""The scores file: what the score stage hands to the search.

Tensors live in `scores.safetensors`; `scores.json` (an `artifacts.ScoresMeta`) is the readable summary next to
it. Higher = more important on every axis. Layer indices are the source model's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from minipuzzle.anatomy import AXES, KIND_NAMES, LAYER_AXES, PER_EXPERT_CHANNELS, SEARCH_AXES, WIDTH_AXES
from minipuzzle.artifacts import ScoresMeta
from minipuzzle.errors import UserError

# Every table a scores file may hold, in file order: depth and the width axes of `anatomy.AXES`, then the routed
# experts' own channels. Per-layer tables map source layer -> tensor; the others are one tensor for the model.
SCORE_TABLES = (*SEARCH_AXES, PER_EXPERT_CHANNELS)
PER_LAYER_TABLES = (*LAYER_AXES, PER_EXPERT_CHANNELS)


class Scores:
    """Importance of every prunable unit, one table per axis of `minipuzzle.anatomy` (`scores[axis]`).

    scores["depth"]: [num_layers] damage from dropping each layer alone (higher = more important).
    scores[layer axis][i]: [units] for each source layer i of the axis's kind, e.g. scores["ffn"][i]
    [intermediate_size] of MLP layer i, scores["mamba_heads"][i] [mamba_num_heads]. scores["hidden"]: [hidden_size].
    scores["expert_channels"][i]: [n_routed_experts, moe_intermediate_size], each routed expert's own channels
    (scored with expert_ffn, for the per-expert channel choice). An axis that was not scored reads as an empty
    dict (per-layer tables) or None. `meta` is how they were measured (`artifacts.ScoresMeta`; its `pattern` and
    `summary` are filled by `info()` from the tensors); meta.groups[axis]: the group count of each grouped axis
    (`Axis.unit`), for the within-group order in the summary.
    """

    def __init__(self, pattern: str, tables: dict[str, Any] | None = None, meta: ScoresMeta | None = None, **named):
        """`tables` (or keyword arguments named like them) maps table names of `SCORE_TABLES` to tensors."""
        self.pattern = pattern
        self.meta = meta if meta is not None else ScoresMeta()
        self.tables: dict[str, Any] = {}
        for name, table in {**(tables or {}), **named}.items():
            self[name] = table

    def __getitem__(self, name: str):
        _check_table(name)
        if name in PER_LAYER_TABLES:  # a table to fill layer by layer, like `scores["ffn"][i] = t`
            return self.tables.setdefault(name, {})
        return self.tables.get(name)

    def __setitem__(self, name: str, table) -> None:
        _check_table(name)
        if table is None:
            self.tables.pop(name, None)
        else:
            self.tables[name] = dict(table) if name in PER_LAYER_TABLES else table

    def __contains__(self, name: str) -> bool:
        """Whether table `name` holds scores (a per-layer table with at least one layer)."""
        table = self.tables.get(name)
        return table is not None and (name not in PER_LAYER_TABLES or bool(table))

    def __repr__(self) -> str:
        return f"Scores(pattern={self.pattern!r}, tables={[n for n in SCORE_TABLES if n in self]})"

    def tensors(self) -> dict[str, torch.Tensor]:
        """The tensors of scores.safetensors: `name` for whole-model tables, `name.layer` for per-layer ones."""
        out: dict[str, torch.Tensor] = {}
        for name in SCORE_TABLES:
            if name not in PER_LAYER_TABLES and name in self:
                out[name] = self[name]
        for name in PER_LAYER_TABLES:
            for i, t in self[name].items():
                out[f"{name}.{i}"] = t
        return {k: v.detach().float().contiguous().cpu() for k, v in out.items()}

    def info(self) -> ScoresMeta:
        """scores.json of these scores: `meta` with the pattern and the summary of the tensors."""
        return self.meta.model_copy(update={"pattern": self.pattern, "summary": self.summary()})

    def save(self, folder: str | Path) -> None:
        """Write scores.safetensors and scores.json into `folder` (which must exist)."""
        folder = Path(folder)
        info = self.info()
        save_file(self.tensors(), str(folder / "scores.safetensors"), metadata={"pattern": self.pattern})
        info.write(folder / "scores.json")

    @classmethod
    def load(cls, folder: str | Path) -> Scores:
        folder = Path(folder)
        f = folder / "scores.safetensors" if folder.is_dir() else folder
        if not f.is_file():
            raise UserError(f"no scores at {folder} (expected scores.safetensors from `minipuzzle score`)")
        try:
            tensors = load_file(str(f))

            with safe_open(str(f), framework="pt") as h:
                pattern = (h.metadata() or {}).get("pattern", "")
        except Exception as e:
            raise UserError(f"cannot read scores {f}: {e}") from None
        meta_file = f.parent / "scores.json"
        info = ScoresMeta.read(meta_file) if meta_file.is_file() else ScoresMeta()
        # The summary is derived from the tensors, so it is not carried.
        s = cls(pattern=pattern or info.pattern, meta=info.model_copy(update={"summary": {}}))
        for k, t in tensors.items():
            name, _, i = k.rpartition(".")
            if k in SCORE_TABLES and k not in PER_LAYER_TABLES:
                s[k] = t
            elif name in PER_LAYER_TABLES and i.isdigit():
                s.tables.setdefault(name, {})[int(i)] = t
            else:
                raise UserError(f"unknown score tensor {k!r} in {f}: re-run `minipuzzle score` with this version")
        return s

    # ---- readable views ---------------------------------------------------------------------------------------
    def layer_ranking(self, kind: str | None = None) -> list[int]:
        """Layer indices, most important first; `kind` ('M', '*', '-' or mamba/attention/mlp) keeps one kind."""
        if "depth" not in self:
            return []
        ch = {v: k for k, v in KIND_NAMES.items()}.get(kind, kind)
        order = torch.argsort(self["depth"].float(), descending=True, stable=True).tolist()
        return [i for i in order if ch is None or self.pattern[i] == ch]

    @staticmethod
    def group_order(scores: torch.Tensor, groups: int) -> torch.Tensor:
        """Unit indices [groups, per_group] sorted by score within each contiguous group, most important first
        (Mamba heads within their B/C group, query heads within their KV group)."""
        per = scores.numel() // groups
        local = torch.argsort(scores.float().view(groups, per), dim=1, descending=True, stable=True)
        return local + torch.arange(groups).unsqueeze(1) * per

    def summary(self) -> dict[str, Any]:
        """Layer ranking by kind, per-axis statistics and within-group head order, for scores.json."""
        out: dict[str, Any] = {}
        if "depth" in self:
            d = self["depth"].float()
            out["depth"] = {
                "scores": [round(float(x), 8) for x in d],
                "ranking": {name: self.layer_ranking(ch) for ch, name in KIND_NAMES.items() if ch in self.pattern},
                "least_important": self.layer_ranking()[::-1][:10],
            }
        groups = self.meta.groups
        for axis in LAYER_AXES:
            per = self[axis]
            if not per:
                continue
            allv = torch.cat([t.float().flatten() for t in per.values()])
            entry: dict[str, Any] = {
                "layers": sorted(per),
                "units_per_layer": int(next(iter(per.values())).numel()),
                "min": float(allv.min()),
                "mean": float(allv.mean()),
                "max": float(allv.max()),
                "exact_zeros": int((allv == 0).sum()),
            }
            g = groups.get(axis, 0)
            if g:
                entry["order_within_groups"] = {str(i): self.group_order(t, g).tolist() for i, t in per.items()}
            out[axis] = entry
        for name in (name for name in WIDTH_AXES if AXES[name].kind is None and name in self):
            h = self[name].float()
            out[name] = {
                "units": int(h.numel()),
                "min": float(h.min()),
                "mean": float(h.mean()),
                "max": float(h.max()),
                "exact_zeros": int((h == 0).sum()),
            }
        return out


def _check_table(name: str) -> None:
    if name not in SCORE_TABLES:
        raise KeyError(f"no score table {name!r}: scores hold {', '.join(SCORE_TABLES)}")
