"""What a stage's memory is planned from: a model's layout and stored bytes per weight, read from its config."""

from __future__ import annotations

from minipuzzle.arch import Layout
from minipuzzle.checkpoint.read import Checkpoint
from minipuzzle.checkpoint.resolve import describe_model, resolve_checkpoint
from minipuzzle.errors import UserError


def model_facts(model: str, model_path: str | None = None) -> tuple[Layout, int]:
    """(layout, bytes per stored weight) of a preset, checkpoint folder or cached hub id, read from its config, so
    a preset needs no weights; 2 (bf16, as NVIDIA publishes) where the weights are not here."""
    _, layout = describe_model(model, model_path)
    try:
        path = resolve_checkpoint(model, model_path)
        return layout, Checkpoint(path).dtype().itemsize if (path / "config.json").is_file() else 2
    except UserError:
        return layout, 2
