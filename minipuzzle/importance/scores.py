"""The scores file: what the importance stage hands to the search.

Tensors live in `scores.safetensors`; `scores.json` (an `artifacts.ScoresMeta`) is the readable summary next to
it. Higher = more important on every axis. Layer indices are the source model's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from minipuzzle.anatomy import KIND_NAMES, LAYER_AXES
from minipuzzle.artifacts import ScoresMeta
from minipuzzle.errors import UserError


@dataclass
class Scores:
    """Importance of every prunable unit (axes as in `minipuzzle.anatomy`).

    depth: [num_layers] damage from dropping each layer alone (higher = more important).
    ffn[i]: [intermediate_size] for each MLP layer i. mamba_heads[i]: [mamba_num_heads] for each Mamba layer i.
    mamba_head_dim[i]: [mamba_head_dim]. attn_heads[i]: [num_attention_heads] for each attention layer i.
    hidden: [hidden_size]. expert_channels[i]: [n_routed_experts, moe_intermediate_size], each routed expert's own
    channels (scored with expert_ffn, for the per-expert channel choice). An axis that was not scored is empty / None. `meta` is how they were measured
    (`artifacts.ScoresMeta`; its `pattern` and `summary` are filled by `info()` from the tensors); meta.groups[axis]:
    the group count of each grouped axis (`Axis.unit`), for the within-group order in the summary.
    """

    pattern: str
    depth: torch.Tensor | None = None
    ffn: dict[int, torch.Tensor] = field(default_factory=dict)
    mamba_heads: dict[int, torch.Tensor] = field(default_factory=dict)
    mamba_head_dim: dict[int, torch.Tensor] = field(default_factory=dict)
    attn_heads: dict[int, torch.Tensor] = field(default_factory=dict)
    hidden: torch.Tensor | None = None
    experts: dict[int, torch.Tensor] = field(default_factory=dict)
    expert_ffn: dict[int, torch.Tensor] = field(default_factory=dict)
    shared_ffn: dict[int, torch.Tensor] = field(default_factory=dict)
    expert_channels: dict[int, torch.Tensor] = field(default_factory=dict)
    meta: ScoresMeta = field(default_factory=ScoresMeta)

    def tensors(self) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        if self.depth is not None:
            out["depth"] = self.depth
        if self.hidden is not None:
            out["hidden"] = self.hidden
        for axis in (*LAYER_AXES, "expert_channels"):
            for i, t in getattr(self, axis).items():
                out[f"{axis}.{i}"] = t
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
            from safetensors import safe_open

            with safe_open(str(f), framework="pt") as h:
                pattern = (h.metadata() or {}).get("pattern", "")
        except Exception as e:
            raise UserError(f"cannot read scores {f}: {e}") from None
        meta_file = f.parent / "scores.json"
        info = ScoresMeta.read(meta_file) if meta_file.is_file() else ScoresMeta()
        # The summary is derived from the tensors, so it is not carried.
        s = cls(pattern=pattern or info.pattern, meta=info.model_copy(update={"summary": {}}))
        for k, t in tensors.items():
            axis, _, i = k.rpartition(".")
            if k in ("depth", "hidden"):
                setattr(s, k, t)
            elif axis in (*LAYER_AXES, "expert_channels"):
                getattr(s, axis)[int(i)] = t
            else:
                raise UserError(f"unknown score tensor {k!r} in {f}: re-run `minipuzzle score` with this version")
        return s

    # ---- readable views ---------------------------------------------------------------------------------------
    def layer_ranking(self, kind: str | None = None) -> list[int]:
        """Layer indices, most important first; `kind` ('M', '*', '-' or mamba/attention/mlp) keeps one kind."""
        if self.depth is None:
            return []
        ch = {v: k for k, v in KIND_NAMES.items()}.get(kind, kind)
        order = torch.argsort(self.depth.float(), descending=True, stable=True).tolist()
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
        if self.depth is not None:
            d = self.depth.float()
            out["depth"] = {
                "scores": [round(float(x), 8) for x in d],
                "ranking": {name: self.layer_ranking(ch) for ch, name in KIND_NAMES.items() if ch in self.pattern},
                "least_important": self.layer_ranking()[::-1][:10],
            }
        groups = self.meta.groups
        for axis in LAYER_AXES:
            per = getattr(self, axis)
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
        if self.hidden is not None:
            h = self.hidden.float()
            out["hidden"] = {
                "units": int(h.numel()),
                "min": float(h.min()),
                "mean": float(h.mean()),
                "max": float(h.max()),
                "exact_zeros": int((h == 0).sum()),
            }
        return out
