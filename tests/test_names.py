"""One name per concept: a recipe with a key an older recipe used is refused in one line naming today's key (exit 2,
nothing written), and every command-line default is the default of the settings field it is generated from."""

from __future__ import annotations

import pytest
import typer.core
import yaml

from minipuzzle.cli import LAZY_COMMANDS, commands_of
from minipuzzle.errors import UserError
from minipuzzle.recipe import RECIPES_DIR, parse_recipe
from minipuzzle.settings import DistillSettings, EvalSettings, PruneSettings, QuantizeSettings, ScoreSettings
from minipuzzle.testing import run_cli


def _demo() -> dict:
    return yaml.safe_load((RECIPES_DIR / "demo.yaml").read_text())


def _rename(doc: dict, section: str | None, old: str, new: str) -> dict:
    """`doc` with the key `new` (of `section`, or a section itself) spelled `old` again, its value kept."""
    held = doc if section is None else doc[section]
    held[old] = held.pop(new)
    return doc


@pytest.mark.parametrize(
    "section, old, new, line",
    [
        (None, "importance", "score", "importance: renamed to score"),
        (None, "search", "prune", "search: renamed to prune"),
        ("prune", "held_out_samples", "held_out_windows", "prune.held_out_samples: renamed to prune.held_out_windows"),
        ("distill", "eval_windows", "held_out_windows", "distill.eval_windows: renamed to distill.held_out_windows"),
        ("eval", "samples", "held_out_windows", "eval.samples: renamed to eval.held_out_windows"),
    ],
)
def test_an_old_recipe_key_names_the_new_one(section, old, new, line):
    doc = _demo()
    if section == "distill":
        doc["distill"]["held_out_windows"] = 4  # the demo leaves it at its default
    parse_recipe(doc)  # today's spelling reads
    with pytest.raises(UserError) as e:
        parse_recipe(_rename(doc, section, old, new), "demo.yaml")
    assert str(e.value) == f"demo.yaml: {line}"


def test_the_cli_refuses_an_old_recipe_writing_nothing(tmp_path):
    recipe = tmp_path / "old.yaml"
    recipe.write_text(yaml.safe_dump(_rename(_demo(), None, "search", "prune")))
    out = tmp_path / "run"
    code, stdout, stderr = run_cli(["run", str(recipe), "-o", str(out)])
    assert code == 2
    assert stderr.strip().splitlines() == [f"error: {recipe}: search: renamed to prune"]
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["old.yaml"]


# Options generated from each settings model, by command: the command's option values must read back as the
# model's own defaults. Left out: options with no default (required) and prune's two scoring counts, whose "not
# given" lets --samples set both (an unset count is the model's default, checked below through the command).
MODELS = {
    "score": ScoreSettings,
    "search": PruneSettings,
    "prune": PruneSettings,
    "distill": DistillSettings,
    "quantize": QuantizeSettings,
    "eval": EvalSettings,
}
NOT_GIVEN = {("prune", "depth_samples"), ("prune", "width_samples")}


@pytest.mark.parametrize("command", sorted(MODELS))
def test_cli_defaults_are_the_settings_defaults(command):
    model = MODELS[command]
    cmd = commands_of(LAZY_COMMANDS[command][0])[command]
    params = {p.name: p for p in cmd.params if isinstance(p, typer.core.TyperOption)}
    compared = 0
    for name, field in model.model_fields.items():
        p = params.get(name)
        if p is None or p.required or (command, name) in NOT_GIVEN:
            continue
        cli = p.default() if callable(p.default) else p.default
        expected = field.get_default(call_default_factory=True)
        if cli is None:  # only an unset field (None, or an empty mapping or list) may be None on the command line
            assert expected in (None, {}, [], ()), f"{command} {p.opts[0]}: None on the command line, {expected!r}"
        else:  # a text-typed option ('depth,ffn', '8192') holds its default as text, which the model reads back
            read = getattr(model.model_validate(_required(model) | {name: cli}), name)
            assert read == expected, f"{command} {p.opts[0]}: {cli!r} on the command line, {expected!r} in the model"
        compared += 1
    assert compared >= 5, f"{command}: only {compared} options compared"


def _required(model) -> dict:
    """The least a model needs to validate (a budget for prune, paths and a length for distillation)."""
    if model is PruneSettings:
        return {"target": "0.5"}
    if model is DistillSettings:
        return {"teacher": "t", "student": "s", "data": "d", "output": "o", "max_steps": 1}
    return {}


def test_prune_scoring_counts_unset_are_the_models(monkeypatch):
    """prune without --samples, --depth-samples or --width-samples scores with ScoreSettings' counts' defaults as
    PruneSettings holds them (128 and 1024, the paper's)."""
    seen = {}
    import minipuzzle.prune.command as command

    def fake_print(model, plan, budget, st, as_json):
        seen["st"] = st

    monkeypatch.setattr(command, "_print_dry_run", fake_print)
    code, _, err = run_cli(["prune", "8b", "--target", "4b", "--dry-run"])
    assert code == 0, err
    assert (seen["st"].depth_samples, seen["st"].width_samples) == (128, 1024)


def test_eval_and_search_defaults():
    """Hand-read from settings.py: eval windows of 2048 tokens, 64 of them; search lists 4 layouts."""
    ev = {p.name: p.default for p in commands_of("minipuzzle.evaluate.command")["eval"].params}
    se = {p.name: p.default for p in commands_of("minipuzzle.search.command")["search"].params}
    assert (ev["seq_len"], ev["held_out_windows"], se["candidates"]) == (2048, 64, 4)
