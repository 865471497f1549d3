"""Time the 56B depth+ffn search under MiniPuzzle's memory budget (fp4, 1M context, 31.7 GiB), synthetic scores.

Run: python benchmarks/search_56b.py
"""

import time

import torch

from minipuzzle.presets import get_preset
from minipuzzle.score.scores import Scores
from minipuzzle.search import DamageModel, SearchSpace, make_budget, search

src = get_preset("56b").layout
g = torch.Generator().manual_seed(0)
ffn = {i: torch.rand(src.intermediate_size, generator=g) for i, c in enumerate(src.pattern) if c == "-"}
scores = Scores(pattern=src.pattern, depth=torch.rand(src.num_layers, generator=g), ffn=ffn)
space = SearchSpace.build(src, "depth,ffn")
budget = make_budget(src, memory="31.7GiB", precision="fp4", context=1048576)
for method in ("enumerate", "mip"):
    t = time.perf_counter()
    best = search(space, budget, DamageModel(scores, space), k=8, method=method)[0]
    lay = space.layout(best.widths, best.counts)
    print(
        f"{method}: {time.perf_counter() - t:.2f}s  layers {lay.layer_counts()} ffn {lay.intermediate_size} "
        f"params {lay.num_params() / 1e9:.3f}B memory {lay.memory('fp4', 1048576)['total'] / 2**30:.2f} GiB"
    )
