"""minipuzzle: prune, distil and evaluate Nemotron-H hybrid Mamba-Transformer models.

Data flow, one subpackage or module per stage:
checkpoint (checkpoint.py) -> scores (importance/) -> plan (search/) -> checkpoint (surgery.py)
-> distilled checkpoint (distill/) -> report (evaluate/).
"""

__version__ = "0.1.0"
