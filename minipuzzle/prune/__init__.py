"""The prune stage: score -> search -> rank candidates on held-out tokens (distilling each briefly when asked) ->
cut the winner.

    context.py     what the stage works on, opened once: the checkpoint, the budget and its search space, the
                   hardware and the stage's memory plan (`open_context`)
    stage.py       the composition (`prune`, `run`)
    windows.py     the held-out and calibration windows
    scoring.py     scores from a folder, or measured here as the memory plan says
    ranking.py     each candidate measured against the parent on the held-out windows
    candidates.py  the short distillation of each candidate before the choice
    report.py      prune_report.json, its plots and the cut of the winner

The search itself (space, budget, damage model, solver, which units stay) is `minipuzzle.search`'s. This package
imports nothing here, so that `minipuzzle prune --help` loads no torch.
"""
