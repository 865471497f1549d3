"""Tiny random Nemotron-H models and tokenizers for tests, benchmarks and examples.

Real checkpoints are tens of GB; every property the toolkit promises (an exact cut, streamed == in-memory,
resumable runs) is checked on models built here in milliseconds.
"""

from __future__ import annotations

import contextlib
import io
import json
import sys
import sysconfig
from pathlib import Path

import torch
from transformers import NemotronHForCausalLM

from minipuzzle import anatomy
from minipuzzle.arch import Layout
from minipuzzle.checkpoint.build import model_state_dict
from minipuzzle.checkpoint.read import is_merged_experts
from minipuzzle.checkpoint.write import ShardWriter, atomic_dir, write_config
from minipuzzle.cli import main
from minipuzzle.data import train_bpe_tokenizer


def tiny_layout(**overrides) -> Layout:
    """A small layout with every axis prunable: 2 groups, GQA, several layers of each kind."""
    base = dict(
        pattern="M-*M-M*-M-",
        hidden_size=64,
        intermediate_size=96,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=8,
        mamba_num_heads=8,
        mamba_head_dim=8,
        n_groups=2,
        ssm_state_size=8,
        conv_kernel=4,
        vocab_size=320,
    )
    base.update(overrides)
    return Layout(**base)


def tiny_moe_layout(**overrides) -> Layout:
    """A small mixture-of-experts layout (Nemotron 3 in miniature) with every layer kind: 8 routed experts of width
    32 in 2 router groups, the top 2 chosen from the best group, a shared expert of width 48."""
    moe = {"pattern": "ME*EM-", "n_routed_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
           "moe_shared_expert_intermediate_size": 48, "n_group": 2, "topk_group": 1}  # fmt: skip
    return tiny_layout(**{**moe, **overrides})


def tiny_config(layout: Layout | None = None, **config_overrides) -> dict:
    """Native config dict for a tiny model (small chunk size so the chunked SSM scan is exercised)."""
    layout = layout or tiny_layout()
    cfg = layout.to_config({"chunk_size": 16, "layer_norm_epsilon": 1e-5, "max_position_embeddings": 2048})
    cfg.update(config_overrides)
    return cfg


def random_model(layout: Layout | None = None, seed: int = 0, config: dict | None = None, scale: float = 0.5):
    """A `NemotronHForCausalLM` in float32 with every parameter random, norms included.

    The default init sets norm weights to one and D to one; randomising them makes tests sensitive to slicing
    mistakes that an all-ones vector would hide. For the same reason the routers' `e_score_correction_bias`
    buffers (zeros by default) are random; routed experts [E, out, in] are initialised like E linear layers.
    """

    layout = layout or tiny_layout()
    cfg = layout.to_hf_config(config or tiny_config(layout))
    gen = torch.Generator().manual_seed(seed)
    model = NemotronHForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("A_log"):
                p.copy_(torch.log(torch.rand(p.shape, generator=gen) * 4 + 0.5))
            elif name.endswith("dt_bias"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5 - 1.0)
            elif p.ndim == 1:
                p.copy_(1.0 + torch.randn(p.shape, generator=gen) * 0.2)
            elif p.ndim == 2 or is_merged_experts(name):
                p.copy_(torch.randn(p.shape, generator=gen) * scale / p.shape[-1] ** 0.5)
            else:  # the depthwise conv (channels, 1, kernel)
                p.copy_(torch.randn(p.shape, generator=gen) * scale / p[0].numel() ** 0.5 * 2.0)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(torch.randn(b.shape, generator=gen) * 0.05)
    model.eval()
    return model


def stdlib_text_files(limit: int | None = None) -> list[Path]:
    """Python standard library source files: real text every machine has."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.glob("*.py") if p.stat().st_size > 2000)
    return files[:limit] if limit else files


def stdlib_text_folder(folder: Path, count: int) -> Path:
    """`folder` holding copies of the first `count` stdlib text files (a data folder a test may split)."""
    folder.mkdir(parents=True)
    for f in stdlib_text_files(count):
        (folder / f.name).write_text(f.read_text())
    return folder


def make_tokenizer(vocab_size: int = 320, files: list[Path] | None = None):
    """A byte-level BPE tokenizer trained on a few stdlib files (deterministic, about a second)."""

    return train_bpe_tokenizer(files or stdlib_text_files(8), vocab_size)


def save_model(
    model,
    path: str | Path,
    *,
    style: str = "model",
    tokenizer=None,
    max_shard_bytes: int = 2**40,
    overwrite: bool = False,
    split_experts: bool = True,
) -> Path:
    """Save a model as safetensors with native (`model.*`) or remote-code (`backbone.*`) weight names.

    The remote-code style also writes a remote-code config (hybrid_override_pattern, mamba_* keys), as NVIDIA's
    hub checkpoints have, so both readers are exercised. Routed experts are stored one tensor per expert, as
    transformers' `save_pretrained` and the hub store them, or with `split_experts=False` as the model's merged
    3-D tensors.
    """
    layout = Layout.from_config(model.config)
    if style == "backbone":
        # Written as NVIDIA's hub configs are: remote-code keys, infinity as a bare JSON `Infinity` (json.dumps).
        cfg = layout.to_config(model.config)
        cfg.pop("layers_block_type")
        cfg["hybrid_override_pattern"] = layout.pattern
        cfg["num_hidden_layers"] = layout.num_layers
        cfg["mamba_n_groups"] = cfg.pop("n_groups")
        cfg["mamba_d_conv"] = cfg.pop("conv_kernel")
        cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_nemotron_h.NemotronHForCausalLM"}
        cfg["dtype"] = str(next(model.parameters()).dtype).removeprefix("torch.")
    with atomic_dir(path, overwrite) as tmp:
        writer = ShardWriter(tmp, max_shard_bytes, split_experts)
        for name, t in model_state_dict(model).items():
            if style == "backbone" and name.startswith("model."):
                name = "backbone." + name[len("model.") :]
            writer.add(name, t)
        writer.close()
        if style == "backbone":
            (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        else:
            write_config(tmp, layout.to_hf_config(model.config), next(model.parameters()).dtype)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return Path(path)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """|a - b| / |b| (Frobenius): how far a cut model's logits moved from the source's."""
    return ((a - b).norm() / b.norm()).item()


def moe_layers(layout: Layout) -> list[int]:
    """Indices of the MoE layers of `layout`."""
    return [i for i, c in enumerate(layout.pattern) if c == anatomy.MOE]


def cached_and_uncached_greedy(model, ids: torch.Tensor, new_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy continuations of `ids` [batch, seq] two ways, each [batch, new_tokens]: transformers' `generate()`
    (a cached forward per token, as serving and lm-eval's generation tasks run it) and a loop of full forwards
    without a cache. Equal tokens say the cached path runs and agrees with the logits the tests check."""
    with torch.no_grad():
        cached = model.generate(
            input_ids=ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, use_cache=True,
            pad_token_id=0,
        )[:, ids.shape[1] :]  # fmt: skip
        seq = ids
        for _ in range(new_tokens):
            nxt = model(seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], dim=1)
    return cached, seq[:, ids.shape[1] :]


def run_cli(args: list[str]) -> tuple[int, str, str]:
    """Run `minipuzzle ARGS` in this process as a user would: (exit code, stdout, stderr)."""


    out, err = io.StringIO(), io.StringIO()
    old = sys.argv
    sys.argv = ["minipuzzle", *args]
    code = 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            main()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv = old
    return code, out.getvalue(), err.getvalue()


# A router correction bias that keeps an expert out of every token's choice: sigmoid scores lie in [0, 1], so with
# at least two live experts in its group, the planted one is never among the group's best two (whose sum ranks
# the groups) nor among the top-k.
NEVER_CHOSEN_BIAS = -1e4


@torch.no_grad()
def plant_dead_units(model, plan) -> None:
    """Zero every weight into and out of the units that `plan` removes, in place.

    Afterwards the removed units contribute nothing, so pruning `model` by `plan` must leave its logits unchanged
    (up to the norm epsilon): the property the cut and search tests check.
    Dropped layers get a zero output projection (the block becomes the identity). Removed routed experts are made
    never chosen instead (router row zero, correction bias `NEVER_CHOSEN_BIAS`): their weights stay random, since
    an expert the router never picks never runs.
    """
    layout = Layout.from_config(model.config)
    dead_hidden = sorted(set(range(layout.hidden_size)) - set(plan["hidden"] or range(layout.hidden_size)))
    base = model.model
    for i, block in enumerate(base.layers):
        mixer, kind = block.mixer, layout.pattern[i]
        outputs, inputs = _hidden_weights(mixer, kind)
        if i not in plan.layers:
            for w, _ in outputs:
                w.zero_()
            continue
        _DEAD_UNIT_PLANTERS[kind](mixer, layout, plan, i)
        if dead_hidden:
            for w, dim in outputs + inputs:
                w.index_fill_(dim, torch.tensor(dead_hidden), 0)
            block.norm.weight[dead_hidden] = 0
    if dead_hidden:
        base.embeddings.weight[:, dead_hidden] = 0
        base.norm_f.weight[dead_hidden] = 0
        model.lm_head.weight[:, dead_hidden] = 0


def _hidden_weights(mixer, kind: str) -> tuple[list, list]:
    """The weights (and biases) of a mixer that write into the residual stream and the weights that read it, as
    (tensor, the dim of the hidden size)."""
    if kind != anatomy.MOE:
        out = _OUTPUT_PROJECTIONS[kind]
        inputs = [(p, 1) for name, p in mixer.named_parameters() if p.ndim == 2 and name.split(".")[0] != out]
        return _writes(getattr(mixer, out)), inputs
    outputs = _writes(mixer.shared_experts.down_proj)
    inputs = [(mixer.gate.weight, 1), (mixer.shared_experts.up_proj.weight, 1)]
    if isinstance(mixer.fc1_latent_proj, torch.nn.Linear):  # the routed experts work in the latent space
        return outputs + _writes(mixer.fc2_latent_proj), inputs + [(mixer.fc1_latent_proj.weight, 1)]
    return outputs + [(mixer.experts.down_proj, 1)], inputs + [(mixer.experts.up_proj, 2)]


def _writes(linear) -> list:
    """A linear layer's weight rows and bias entries, as (tensor, the dim of its outputs)."""
    return [(linear.weight, 0)] + ([(linear.bias, 0)] if linear.bias is not None else [])


def _dropped(plan, axis: str, layer: int, layout: Layout) -> list[int]:
    full = anatomy.AXES[axis].width(layout)
    return sorted(set(range(full)) - set(plan.kept(axis, layer, full)))


def _plant_mlp(mixer, layout: Layout, plan, i: int) -> None:
    dead = _dropped(plan, "ffn", i, layout)
    mixer.up_proj.weight[dead] = 0
    mixer.down_proj.weight[:, dead] = 0


def _plant_attention(mixer, layout: Layout, plan, i: int) -> None:
    rows = anatomy.attention_rows(layout, _dropped(plan, "attn_heads", i, layout))
    mixer.q_proj.weight[rows] = 0
    mixer.o_proj.weight[:, rows] = 0


def _plant_mamba(mixer, layout: Layout, plan, i: int) -> None:
    all_heads, all_channels = range(layout.mamba_num_heads), range(layout.mamba_head_dim)
    dead_heads = _dropped(plan, "mamba_heads", i, layout)
    kept_heads = sorted(set(all_heads) - set(dead_heads))
    dead_channels = _dropped(plan, "mamba_head_dim", i, layout)
    # A channel is dead when its head is, or when its position within every head is.
    dead = sorted(
        set(anatomy.mamba_channels(layout, dead_heads, list(all_channels)))
        | set(anatomy.mamba_channels(layout, kept_heads, dead_channels))
    )
    proj, conv = anatomy.mamba_in_proj_slices(layout), anatomy.mamba_conv_slices(layout)
    for block in ("z", "x"):
        mixer.in_proj.weight[[proj[block].start + c for c in dead]] = 0
    mixer.in_proj.weight[[proj["dt"].start + h for h in dead_heads]] = 0
    conv_rows = [conv["x"].start + c for c in dead]
    mixer.conv1d.weight[conv_rows] = 0
    if mixer.conv1d.bias is not None:
        mixer.conv1d.bias[conv_rows] = 0
    mixer.out_proj.weight[:, dead] = 0


def _plant_moe(mixer, layout: Layout, plan, i: int) -> None:
    never = _dropped(plan, "experts", i, layout)
    mixer.gate.weight[never] = 0
    mixer.gate.e_score_correction_bias[never] = NEVER_CHOSEN_BIAS
    per_expert = (plan["expert_channels"] or {}).get(i)
    full = layout.moe_intermediate_size
    for e in range(layout.n_routed_experts):  # each expert's own channels, or the same in every expert
        dead = sorted(set(range(full)) - set(per_expert[e])) if per_expert else _dropped(plan, "expert_ffn", i, layout)
        mixer.experts.up_proj[e, dead] = 0
        mixer.experts.down_proj[e, :, dead] = 0
    shared = _dropped(plan, "shared_ffn", i, layout)
    mixer.shared_experts.up_proj.weight[shared] = 0
    mixer.shared_experts.down_proj.weight[:, shared] = 0


_OUTPUT_PROJECTIONS = {anatomy.MAMBA: "out_proj", anatomy.ATTENTION: "o_proj", anatomy.MLP: "down_proj"}
_DEAD_UNIT_PLANTERS = {
    anatomy.MAMBA: _plant_mamba,
    anatomy.ATTENTION: _plant_attention,
    anatomy.MLP: _plant_mlp,
    anatomy.MOE: _plant_moe,
}
