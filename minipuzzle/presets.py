"""Named Nemotron-H models: hub id plus the config facts, so that `info`, `prune --dry-run` and the recipes work
offline on the meta device. Numbers from NVIDIA's published configs (the checkpoints' config.json).

Nemotron 3 (hybrid Mamba / MoE / attention): Nano 30B-A3B's shapes are those of its config.json (a full copy in
public test code; the widths NVIDIA's Model-Optimizer pruning tutorial prints agree, and so do the counts: 31.58B,
3.58B active). Super 120B-A12B's are those several public loaders copy from its config.json (88-layer pattern,
LatentMoE of 1024, 512 experts of 2688, top 22, shared expert 5376); NVIDIA publishes only "120B, 12B active" for
it. Its multi-token-prediction layers are not counted: transformers' NemotronH neither builds nor loads them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from minipuzzle.arch import Layout
from minipuzzle.errors import UserError

_56B = "M-M-M-M*" + "-M-M-M-M-M*" * 9 + "-M-M-M-M-M-"
_8B = "M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M-"
_47B = "M-M-M-M-M-M-M-M-M*-M-M-M-M-M-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M-M-M---MM---M-M*-M-M-M-M-M-"
_NANO12 = "M-M-M-M*-M-M-M-M*-M-M-M-M*-M-M-M-M*-M-M-M-M*-M-M-M-M*-M-M-M-M-"
_NANO9 = "M-M-M-MM-M-M-M*-M-M-M*-M-M-M-M*-M-M-M-M*-M-MM-M-M-M-M-M-"
_NANO3 = "MEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEMEM*EMEMEMEME"
_SUPER3 = "MEMEMEM*EMEMEMEM*EMEMEMEM*EMEMEMEMEM*EMEMEMEMEM*EMEMEMEMEM*EMEMEMEMEM*EMEMEMEM*EMEMEMEME"


ASSETS = Path(__file__).resolve().parent / "assets"


@dataclass(frozen=True)
class Preset:
    name: str
    hub_id: str
    layout: Layout
    description: str
    local_path: Path | None = None  # weights shipped with the package (the demo teacher)


def _lay(pattern: str, hidden: int, ffn: int, q: int, mheads: int, mdim: int, state: int, **rest) -> Layout:
    """A Layout from the widths that tell NVIDIA's models apart; they share 8 KV heads of 128 and 8 Mamba groups
    (`rest` overrides any other field)."""
    fields = {"num_key_value_heads": 8, "head_dim": 128, "n_groups": 8, **rest}
    return Layout(pattern=pattern, hidden_size=hidden, intermediate_size=ffn, num_attention_heads=q,
                  mamba_num_heads=mheads, mamba_head_dim=mdim, ssm_state_size=state, **fields)  # fmt: skip


def _moe(pattern: str, hidden: int, mheads: int, experts: int, top_k: int, width: int, shared: int, **rest) -> Layout:
    """A Nemotron 3 layout: 32 query and 2 KV heads of 128, Mamba heads of 64 with a state of 128, one expert
    group, and the MoE widths that tell the models apart (`rest` overrides any other field). No MLP layer uses
    `intermediate_size`; it is set to the expert width, as Nano's config.json has it."""
    fields = {"num_key_value_heads": 2, "n_group": 1, "topk_group": 1, **rest}
    return _lay(pattern, hidden, width, 32, mheads, 64, 128, n_routed_experts=experts, num_experts_per_tok=top_k,
                moe_intermediate_size=width, moe_shared_expert_intermediate_size=shared, **fields)  # fmt: skip


NANO3_LAYOUT = _moe(_NANO3, 2688, 64, 128, 6, 1856, 3712)
SUPER3_LAYOUT = _moe(_SUPER3, 4096, 128, 512, 22, 2688, 5376, moe_latent_size=1024)
# Model Optimizer's Minitron tutorial pruned Nano 3 to this (22.28B, 3.00B active: hidden 2304, 104 experts, shared
# expert 3072, the rest unchanged) and distilled it; no checkpoint of it is published, so it is no preset.
NANO3_PRUNED_22B = NANO3_LAYOUT.replace(
    hidden_size=2304, n_routed_experts=104, moe_shared_expert_intermediate_size=3072
)

# The demo teacher (scripts/train_demo_teacher.py): the 56B's rhythm of Mamba/MLP pairs with an attention layer
# every ~10 layers, scaled down to 20 layers and 6M parameters; trained on the Python standard library.
DEMO_LAYOUT = _lay("M-M-M*-M-M-M*-M-M-M-", 192, 768, 6, 8, 32, 32, num_key_value_heads=2, head_dim=32, n_groups=2,
                   vocab_size=4096)  # fmt: skip

# The MoE demo teacher (scripts/train_demo_moe_teacher.py): Nemotron 3 Nano's rhythm of Mamba/MoE pairs with an
# attention layer every ~6 layers and its router (one group, sigmoid top-k with the correction bias, a shared expert
# twice an expert's width), scaled down to 16 layers; the dense demo's tokenizer and attention/Mamba widths.
DEMO_MOE_LAYOUT = _lay("MEMEM*EMEMEM*EME", 192, 64, 6, 8, 32, 32, num_key_value_heads=2, head_dim=32, n_groups=2,
                       vocab_size=4096, n_routed_experts=16, num_experts_per_tok=2, moe_intermediate_size=96,
                       moe_shared_expert_intermediate_size=192, n_group=1, topk_group=1)  # fmt: skip

# One row per preset: name, hub id, layout (for dense models: pattern, hidden, ffn, query heads, Mamba heads, Mamba
# head dim, SSM state), description, and for the demo the weights shipped with the package.
# fmt: off
PRESETS: dict[str, Preset] = {p.name: p for p in [
    Preset("8b",          "nvidia/Nemotron-H-8B-Base-8K",            _lay(_8B,     4096, 21504, 32, 128, 64, 128), "Nemotron-H 8B base"),
    Preset("56b",         "nvidia/Nemotron-H-56B-Base-8K",           _lay(_56B,    8192, 32768, 64, 256, 64, 256), "Nemotron-H 56B base"),
    Preset("47b",         "nvidia/Nemotron-H-47B-Base-8K",           _lay(_47B,    8192, 30720, 64, 256, 64, 256), "Nemotron-H 47B base (MiniPuzzle-compressed 56B)"),
    Preset("4b",          "nvidia/Nemotron-H-4B-Base-8K",            _lay(_8B,     3072, 12288, 32, 112, 64, 128), "Nemotron-H 4B base (Minitron-SSM-compressed 8B)"),
    Preset("nano-12b-v2", "nvidia/NVIDIA-Nemotron-Nano-12B-v2-Base", _lay(_NANO12, 5120, 20480, 40, 128, 80, 128), "Nemotron Nano 2 12B base"),
    Preset("nano-9b-v2",  "nvidia/NVIDIA-Nemotron-Nano-9B-v2-Base",  _lay(_NANO9,  4480, 15680, 40, 128, 80, 128), "Nemotron Nano 2 9B base (Minitron-compressed 12B)"),
    Preset("nano3-30b-a3b",    "nvidia/NVIDIA-Nemotron-3-Nano-30B-A3B-BF16",     NANO3_LAYOUT,  "Nemotron 3 Nano 30B-A3B (hybrid Mamba/MoE)"),
    Preset("super3-120b-a12b", "nvidia/NVIDIA-Nemotron-3-Super-120B-A12B-BF16", SUPER3_LAYOUT, "Nemotron 3 Super 120B-A12B (hybrid Mamba/LatentMoE)"),
    Preset("demo",        "",                                        DEMO_LAYOUT, "6M-parameter demo teacher trained on the Python standard library (ships with minipuzzle)", ASSETS / "demo-teacher"),
    Preset("demo-moe",    "",                                        DEMO_MOE_LAYOUT, "Nemotron 3-shaped MoE demo teacher trained on the Python standard library (ships with minipuzzle)", ASSETS / "demo-moe-teacher"),
]}
# fmt: on
# Short names: the family and size class alone.
ALIASES = {"nano3": "nano3-30b-a3b", "super3": "super3-120b-a12b"}


def get_preset(name: str) -> Preset:
    """Look up a preset by name, short name (`ALIASES`) or hub id, case-insensitive."""
    key = name.strip().lower()
    key = ALIASES.get(key, key)
    if key in PRESETS:
        return PRESETS[key]
    for p in PRESETS.values():
        if p.hub_id and p.hub_id.lower() == key:
            return p
    raise UserError(f"unknown preset {name!r}: choose one of {', '.join(PRESETS)}")


def is_preset(name: str) -> bool:
    key = name.strip().lower()
    return key in PRESETS or key in ALIASES or any(p.hub_id and p.hub_id.lower() == key for p in PRESETS.values())
