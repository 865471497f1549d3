"""minipuzzle: prune, distil and evaluate Nemotron-H hybrid Mamba-Transformer models.

Data flow, one subpackage or module per stage:
checkpoint (checkpoint/) -> scores (score/) -> plan (search/) -> checkpoint (cut.py)
-> distilled checkpoint (distill/) -> report (evaluate/) -> run page (report/).
"""

__version__ = "0.1.0"
