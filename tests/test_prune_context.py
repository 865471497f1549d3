"""`minipuzzle prune` opens its context once: the source checkpoint's headers are read by the context alone, which
scoring, ranking and the cut share; the budget is parsed once; the stage's memory plan is computed
once, and the plan the command refuses or accepts is the one scoring and ranking run with."""

from minipuzzle.checkpoint.read import Checkpoint
from minipuzzle.settings import PruneSettings
from minipuzzle.testing import random_model, run_cli, save_model

SMALL = ["--seq-len", "32", "--depth-samples", "4", "--width-samples", "8", "--held-out-windows", "4", "--candidates", "2"]  # fmt: skip


def test_prune_reads_the_checkpoint_budget_and_plan_once(tmp_path, tokenizer, text_file, monkeypatch):
    import minipuzzle.memory as memory_package
    import minipuzzle.prune.context as context
    from minipuzzle.prune import ranking

    src = save_model(random_model(seed=1), tmp_path / "src", tokenizer=tokenizer)
    opened, budgets, planned, checked, ranked = [], [], [], [], []
    real_init, real_budget, real_stage, real_check = (Checkpoint.__init__, PruneSettings.budget_for,
                                                      context.prune_stage, memory_package.check)  # fmt: skip

    def init(self, path):
        opened.append(str(path))
        real_init(self, path)

    def stage(*a, **kw):
        planned.append(real_stage(*a, **kw))
        return planned[-1]

    def check(hw, *stages):
        checked.extend(stages)
        return real_check(hw, *stages)

    def rank(ctx, plans, held):
        ranked.append(ctx.parts["ranking"])
        return real_rank(ctx, plans, held)

    real_rank = ranking.rank
    monkeypatch.setattr(Checkpoint, "__init__", init)
    monkeypatch.setattr(PruneSettings, "budget_for", lambda self, s: budgets.append(1) or real_budget(self, s))
    monkeypatch.setattr(context, "prune_stage", stage)
    monkeypatch.setattr(memory_package, "check", check)
    monkeypatch.setattr("minipuzzle.prune.stage.rank", rank)
    code, _, err = run_cli(["prune", str(src), "--target", "0.8", "--data", str(text_file), "-o", str(tmp_path / "out"),
                            *SMALL])  # fmt: skip
    assert code == 0, err
    # By hand: the context opens the source (1); scoring, the cut, the ranking and the report use the context's.
    # Every other Checkpoint is the output's, read back by nobody here.
    assert opened.count(str(src)) == 1, opened
    assert len(budgets) == 1 and len(planned) == 1
    assert checked == planned and ranked == [planned[0].parts[[p.name for p in planned[0].parts].index("ranking")]]
