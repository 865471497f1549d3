"""The Nemotron-H architecture as numbers: layer kinds, widths, and what they cost.

A `Layout` is everything that decides the shapes of a Nemotron-H model. It is read from either config style
(native transformers `nemotron_h`, or NVIDIA's remote-code config with `hybrid_override_pattern` and `mamba_*`
names) and written back as a native config. From it come the exact parameter count, a memory model (weights,
KV cache, Mamba SSM and conv state, an activation estimate) and FLOPs per token.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from minipuzzle.errors import UserError

MAMBA, ATTENTION, MLP, MOE = "M", "*", "-", "E"
KIND_NAMES = {MAMBA: "mamba", ATTENTION: "attention", MLP: "mlp"}
# transformers' `layers_block_type` names for each pattern character.
BLOCK_TYPES = {MAMBA: "linear_attention", ATTENTION: "full_attention", MLP: "mlp", MOE: "moe"}
PATTERN_CHARS = {v: k for k, v in BLOCK_TYPES.items()}
# Older native configs and some remote-code ones spell layer types this way.
PATTERN_CHARS.update({"mamba": MAMBA, "attention": ATTENTION})

# Bits per stored value. NVFP4 stores 4-bit values plus one 8-bit scale per 16 values: 4 + 8/16 = 4.5.
PRECISION_BITS = {"fp32": 32.0, "bf16": 16.0, "fp16": 16.0, "fp8": 8.0, "fp4": 4.5}
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "fp32": 4, "bf16": 2, "fp16": 2}

# Remote-code config keys -> native keys (transformers' NemotronHConfig reads both; we write native).
_REMOTE_KEYS = {
    "mamba_n_groups": "n_groups",
    "mamba_d_conv": "conv_kernel",
    "mamba_expand": "expand",
    "mamba_dt_min": "time_step_min",
    "mamba_dt_max": "time_step_max",
    "mamba_dt_limit": "time_step_limit",
    "mamba_dt_init_floor": "time_step_floor",
    "mamba_conv_bias": "use_conv_bias",
    "mamba_chunk_size": "chunk_size",
}
# Config keys that only remote-code loading needs; a native checkpoint must not carry them.
_REMOTE_ONLY = {"auto_map", "hybrid_override_pattern", "num_hidden_layers", "mtp_hybrid_override_pattern"}


@dataclass(frozen=True)
class Layout:
    """Layer kinds and widths of a dense Nemotron-H model.

    `pattern` has one character per layer: `M` Mamba-2, `*` attention, `-` MLP. Widths are uniform across the
    layers of a kind, which is what lets a pruned model stay a plain Nemotron-H config.
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

    def __post_init__(self) -> None:
        bad = set(self.pattern) - {MAMBA, ATTENTION, MLP}
        if MOE in bad:
            raise UserError("mixture-of-experts layers ('E') are not supported: minipuzzle prunes dense Nemotron-H")
        if bad or not self.pattern:
            raise UserError(f"invalid layer pattern {self.pattern!r}: use M (Mamba), * (attention), - (MLP)")
        if self.mamba_num_heads % self.n_groups:
            raise UserError(f"mamba_num_heads {self.mamba_num_heads} is not a multiple of n_groups {self.n_groups}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise UserError(
                f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads {self.num_key_value_heads}"
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

    def count(self, kind: str) -> int:
        return self.pattern.count(kind)

    def layer_counts(self) -> dict[str, int]:
        return {name: self.count(ch) for ch, name in KIND_NAMES.items()}

    def replace(self, **changes: Any) -> Layout:
        return dataclasses.replace(self, **changes)

    # ---- parameters -----------------------------------------------------------------------------------------
    def layer_params(self, kind: str) -> int:
        """Parameters of one layer of `kind`, its pre-norm included."""
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
            n = 2 * h * self.intermediate_size + ((self.intermediate_size + h) if self.mlp_bias else 0)
        else:
            raise ValueError(f"unknown layer kind {kind!r}")
        return n + h

    def embedding_params(self) -> int:
        """Input embeddings, final norm and LM head.

        The LM head is counted even when `tie_word_embeddings` is set: transformers' NemotronH declares no tied
        weights, so it always holds (and saves) a separate head, and this count must equal transformers' own.
        """
        return 2 * self.vocab_size * self.hidden_size + self.hidden_size

    def num_params(self) -> int:
        """Exact parameter count (equals `sum(p.numel() for p in NemotronHForCausalLM(config).parameters())`)."""
        return self.embedding_params() + sum(self.layer_params(ch) for ch in self.pattern)

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

        weights: all parameters at `precision` (fp4 = NVFP4 at 4.5 bits). kv_cache: K and V of every attention
        layer for `context` tokens x `batch`, at `kv_precision` (default: the weights'). ssm_state: the Mamba
        recurrent state (heads x head_dim x state) at the config's `mamba_ssm_cache_dtype`. conv_state: the last
        `conv_kernel` inputs of the conv in bf16. total = weights + kv_cache + ssm_state + conv_state.
        activations (not in total): the largest transient of a prefill chunk of `prefill_chunk` tokens in bf16
        (the widest projection output plus the residual stream) plus the float32 logits of the last position.
        """
        wbits = _bits(precision)
        kvbits = _bits(kv_precision or precision)
        ssm_bytes = DTYPE_BYTES.get(ssm_dtype or self.mamba_ssm_cache_dtype)
        if ssm_bytes is None:
            raise UserError(f"unknown SSM state dtype {ssm_dtype or self.mamba_ssm_cache_dtype!r}")
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

    # ---- FLOPs ----------------------------------------------------------------------------------------------
    def matmul_params(self) -> int:
        """Parameters that take part in a matrix multiply per token (everything but embeddings, norms, SSM
        scalars and the depthwise conv, which are counted separately)."""
        h = self.hidden_size
        per = {
            MAMBA: h * self.mamba_in_proj_rows + self.mamba_intermediate * h,
            ATTENTION: 2 * h * self.num_attention_heads * self.head_dim
            + 2 * h * self.num_key_value_heads * self.head_dim,
            MLP: 2 * h * self.intermediate_size,
        }
        return sum(per[ch] for ch in self.pattern) + self.vocab_size * h

    def flops_per_token(self, context: int = 8192) -> dict[str, float]:
        """Forward FLOPs per token (multiply-add = 2 FLOPs).

        decode: one new token against a cache of `context` tokens. prefill: averaged over a `context`-token prompt
        (causal attention sees context/2 keys on average). Both include the linear layers (2 x matmul params),
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
        """Read a Nemotron-H config: a native `nemotron_h` dict, a remote-code dict, or a `NemotronHConfig`."""
        cfg = _config_dict(config)
        mt = cfg.get("model_type")
        if mt not in (None, "nemotron_h", "nemotronh"):
            raise UserError(f"not a Nemotron-H config: model_type is {mt!r} (expected 'nemotron_h')")
        for old, new in _REMOTE_KEYS.items():
            if old in cfg and new not in cfg:
                cfg[new] = cfg[old]
        pattern = _pattern_of(cfg)
        if cfg.get("n_routed_experts") and MOE in pattern:
            raise UserError("mixture-of-experts Nemotron-H models are not supported: minipuzzle prunes dense models")
        required = ["hidden_size"] + (["mamba_num_heads", "mamba_head_dim"] if MAMBA in pattern else [])
        missing = [k for k in required if k not in cfg]
        if missing:
            raise UserError(f"Nemotron-H config lacks {', '.join(missing)}")
        from transformers import NemotronHConfig

        # A key the file leaves out means what transformers reads it as: its NemotronHConfig default.
        kwargs: dict[str, Any] = {"pattern": pattern}
        for f in dataclasses.fields(cls):
            if f.name != "pattern":
                value = cfg.get(f.name)
                kwargs[f.name] = getattr(NemotronHConfig, f.name, f.default) if value is None else value
        if cfg.get("head_dim") is None and cfg.get("attention_head_dim"):
            kwargs["head_dim"] = cfg["attention_head_dim"]
        if "num_key_value_heads" in cfg and cfg["num_key_value_heads"] is None:  # transformers: MHA, as many as q
            kwargs["num_key_value_heads"] = kwargs["num_attention_heads"]
        return cls(**kwargs)

    def to_config(self, base: dict[str, Any] | None = None) -> dict[str, Any]:
        """A native transformers `nemotron_h` config dict: `base` (e.g. the source's config) with this layout's
        shapes written over it and remote-code-only keys removed."""
        cfg = _config_dict(base) if base is not None else {}
        for old, new in _REMOTE_KEYS.items():
            if old in cfg:
                cfg.setdefault(new, cfg[old])
                del cfg[old]
        for key in _REMOTE_ONLY:
            cfg.pop(key, None)
        cfg.update({f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "pattern"})
        cfg["layers_block_type"] = [BLOCK_TYPES[ch] for ch in self.pattern]
        cfg["model_type"] = "nemotron_h"
        cfg["architectures"] = ["NemotronHForCausalLM"]
        if cfg.get("mtp_layers_block_type") is None:
            cfg.pop("mtp_layers_block_type", None)
        return cfg

    def to_hf_config(self, base: dict[str, Any] | None = None):
        """A transformers `NemotronHConfig` for this layout."""
        from transformers import NemotronHConfig

        cfg = self.to_config(base)
        for key in ("model_type", "architectures", "transformers_version", "_name_or_path"):
            cfg.pop(key, None)
        return NemotronHConfig(**cfg)

    def summary(self) -> dict[str, Any]:
        """The widths as a plain dict (for JSON reports)."""
        return dataclasses.asdict(self)


def _bits(precision: str) -> float:
    try:
        return PRECISION_BITS[precision.lower()]
    except KeyError:
        raise UserError(f"unknown precision {precision!r}: choose one of {', '.join(PRECISION_BITS)}") from None


def _ceil_bytes(bits: float) -> int:
    return int(-(-bits // 8))


def _config_dict(config: Any) -> dict[str, Any]:
    if isinstance(config, dict):
        return json.loads(json.dumps(config, default=str)) if config else {}
    if hasattr(config, "to_dict"):
        d = config.to_dict()
        # NemotronHConfig exposes the pattern as a property that to_dict() does not include.
        if "layers_block_type" not in d and getattr(config, "layers_block_type", None):
            d["layers_block_type"] = list(config.layers_block_type)
        return d
    raise TypeError(f"cannot read a config from {type(config).__name__}")


def _pattern_of(cfg: dict[str, Any]) -> str:
    types = cfg.get("layers_block_type") or cfg.get("layer_types")
    if types:
        try:
            return "".join(PATTERN_CHARS[t] for t in types)
        except KeyError as e:
            raise UserError(f"unknown Nemotron-H layer type {e.args[0]!r}") from None
    pattern = cfg.get("hybrid_override_pattern")
    if pattern:
        return pattern
    raise UserError("Nemotron-H config has neither layers_block_type nor hybrid_override_pattern")


def load_config(path: str | Path) -> dict[str, Any]:
    """Read `config.json` from a checkpoint folder (or the file itself)."""
    p = Path(path)
    if p.is_dir():
        p = p / "config.json"
    if not p.is_file():
        raise UserError(f"no config.json at {p.parent}")
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{p} is not valid JSON: {e.msg} at line {e.lineno}") from None


@dataclass
class LayoutReport:
    """What `minipuzzle info` prints."""

    layout: Layout
    precision: str = "bf16"
    kv_precision: str | None = None
    context: int = 8192
    batch: int = 1
    name: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        lay = self.layout
        return {
            "model": self.name,
            "params": lay.num_params(),
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
            **self.extra,
        }
