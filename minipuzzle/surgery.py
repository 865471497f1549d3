"""Cut a Nemotron-H checkpoint down to a plan: which layers stay and, per axis, which units stay.

Where each unit lives (I = mamba heads x head_dim, G = groups, N = state size, H = mamba heads):
- FFN channel c of an MLP layer: row c of `up_proj`, column c of `down_proj`.
- Mamba head h (channels h*P .. h*P+P-1 of I): those rows in the z and x blocks of `in_proj`, the same channels of
  the conv over x, entry h of `A_log`, `D`, `dt_bias` and of the dt block of `in_proj`, those channels of the gated
  `norm`, those columns of `out_proj`. B and C (per group) are never cut, so heads are cut within their group.
- Mamba head channel p: channel p of every head, in all the places above.
- Attention query head q: rows q*d..q*d+d-1 of `q_proj`, those columns of `o_proj`; K and V stay.
- Hidden channel j: column j of the embeddings, `lm_head` and every input projection; row j of every output
  projection; entry j of every RMSNorm over the hidden size.

Removing channels from an RMSNorm's input changes its mean square even when they held zeros, so by default
(`Plan.norm_compensation`) the norms over the hidden size and the Mamba gated group norm scale their kept weights by
sqrt(old_width / new_width): removing units that contribute nothing then leaves the logits unchanged up to the
norm's epsilon. Switched off, the kept weights are copied as they are.

Two modes that call the same per-tensor function, so they agree bit for bit: in memory (`prune_state_dict`,
`prune_model`) and streamed from the source shards to the output shards (`prune_checkpoint`), holding about one
tensor at a time.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from minipuzzle.arch import ATTENTION, MAMBA, MLP, Layout
from minipuzzle.checkpoint import (
    Checkpoint,
    ShardWriter,
    atomic_dir,
    build_model,
    copy_tokenizer,
    model_state_dict,
    native_name,
    write_config,
)
from minipuzzle.errors import UserError
from minipuzzle.progress import track

AXES = ("ffn", "mamba_heads", "mamba_head_channels", "attn_heads")
_AXIS_KIND = {"ffn": MLP, "mamba_heads": MAMBA, "mamba_head_channels": MAMBA, "attn_heads": ATTENTION}
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


@dataclass
class Plan:
    """Which units of a source model stay.

    layers: kept source layer indices, ascending. ffn / mamba_heads / mamba_head_channels / attn_heads: for each kept
    source layer of that kind, the kept unit indices (ascending); None keeps everything on that axis. mamba_heads
    are global head indices, mamba_head_channels are indices within a head (the same in every head), attn_heads are
    query-head indices. hidden: kept hidden (residual-stream) channels, or None. norm_compensation: scale the kept
    weights of RMSNorms that lose input channels by sqrt(old_width / new_width).
    """

    layers: list[int]
    ffn: dict[int, list[int]] | None = None
    mamba_heads: dict[int, list[int]] | None = None
    mamba_head_channels: dict[int, list[int]] | None = None
    attn_heads: dict[int, list[int]] | None = None
    hidden: list[int] | None = None
    norm_compensation: bool = True

    @classmethod
    def keep_all(cls, layout: Layout) -> Plan:
        return cls(layers=list(range(layout.num_layers)))

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"layers": list(self.layers)}
        for axis in AXES:
            sel = getattr(self, axis)
            if sel is not None:
                d[axis] = {str(i): list(map(int, v)) for i, v in sorted(sel.items())}
        if self.hidden is not None:
            d["hidden"] = list(map(int, self.hidden))
        d["norm_compensation"] = self.norm_compensation
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Plan:
        unknown = set(d) - {"layers", "hidden", "norm_compensation", *AXES}
        if unknown:
            raise UserError(f"unknown key(s) in plan: {', '.join(sorted(unknown))}")
        if "layers" not in d:
            raise UserError("plan lacks 'layers'")
        kw: dict[str, Any] = {"layers": [int(i) for i in d["layers"]]}
        for axis in AXES:
            if d.get(axis) is not None:
                kw[axis] = {int(i): [int(u) for u in v] for i, v in d[axis].items()}
        if d.get("hidden") is not None:
            kw["hidden"] = [int(u) for u in d["hidden"]]
        comp = d.get("norm_compensation", True)
        if not isinstance(comp, bool):
            raise UserError(f"plan's norm_compensation must be true or false, got {comp!r}")
        kw["norm_compensation"] = comp
        return cls(**kw)

    def kept(self, axis: str, layer: int, full: int) -> list[int]:
        sel = getattr(self, axis)
        if sel is None or layer not in sel:
            return list(range(full))
        return sel[layer]

    def validate(self, layout: Layout) -> None:
        """Check the plan against the source layout; raise UserError naming the first problem."""
        L = layout.num_layers
        if not self.layers:
            raise UserError("plan keeps no layers")
        if sorted(set(self.layers)) != list(self.layers) or self.layers[0] < 0 or self.layers[-1] >= L:
            raise UserError(f"plan layers must be ascending, unique and within 0..{L - 1}")
        full = {
            "ffn": layout.intermediate_size,
            "mamba_heads": layout.mamba_num_heads,
            "mamba_head_channels": layout.mamba_head_dim,
            "attn_heads": layout.num_attention_heads,
        }
        for axis in AXES:
            kind = _AXIS_KIND[axis]
            counts = set()
            for i in self.layers:
                if layout.pattern[i] != kind:
                    continue
                keep = self.kept(axis, i, full[axis])
                _check_indices(keep, full[axis], f"{axis} of layer {i}")
                counts.add(len(keep))
            sel = getattr(self, axis) or {}
            for i in sel:
                if i not in self.layers or layout.pattern[i] != kind:
                    raise UserError(f"plan gives {axis} for layer {i}, which is not a kept {kind!r} layer")
            if len(counts) > 1:
                raise UserError(
                    f"plan keeps different numbers of {axis} per layer ({sorted(counts)}): widths must be uniform"
                )
        per_group = layout.mamba_num_heads // layout.n_groups
        for i, heads in (self.mamba_heads or {}).items():
            groups = [sum(1 for h in heads if h // per_group == g) for g in range(layout.n_groups)]
            if len(set(groups)) != 1:
                raise UserError(
                    f"layer {i} keeps Mamba heads unevenly across groups {groups}: keep the same count per group"
                )
        per_kv = layout.num_attention_heads // layout.num_key_value_heads
        for i, heads in (self.attn_heads or {}).items():
            groups = [sum(1 for h in heads if h // per_kv == g) for g in range(layout.num_key_value_heads)]
            if len(set(groups)) != 1:
                raise UserError(f"layer {i} keeps attention heads unevenly across KV groups {groups}")
        if self.hidden is not None:
            _check_indices(self.hidden, layout.hidden_size, "hidden")

    def target_layout(self, layout: Layout) -> Layout:
        """The layout of the pruned model."""
        self.validate(layout)

        def width(axis: str, full: int) -> int:
            for i in self.layers:
                if layout.pattern[i] == _AXIS_KIND[axis]:
                    return len(self.kept(axis, i, full))
            return full  # no layer of that kind left: the width is irrelevant, keep the source's

        return layout.replace(
            pattern="".join(layout.pattern[i] for i in self.layers),
            intermediate_size=width("ffn", layout.intermediate_size),
            mamba_num_heads=width("mamba_heads", layout.mamba_num_heads),
            mamba_head_dim=width("mamba_head_channels", layout.mamba_head_dim),
            num_attention_heads=width("attn_heads", layout.num_attention_heads),
            hidden_size=layout.hidden_size if self.hidden is None else len(self.hidden),
        )


def _check_indices(idx: list[int], full: int, what: str) -> None:
    if not idx:
        raise UserError(f"plan keeps no {what}")
    if sorted(set(idx)) != list(idx) or idx[0] < 0 or idx[-1] >= full:
        raise UserError(f"plan's {what} must be ascending, unique and within 0..{full - 1}")


# ---- per-tensor cutting -----------------------------------------------------------------------------------------


class Cutter:
    """Precomputed index tensors for one (layout, plan) pair: `cut(name, tensor)` slices one tensor (native source
    name), `output_name(name)` renames it (None for a dropped layer). Build once per plan, reuse for every tensor."""

    def __init__(self, layout: Layout, plan: Plan):
        plan.validate(layout)
        self.src, self.plan = layout, plan
        self.dst = plan.target_layout(layout)
        self.new_index = {old: new for new, old in enumerate(plan.layers)}
        h = layout.hidden_size
        self.hidden = None if plan.hidden is None or len(plan.hidden) == h else torch.tensor(plan.hidden)
        self.hidden_scale = math.sqrt(h / self.dst.hidden_size) if plan.norm_compensation else 1.0

    def output_name(self, name: str) -> str | None:
        """Native name of `name` in the pruned model, or None when its layer is dropped."""
        m = _LAYER_RE.match(name)
        if not m:
            return name
        i = int(m.group(1))
        if i not in self.new_index:
            return None
        return f"model.layers.{self.new_index[i]}.{m.group(2)}"

    def _rows(self, t: torch.Tensor, idx: torch.Tensor | None) -> torch.Tensor:
        return t if idx is None else t.index_select(0, idx)

    def _cols(self, t: torch.Tensor, idx: torch.Tensor | None) -> torch.Tensor:
        return t if idx is None else t.index_select(1, idx)

    def _hidden_norm(self, t: torch.Tensor) -> torch.Tensor:
        if self.hidden is None:
            return t
        if self.hidden_scale == 1.0:
            return t.index_select(0, self.hidden)
        return (t.index_select(0, self.hidden).float() * self.hidden_scale).to(t.dtype)

    def _mamba_index(self, i: int) -> dict[str, torch.Tensor | None]:
        lay, plan = self.src, self.plan
        H, P = lay.mamba_num_heads, lay.mamba_head_dim
        heads = plan.kept("mamba_heads", i, H)
        chans = plan.kept("mamba_head_channels", i, P)
        if len(heads) == H and len(chans) == P:
            return {"inner": None, "heads": None, "in_proj": None, "conv": None, "norm_scale": 1.0}
        inner = torch.tensor([h * P + p for h in heads for p in chans])
        I, GN = lay.mamba_intermediate, lay.n_groups * lay.ssm_state_size
        heads_t = torch.tensor(heads)
        bc = torch.arange(2 * GN)
        in_proj = torch.cat([inner, I + inner, 2 * I + bc, 2 * I + 2 * GN + heads_t])
        conv = torch.cat([inner, I + bc])
        old_group, new_group = I // lay.n_groups, len(inner) // lay.n_groups
        return {
            "inner": inner,
            "heads": heads_t,
            "in_proj": in_proj,
            "conv": conv,
            "norm_scale": math.sqrt(old_group / new_group) if plan.norm_compensation else 1.0,
        }

    def cut(self, name: str, t: torch.Tensor) -> torch.Tensor:
        """Slice one tensor (native source name) to the plan."""
        hid = self.hidden
        if name in ("model.embeddings.weight", "lm_head.weight"):
            return self._cols(t, hid)
        if name == "model.norm_f.weight":
            return self._hidden_norm(t)
        m = _LAYER_RE.match(name)
        if not m:
            raise UserError(f"unexpected weight {name} in a Nemotron-H checkpoint")
        i, rest = int(m.group(1)), m.group(2)
        kind = self.src.pattern[i]
        if rest == "norm.weight":
            return self._hidden_norm(t)
        if kind == MLP:
            ffn = self.plan.kept("ffn", i, self.src.intermediate_size)
            f = None if len(ffn) == self.src.intermediate_size else torch.tensor(ffn)
            if rest == "mixer.up_proj.weight":
                return self._cols(self._rows(t, f), hid)
            if rest == "mixer.up_proj.bias":
                return self._rows(t, f)
            if rest == "mixer.down_proj.weight":
                return self._cols(self._rows(t, hid), f)
            if rest == "mixer.down_proj.bias":
                return self._rows(t, hid)
        elif kind == ATTENTION:
            q = self.plan.kept("attn_heads", i, self.src.num_attention_heads)
            d = self.src.head_dim
            qi = (
                None
                if len(q) == self.src.num_attention_heads
                else torch.tensor([h * d + c for h in q for c in range(d)])
            )
            if rest == "mixer.q_proj.weight":
                return self._cols(self._rows(t, qi), hid)
            if rest in ("mixer.k_proj.weight", "mixer.v_proj.weight"):
                return self._cols(t, hid)
            if rest == "mixer.o_proj.weight":
                return self._cols(self._rows(t, hid), qi)
            if rest in ("mixer.q_proj.bias",):
                return self._rows(t, qi)
            if rest in ("mixer.k_proj.bias", "mixer.v_proj.bias"):
                return t
            if rest == "mixer.o_proj.bias":
                return self._rows(t, hid)
        elif kind == MAMBA:
            ix = self._mamba_index(i)
            if rest == "mixer.in_proj.weight":
                return self._cols(self._rows(t, ix["in_proj"]), hid)
            if rest == "mixer.in_proj.bias":
                return self._rows(t, ix["in_proj"])
            if rest in ("mixer.conv1d.weight", "mixer.conv1d.bias"):
                return self._rows(t, ix["conv"])
            if rest in ("mixer.A_log", "mixer.D", "mixer.dt_bias"):
                return self._rows(t, ix["heads"])
            if rest == "mixer.norm.weight":
                t2 = self._rows(t, ix["inner"])
                if ix["norm_scale"] != 1.0:
                    t2 = (t2.float() * ix["norm_scale"]).to(t.dtype)
                return t2
            if rest == "mixer.out_proj.weight":
                return self._cols(self._rows(t, hid), ix["inner"])
            if rest == "mixer.out_proj.bias":
                return self._rows(t, hid)
        raise UserError(f"unexpected weight {name} for a {kind!r} layer")


# ---- the three entry points -------------------------------------------------------------------------------------


def prune_state_dict(
    state: dict[str, torch.Tensor], layout: Layout, plan: Plan
) -> tuple[Layout, dict[str, torch.Tensor]]:
    """Apply `plan` to a full state dict (either weight-name style). Returns (new layout, new native state)."""
    cutter = Cutter(layout, plan)
    out: dict[str, torch.Tensor] = {}
    for name, t in state.items():
        name = native_name(name)
        new = cutter.output_name(name)
        if new is not None:
            out[new] = cutter.cut(name, t)
    return cutter.dst, out


def prune_model(model, plan: Plan):
    """A new, smaller `NemotronHForCausalLM` with the weights of `model` cut to `plan` (same dtype and device)."""
    layout = Layout.from_config(model.config)
    new_layout, state = prune_state_dict(model_state_dict(model), layout, plan)
    new = build_model(new_layout, model.config.to_dict())
    new.load_state_dict(state, strict=True, assign=True)
    new.train(model.training)
    return new


def prune_checkpoint(
    source: str | Path | Checkpoint,
    plan: Plan,
    out: str | Path,
    *,
    overwrite: bool = False,
    max_shard_bytes: int = 5 * 10**9,
    progress: bool = True,
    extra_files: dict[str, str] | None = None,
) -> Path:
    """Stream `source` through `plan` into a standard checkpoint at `out`, one tensor in memory at a time.

    The output has a native config, sharded safetensors with an index, and the source's tokenizer and generation
    config; it is written to a temporary folder and renamed into place.
    """
    ckpt = source if isinstance(source, Checkpoint) else Checkpoint(source)
    cutter = Cutter(ckpt.layout, plan)
    names = [n for n in ckpt.keys() if cutter.output_name(n) is not None]
    with atomic_dir(out, overwrite) as tmp:
        writer = ShardWriter(tmp, max_shard_bytes)
        dtype = None
        for name in track(names, "cutting weights", progress, transient=True):
            t = ckpt.get(name)
            dtype = dtype or (t.dtype if t.is_floating_point() else None)
            writer.add(cutter.output_name(name), cutter.cut(name, t))
            del t
        writer.close()
        write_config(tmp, cutter.dst.to_config(ckpt.config), dtype)
        copy_tokenizer(ckpt.path, tmp)
        (tmp / "prune_plan.json").write_text(_plan_json(plan, ckpt.layout, cutter.dst))
        for fname, text in (extra_files or {}).items():
            (tmp / fname).write_text(text)
    return Path(out)


def _plan_json(plan: Plan, src: Layout, dst: Layout) -> str:
    import json

    return json.dumps(
        {
            "source": {"pattern": src.pattern, "params": src.num_params()},
            "result": {"pattern": dst.pattern, "params": dst.num_params(), **dst.summary()},
            "plan": plan.to_dict(),
        },
        indent=1,
    )
