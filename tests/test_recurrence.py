"""transformers' NemotronH forward is causal across Mamba chunks.

transformers 5.6 to 5.14.1 reduce the inter-chunk SSM recurrence over the wrong axis in the PyTorch path (issue
#47246): a chunk's start state then depends on later chunks, so a position's logits change when text is appended.
Scoring, ranking and distillation all run that path on the CPU, so the installed transformers must be a fixed one.
"""

import torch

from minipuzzle.testing import random_model, tiny_config, tiny_layout

CHUNK = 8


def test_prefix_logits_do_not_see_later_chunks():
    layout = tiny_layout()
    model = random_model(layout, seed=3, config=tiny_config(layout, chunk_size=CHUNK))
    assert model.config.chunk_size == CHUNK
    ids = torch.randint(0, layout.vocab_size, (2, 6 * CHUNK), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        # prefixes ending mid-chunk and on a boundary, both spanning several chunks
        for n in (3 * CHUNK + 3, 4 * CHUNK):
            alone = model(ids[:, :n], use_cache=False).logits
            torch.testing.assert_close(alone, full[:, :n], rtol=1e-5, atol=1e-5)
