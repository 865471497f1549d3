"""Knowledge distillation of a pruned Nemotron-H student from its teacher's logits (one process or torchrun/FSDP2).

Example::

    from minipuzzle.distill import distill
    from minipuzzle.settings import DistillSettings
    out = distill(DistillSettings(teacher="56b-dir", student="47b-dir", data="corpus.jsonl", output="47b-distilled",
                                  tokens="63B", seq_len=8192, batch_size=768))
"""

from minipuzzle.distill.loop import Diverged, Preempted, distill

__all__ = ["Diverged", "Preempted", "distill"]
