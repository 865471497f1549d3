"""Nemotron-H's layer kinds: one character per layer in a layout's pattern.

`M` Mamba-2 mixer, `*` attention, `-` MLP, `E` mixture of experts. They sit apart from `anatomy` (the prunable
axes and where their units live) because `arch.Layout` counts layers by kind and `anatomy` reads `Layout`s.
"""

MAMBA, ATTENTION, MLP, MOE = "M", "*", "-", "E"
KIND_NAMES = {MAMBA: "mamba", ATTENTION: "attention", MLP: "mlp", MOE: "moe"}
# The dense kinds, in the order reports list them (MoE layers come after, where a source has them).
KINDS = (MAMBA, MLP, ATTENTION)
