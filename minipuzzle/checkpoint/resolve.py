"""Resolving a MODEL argument (a checkpoint folder, a preset name or a hub id) to a local folder or a layout.

Nothing here loads torch, so `minipuzzle info 56b` answers from the preset table alone.
"""

from __future__ import annotations

from pathlib import Path

from huggingface_hub import snapshot_download

from minipuzzle.arch import Layout, load_config
from minipuzzle.errors import UserError
from minipuzzle.presets import PRESETS, get_preset, is_preset


def resolve_checkpoint(model: str, model_path: str | Path | None = None) -> Path:
    """Turn a MODEL argument (local folder, preset name, or hub id) into a local checkpoint folder.

    Presets and hub ids are looked up in the local Hugging Face cache only; nothing is downloaded.
    """
    if model_path is not None:
        return Path(model_path)
    p = Path(model)
    # A folder wins over a preset of the same name only when it is a checkpoint (a `demo/` folder of logs is not).
    if p.exists() and (not is_preset(model) or (p / "config.json").is_file()):
        return p
    if is_preset(model) and get_preset(model).local_path is not None:
        return get_preset(model).local_path
    hub_id = get_preset(model).hub_id if is_preset(model) else model
    if "/" not in hub_id:
        raise UserError(f"{model!r} is not a checkpoint folder, a hub id or a preset ({', '.join(PRESETS)})")
    if p.is_absolute() or model.startswith((".", "~")) or hub_id.count("/") != 1:
        raise UserError(f"checkpoint not found: {model}")
    try:  # huggingface_hub is loaded only for a hub id: presets and folders resolve without it

        return Path(snapshot_download(hub_id, local_files_only=True))
    except Exception:
        raise UserError(
            f"weights of {hub_id} are not in the local Hugging Face cache: run "
            f"`huggingface-cli download {hub_id}` on a machine with internet, or pass --model-path DIR"
        ) from None


def describe_model(model: str, model_path: str | None = None) -> tuple[str, Layout]:
    """(name, Layout) for a preset, a local checkpoint folder or a cached hub id, reading only its config."""
    if model_path is None and is_preset(model) and not (Path(model) / "config.json").is_file():
        p = get_preset(model)
        return p.name, p.layout
    path = resolve_checkpoint(model, model_path)
    if not path.exists():
        raise UserError(f"checkpoint not found: {path}")
    return str(model), Layout.from_config(load_config(path))
