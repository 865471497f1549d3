"""The Nemotron-H architecture as numbers: layer kinds, widths, and what they cost.

A `Layout` is everything that decides the shapes of a Nemotron-H model, the mixture-of-experts models of
Nemotron 3 included. It is read from either config style (native transformers `nemotron_h` with its
`layers_block_type` list, or NVIDIA's remote-code config with the `hybrid_override_pattern` string and `mamba_*`
names) and written back as a native config. From it come the exact parameter count (and, for MoE models, the
active count: what one token runs through), a memory model (weights, KV cache, Mamba SSM and conv state, an
activation estimate) and FLOPs per token.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from huggingface_hub.errors import StrictDataclassError

from minipuzzle.checkpoint.dtypes import PRECISION_BITS, dtype_bytes
from minipuzzle.errors import UserError
from minipuzzle.kinds import ATTENTION, KIND_NAMES, KINDS, MAMBA, MLP, MOE

# Imports inside functions here keep torch and transformers unloaded until a function needs them, so `--help`
# and the offline commands (dry runs, info, search) start fast.

# Every layer kind a layout may hold: the dense kinds, then mixture-of-experts.
LAYER_KINDS = (*KINDS, MOE)

# transformers' `layers_block_type` names for each pattern character.
BLOCK_TYPES = {MAMBA: "linear_attention", ATTENTION: "full_attention", MLP: "mlp", MOE: "moe"}
PATTERN_CHARS = {v: k for k, v in BLOCK_TYPES.items()}
# Older native configs and some remote-code ones spell layer types this way.
PATTERN_CHARS.update({"mamba": MAMBA, "attention": ATTENTION})


@dataclass(frozen=True)
class Layout:
    """Layer kinds and widths of a Nemotron-H model.

    `pattern` has one character per layer: `M` Mamba-2, `*` attention, `-` MLP, `E` mixture of experts. Widths
    are uniform across the layers of a kind, which is what lets a pruned model stay a plain Nemotron-H config.

    The MoE fields carry transformers' `NemotronHConfig` names and defaults, so a dense layout holds them unused
    (reports leave them out). Per MoE layer: a router of `n_routed_experts` rows over the hidden size, that many
    ungated relu^2 experts of width `moe_intermediate_size` (no biases) of which a token runs
    `num_experts_per_tok`, chosen within the best `topk_group` of `n_group` equal expert groups, and one shared
    expert of width `moe_shared_expert_intermediate_size` that every token runs. With `moe_latent_size` set
    (Super), the routed experts work in that smaller space between two projections from and to the hidden size.
    The router's scaling and renormalisation (`routed_scaling_factor`, `norm_topk_prob`) shape no weight and stay
    with the config.
    """

    pattern: str
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    mamba_num_heads: int
    mamba_head_dim: int
    n_groups: int
    ssm_state_size: int
    conv_kernel: int = 4
    vocab_size: int = 131072
    tie_word_embeddings: bool = False
    use_conv_bias: bool = True
    use_bias: bool = False
    mlp_bias: bool = False
    mamba_ssm_cache_dtype: str = "float32"
    n_routed_experts: int = 8
    num_experts_per_tok: int = 2
    moe_intermediate_size: int = 7688
    moe_shared_expert_intermediate_size: int = 7688
    moe_latent_size: int | None = None
    n_group: int = 1
    topk_group: int = 1

    def __post_init__(self) -> None:
        if set(self.pattern) - set(LAYER_KINDS) or not self.pattern:
            raise UserError(
                f"invalid layer pattern {self.pattern!r}: use M (Mamba), * (attention), - (MLP), E (mixture of experts)"
            )
        if self.mamba_num_heads % self.n_groups:
            raise UserError(f"mamba_num_heads {self.mamba_num_heads} is not a multiple of n_groups {self.n_groups}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise UserError(
                f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads {self.num_key_value_heads}"
            )
        if self.is_moe:
            self._check_moe()

    def _check_moe(self) -> None:
        """The router's shape rules: experts fall in `n_group` equal groups, and transformers' group score is the
        sum of each group's two best experts, so a group needs two; the top-k come from `topk_group` groups."""
        e, k, g = self.n_routed_experts, self.num_experts_per_tok, self.n_group
        if g < 1 or e % g or e // g < 2:
            raise UserError(f"n_routed_experts {e} must split into n_group {g} groups of at least 2 experts")
        if not 1 <= self.topk_group <= g:
            raise UserError(f"topk_group {self.topk_group} must be between 1 and n_group {g}")
        if not 1 <= k <= self.topk_group * (e // g):
            raise UserError(
                f"num_experts_per_tok {k} must be between 1 and the {self.topk_group * (e // g)} experts of the "
                f"topk_group {self.topk_group} groups the router chooses from"
            )

    # ---- derived widths -------------------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return len(self.pattern)

    @property
    def mamba_intermediate(self) -> int:
        """I = mamba heads x head_dim: width of z, x and the gated norm."""
        return self.mamba_num_heads * self.mamba_head_dim

    @property
    def mamba_conv_dim(self) -> int:
        """Channels the depthwise conv runs over: [x | B | C]."""
        return self.mamba_intermediate + 2 * self.n_groups * self.ssm_state_size

    @property
    def mamba_in_proj_rows(self) -> int:
        """Rows of in_proj: [z | x | B | C | dt]."""
        return self.mamba_intermediate + self.mamba_conv_dim + self.mamba_num_heads

    @property
    def is_moe(self) -> bool:
        """True when the pattern holds mixture-of-experts layers."""
        return MOE in self.pattern

    @property
    def moe_expert_input(self) -> int:
        """The width routed experts read and write: `moe_latent_size` when set, else the hidden size."""
        return self.moe_latent_size or self.hidden_size

    def count(self, kind: str) -> int:
        return self.pattern.count(kind)

    def layer_counts(self) -> dict[str, int]:
        """Layers per kind name: the dense kinds always, `moe` when the pattern has MoE layers."""
        kinds = LAYER_KINDS if self.is_moe else KINDS
        return {KIND_NAMES[ch]: self.count(ch) for ch in kinds}

    def replace(self, **changes: Any) -> Layout:
        return dataclasses.replace(self, **changes)

    # ---- parameters -----------------------------------------------------------------------------------------
    def layer_params(self, kind: str, active: bool = False) -> int:
        """Parameters of one layer of `kind`, its pre-norm included; with `active`, only those one token runs
        through (differs from the total for MoE layers only)."""
        h = self.hidden_size
        if kind == MAMBA:
            inner = self.mamba_intermediate
            n = h * self.mamba_in_proj_rows + self.mamba_conv_dim * self.conv_kernel
            n += self.mamba_conv_dim if self.use_conv_bias else 0
            n += 3 * self.mamba_num_heads + inner + inner * h  # dt_bias, A_log, D; gated norm; out_proj
            n += (self.mamba_in_proj_rows + h) if self.use_bias else 0
        elif kind == ATTENTION:
            q = self.num_attention_heads * self.head_dim
            kv = self.num_key_value_heads * self.head_dim
            n = 2 * h * q + 2 * h * kv
        elif kind == MLP:
            n = self._mlp_params(self.intermediate_size)
        elif kind == MOE:
            n = self._moe_params(active)
        else:
            raise ValueError(f"unknown layer kind {kind!r}")
        return n + h

    def _mlp_params(self, width: int) -> int:
        """An up/down projection pair between the hidden size and `width`, with `mlp_bias` biases."""
        h = self.hidden_size
        return 2 * h * width + ((width + h) if self.mlp_bias else 0)

    def _moe_params(self, active: bool) -> int:
        """One MoE mixer: router, routed experts (all, or the `num_experts_per_tok` a token runs when `active`),
        shared expert and latent projections. The router's `e_score_correction_bias` is a buffer, not a
        parameter, as transformers counts it; the experts' 3-D weights have no biases."""
        h, w = self.hidden_size, self.moe_intermediate_size
        experts = self.num_experts_per_tok if active else self.n_routed_experts
        n = self.n_routed_experts * h + experts * 2 * self.moe_expert_input * w
        n += self._mlp_params(self.moe_shared_expert_intermediate_size)
        if self.moe_latent_size is not None:
            # fc1 (hidden -> latent) and fc2 (latent -> hidden): the shape of an MLP of that width.
            n += self._mlp_params(self.moe_latent_size)
        return n

    def embedding_params(self) -> int:
        """Input embeddings, final norm and LM head.

        The LM head is counted even when `tie_word_embeddings` is set: transformers' NemotronH declares no tied
        weights, so it always holds (and saves) a separate head, and this count must equal transformers' own.
        """
        return 2 * self.vocab_size * self.hidden_size + self.hidden_size

    def num_params(self) -> int:
        """Exact parameter count (equals `sum(p.numel() for p in NemotronHForCausalLM(config).parameters())`)."""
        return self.embedding_params() + sum(self.layer_params(ch) for ch in self.pattern)

    def num_active_params(self) -> int:
        """Parameters one token runs through: `num_params` less the routed experts it does not run, i.e. per MoE
        layer only `num_experts_per_tok` experts besides the router, the shared expert and the latent
        projections. Embeddings and LM head count whole, as NVIDIA's published active counts do. Equals
        `num_params` for a dense model."""
        return self.embedding_params() + sum(self.layer_params(ch, active=True) for ch in self.pattern)

    # ---- memory ---------------------------------------------------------------------------------------------
    def memory(
        self,
        precision: str = "bf16",
        context: int = 8192,
        batch: int = 1,
        kv_precision: str | None = None,
        ssm_dtype: str | None = None,
        prefill_chunk: int = 8192,
    ) -> dict[str, int]:
        """Inference memory in bytes.

        weights: all parameters at `precision` (fp4 = NVFP4 at 4.5 bits), every routed expert included (all are
        resident; transformers keeps routers in float32, a few MB not modelled here). kv_cache: K and V of every attention
        layer for `context` tokens x `batch`, at `kv_precision` (default: the weights'). ssm_state: the Mamba
        recurrent state (heads x head_dim x state) at the config's `mamba_ssm_cache_dtype`. conv_state: the last
        `conv_kernel` inputs of the conv in bf16. total = weights + kv_cache + ssm_state + conv_state.
        activations (not in total): the largest transient of a prefill chunk of `prefill_chunk` tokens in bf16
        (the widest projection output, for MoE layers the hidden units of a token's routed experts together, plus
        the residual stream) plus the float32 logits of the last position.
        """
        wbits = _bits(precision)
        kvbits = _bits(kv_precision or precision)
        try:
            ssm_bytes = dtype_bytes(ssm_dtype or self.mamba_ssm_cache_dtype)
        except KeyError:
            raise UserError(f"unknown SSM state dtype {ssm_dtype or self.mamba_ssm_cache_dtype!r}") from None
        n_att, n_mamba = self.count(ATTENTION), self.count(MAMBA)
        weights = _ceil_bytes(self.num_params() * wbits)
        kv = _ceil_bytes(n_att * 2 * self.num_key_value_heads * self.head_dim * context * batch * kvbits)
        ssm = n_mamba * batch * self.mamba_num_heads * self.mamba_head_dim * self.ssm_state_size * ssm_bytes
        conv = n_mamba * batch * self.mamba_conv_dim * self.conv_kernel * 2
        tokens = batch * min(context, prefill_chunk)
        widest = max(
            self.mamba_in_proj_rows if n_mamba else 0,
            self.intermediate_size if self.count(MLP) else 0,
            (self.num_attention_heads + 2 * self.num_key_value_heads) * self.head_dim if n_att else 0,
            self._moe_widest() if self.is_moe else 0,
        )
        activations = tokens * (widest + 2 * self.hidden_size) * 2 + batch * self.vocab_size * 4
        return {
            "weights": weights,
            "kv_cache": kv,
            "ssm_state": ssm,
            "conv_state": conv,
            "activations": activations,
            "total": weights + kv + ssm + conv,
        }

    def _moe_widest(self) -> int:
        """Widest per-token transient of an MoE layer: the routed experts' hidden units (a grouped kernel holds
        all `num_experts_per_tok` at once), the shared expert's, or the router's float32 scores (two bf16 each)."""
        routed = self.num_experts_per_tok * self.moe_intermediate_size
        return max(routed, self.moe_shared_expert_intermediate_size, 2 * self.n_routed_experts)

    # ---- FLOPs ----------------------------------------------------------------------------------------------
    def matmul_params(self) -> int:
        """Parameters that take part in a matrix multiply per token (everything but embeddings, norms, SSM
        scalars and the depthwise conv, which are counted separately). MoE layers count the router and only the
        `num_experts_per_tok` routed experts a token runs, besides the shared expert and latent projections."""
        h = self.hidden_size
        per = {
            MAMBA: h * self.mamba_in_proj_rows + self.mamba_intermediate * h,
            ATTENTION: 2 * h * self.num_attention_heads * self.head_dim
            + 2 * h * self.num_key_value_heads * self.head_dim,
            MLP: 2 * h * self.intermediate_size,
            MOE: self.n_routed_experts * h
            + self.num_experts_per_tok * 2 * self.moe_expert_input * self.moe_intermediate_size
            + 2 * h * (self.moe_shared_expert_intermediate_size + (self.moe_latent_size or 0)),
        }
        return sum(per[ch] for ch in self.pattern) + self.vocab_size * h

    def flops_per_token(self, context: int = 8192) -> dict[str, float]:
        """Forward FLOPs per token (multiply-add = 2 FLOPs).

        decode: one new token against a cache of `context` tokens. prefill: averaged over a `context`-token prompt
        (causal attention sees context/2 keys on average). Both include the linear layers (2 x matmul params,
        only the active experts of MoE layers, router included),
        the attention scores and weighted sum (4 x q_heads x head_dim per key), the depthwise conv
        (2 x conv_dim x kernel) and the SSM state update and read-out (~6 x heads x head_dim x state).
        """
        linear = 2.0 * self.matmul_params()
        n_att, n_mamba = self.count(ATTENTION), self.count(MAMBA)
        per_key = 4.0 * self.num_attention_heads * self.head_dim * n_att
        ssm = n_mamba * (
            2.0 * self.mamba_conv_dim * self.conv_kernel
            + 6.0 * self.mamba_num_heads * self.mamba_head_dim * self.ssm_state_size
        )
        return {
            "prefill": linear + ssm + per_key * (context + 1) / 2.0,
            "decode": linear + ssm + per_key * context,
        }

    # ---- config I/O -----------------------------------------------------------------------------------------
    @classmethod
    def from_config(cls, config: dict[str, Any] | Any) -> Layout:
        """Read a Nemotron-H config (a `NemotronHConfig`, or a dict in either style) as transformers reads it."""
        cfg = hf_config(config)
        try:
            pattern = "".join(PATTERN_CHARS[t] for t in cfg.layers_block_type)
        except KeyError as e:
            raise UserError(f"unknown Nemotron-H layer type {e.args[0]!r}") from None
        return cls(
            pattern=pattern, **{f.name: getattr(cfg, f.name) for f in dataclasses.fields(cls) if f.name != "pattern"}
        )

    def to_hf_config(self, base: dict[str, Any] | Any | None = None):
        """A transformers `NemotronHConfig`: `base` (e.g. the source's config; defaults when None) with this
        layout's shapes written over it, saved by transformers as a native config (no remote-code keys)."""
        from transformers import NemotronHConfig

        cfg = copy.deepcopy(hf_config(base)) if base is not None else NemotronHConfig()
        for f in dataclasses.fields(self):
            if f.name != "pattern":
                setattr(cfg, f.name, getattr(self, f.name))
        cfg.layers_block_type = [BLOCK_TYPES[ch] for ch in self.pattern]
        cfg.architectures = ["NemotronHForCausalLM"]
        # auto_map would point transformers at remote code; the shapes written here are the native model's.
        cfg.__dict__.pop("auto_map", None)
        return cfg

    def to_config(self, base: dict[str, Any] | Any | None = None) -> dict[str, Any]:
        """`to_hf_config(base)` as a plain dict."""
        return self.to_hf_config(base).to_dict()

    def summary(self) -> dict[str, Any]:
        """The widths as a plain dict (for JSON reports); the MoE fields only when the pattern has MoE layers."""
        out = dataclasses.asdict(self)
        return out if self.is_moe else {k: v for k, v in out.items() if k not in MOE_FIELDS}


# The Layout fields that only MoE layers use.
MOE_FIELDS = (
    "n_routed_experts",
    "num_experts_per_tok",
    "moe_intermediate_size",
    "moe_shared_expert_intermediate_size",
    "moe_latent_size",
    "n_group",
    "topk_group",
)


def _bits(precision: str) -> float:
    try:
        return PRECISION_BITS[precision.lower()]
    except KeyError:
        raise UserError(f"unknown precision {precision!r}: choose one of {', '.join(PRECISION_BITS)}") from None


def _ceil_bytes(bits: float) -> int:
    return int(-(-bits // 8))


def hf_config(config: dict[str, Any] | Any):
    """transformers' `NemotronHConfig` for `config`: the object itself, or a config dict of either style (native,
    or NVIDIA's remote-code one with `hybrid_override_pattern` and `mamba_*` keys, which NemotronHConfig maps).

    Raises `UserError` for another model type or a value transformers rejects.
    """
    from transformers import NemotronHConfig, PretrainedConfig

    if isinstance(config, NemotronHConfig):
        return config
    mt = config.model_type if isinstance(config, PretrainedConfig) else config.get("model_type")
    if isinstance(config, PretrainedConfig) or mt not in (None, "nemotron_h"):
        raise UserError(f"not a Nemotron-H config: model_type is {mt!r} (expected 'nemotron_h')")
    try:
        return NemotronHConfig.from_dict({k: v for k, v in config.items() if k != "model_type"})
    except (ValueError, TypeError, StrictDataclassError) as e:
        raise UserError(f"invalid Nemotron-H config: {_first_line(e)}") from None


def _first_line(e: Exception) -> str:
    return next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)


def load_config(path: str | Path):
    """The `NemotronHConfig` of a checkpoint folder (or of its config.json) as transformers loads it.

    The file is read by transformers (`PretrainedConfig.get_config_dict`, what `AutoConfig.from_pretrained` reads
    through), so every encoding it writes (e.g. `{"__float__": "Infinity"}`) decodes as it does; the model type is
    checked before the config is built, so a foreign config fails as one, not on its own validators.
    """
    from transformers import PretrainedConfig

    p = Path(path)
    if not (p / "config.json").is_file() and not (p.is_file() and p.name.endswith(".json")):
        raise UserError(f"no config.json at {p}")
    try:
        config, _ = PretrainedConfig.get_config_dict(str(p))
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read the config at {p}: {_first_line(e)}") from None
    return hf_config(config)


@dataclass
class LayoutReport:
    """What `minipuzzle info` prints."""

    layout: Layout
    precision: str = "bf16"
    kv_precision: str | None = None
    context: int = 8192
    batch: int = 1
    name: str = ""

    def as_dict(self) -> dict[str, Any]:
        """The report as JSON-ready data. A model with MoE layers adds `active_params`, the `moe` layer count and
        its MoE widths; a dense model's report has none of them (its active count is its count)."""
        lay = self.layout
        out = {
            "model": self.name,
            "params": lay.num_params(),
            **({"active_params": lay.num_active_params()} if lay.is_moe else {}),
            "layers": lay.layer_counts(),
            "num_layers": lay.num_layers,
            "pattern": lay.pattern,
            "precision": self.precision,
            "kv_precision": self.kv_precision or self.precision,
            "context": self.context,
            "batch": self.batch,
            "memory_bytes": lay.memory(self.precision, self.context, self.batch, self.kv_precision),
            "flops_per_token": lay.flops_per_token(self.context),
            "widths": {
                "hidden_size": lay.hidden_size,
                "intermediate_size": lay.intermediate_size,
                "attention_heads": lay.num_attention_heads,
                "kv_heads": lay.num_key_value_heads,
                "head_dim": lay.head_dim,
                "mamba_heads": lay.mamba_num_heads,
                "mamba_head_dim": lay.mamba_head_dim,
                "n_groups": lay.n_groups,
                "ssm_state_size": lay.ssm_state_size,
                "vocab_size": lay.vocab_size,
            },
        }
        if lay.is_moe:
            out["widths"].update(moe_widths(lay))
        return out


def moe_widths(layout: Layout) -> dict[str, int]:
    """The MoE widths under report names (the prunable ones as their search axes name them)."""
    out = {
        "experts": layout.n_routed_experts,
        "experts_per_token": layout.num_experts_per_tok,
        "expert_ffn": layout.moe_intermediate_size,
        "shared_ffn": layout.moe_shared_expert_intermediate_size,
        "expert_groups": layout.n_group,
        "topk_groups": layout.topk_group,
    }
    if layout.moe_latent_size is not None:
        out["moe_latent_size"] = layout.moe_latent_size
    return out
