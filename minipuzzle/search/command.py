"""CLI: `minipuzzle search` (scores -> layout file); `minipuzzle prune` is `minipuzzle.prune.command`'s."""

from __future__ import annotations

from typing import Annotated

import typer

from minipuzzle.checkpoint.resolve import describe_model
from minipuzzle.cli_options import settings_command
from minipuzzle.search import stage
from minipuzzle.search.plan import choose_units, layout_document, write_layout_yaml
from minipuzzle.settings import BudgetSettings, PruneSettings

# Imports inside functions load torch (scores): only when the command runs, so that `minipuzzle --help` stays fast.


# PruneSettings fields `search` takes besides the budget; the rest (scoring, ranking, distillation) are `prune`'s.
SEARCH_FIELDS = (*BudgetSettings.model_fields, "axes", "steps", "widths", "min_width", "min_layers", "candidates",
                 "band", "method", "expert_channels")  # fmt: skip
# Typed as text on the command line ('depth,ffn', 'ffn=1024', '1M'); PruneSettings reads the text.
AS_TEXT = dict(types_={"axes": str, "steps": str | None, "widths": str | None, "context": str},
               aliases={"steps": ["--step"]})  # fmt: skip


@settings_command(PruneSettings, exclude=[f for f in PruneSettings.model_fields if f not in SEARCH_FIELDS],
                  **AS_TEXT, helps={"candidates": "How many best layouts to list."})  # fmt: skip
def search_cmd(
    model: Annotated[str, typer.Argument(help="Preset, checkpoint folder or hub id (only its config is read).")],
    scores: Annotated[str, typer.Option("--scores", help="Folder written by `minipuzzle score`.")],
    output: Annotated[str, typer.Option("-o", "--output", help="Layout file to write (YAML).")],
    settings: dict | None = None,
) -> None:
    """Find the layout with the least predicted damage under a budget and write it as a layout file.

    Example: minipuzzle search 56b --scores scores/ --memory 31.7GiB --precision fp4 --context 1M -o layout.yaml
    """
    from minipuzzle.score.scores import Scores

    _, layout = describe_model(model)
    st = PruneSettings(**settings)
    budget = st.budget_for(layout)  # a bad budget is reported before the scores are read
    sc = Scores.load(scores)
    space, dmodel, cands = stage.run_search(layout, sc, st)
    plan = choose_units(cands[0], dmodel, sc, expert_channels=st.expert_channels)
    doc = layout_document(plan, layout, budget, cands[0], {"candidates": [c.to_dict() for c in cands]})
    write_layout_yaml(doc, output)
    res = doc["result"]
    print(f"{res['params']:,} parameters, {res['layers']}, widths {res['widths']} -> {output}")


def register(app: typer.Typer) -> None:
    app.command("search")(search_cmd)
