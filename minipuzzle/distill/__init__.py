"""Knowledge distillation of a pruned Nemotron-H student from its teacher's logits (one process or torchrun/FSDP2).

Example::

    from minipuzzle.distill.loop import distill
    from minipuzzle.settings import DistillSettings
    out = distill(DistillSettings(teacher="56b-dir", student="47b-dir", data="corpus.jsonl", output="47b-distilled",
                                  tokens="63B", seq_len=8192, batch_size=768))

Import from the module that does the job (`loop`, `launch`, `losses`, `parallel`, `state`, ...): this package
imports none of them, so the memory plan can import `losses`' constants without the loop.
"""
