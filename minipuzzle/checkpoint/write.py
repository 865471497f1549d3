"""Writing checkpoints: atomic output folders, numbered safetensors shards and their index, config.json and the
tokenizer's files. Everything is written under native names, routed experts one tensor per expert, so the output
loads with `AutoModelForCausalLM.from_pretrained` without remote code."""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from minipuzzle.arch import Layout, hf_config
from minipuzzle.checkpoint.dtypes import keeps_float32
from minipuzzle.checkpoint.read import INDEX_NAME, is_merged_experts, native_name, split_experts
from minipuzzle.errors import UserError

# Files copied verbatim from the source checkpoint into every checkpoint we write.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "generation_config.json",
)

# The largest shard a writer fills before writing it (safetensors writes a shard from memory, so one is buffered
# whole); the memory plan counts it and makes it smaller where the host is small.
SHARD_BYTES = 5 * 10**9


def check_output_dir(out: str | Path, overwrite: bool = False) -> Path:
    """Refuse to write into an existing non-empty folder unless asked; never touch it before the work is done."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"output {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UserError(f"output folder {out} is not empty (pass --overwrite to replace it)")
    return out


@contextmanager
def atomic_dir(out: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder next to `out`; on success rename it to `out`, on failure remove it.

    The temporary folder sits in the same parent so the final rename is atomic on one filesystem: a reader sees
    either no `out`, the old `out`, or the complete new one, never a half-written folder.
    """
    out = check_output_dir(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the result should read like any folder
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


class ShardWriter:
    """Write tensors into numbered safetensors shards of at most `max_shard_bytes`, then the index.

    Tensors are buffered only until a shard is full, so streaming writers hold about one shard in memory. Merged
    routed-experts tensors are written one per expert (`split_experts`), as transformers and the hub store them,
    unless `split_experts` is False.
    """

    def __init__(self, folder: Path, max_shard_bytes: int = SHARD_BYTES, split_experts: bool = True):
        self.folder = Path(folder)
        self.max = max_shard_bytes
        self.split = split_experts
        self._buf: dict[str, torch.Tensor] = {}
        self._buf_bytes = 0
        self._shards: list[list[str]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if self.split and is_merged_experts(name):
            for part, t in split_experts(name, tensor):
                self._add(part, t)
        else:
            self._add(name, tensor)

    def _add(self, name: str, tensor: torch.Tensor) -> None:
        n = tensor.numel() * tensor.element_size()
        if self._buf and self._buf_bytes + n > self.max:
            self._flush()
        self._buf[name] = tensor.detach().contiguous().cpu()
        self._buf_bytes += n
        self.total_bytes += n

    def _flush(self) -> None:
        i = len(self._shards)
        save_file(self._buf, str(self.folder / f"part-{i:05d}.safetensors"), metadata={"format": "pt"})
        self._shards.append(list(self._buf))
        self._buf, self._buf_bytes = {}, 0

    def close(self) -> None:
        if self._buf or not self._shards:
            self._flush()
        n = len(self._shards)
        weight_map = {}
        for i, names in enumerate(self._shards):
            final = "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(self.folder / f"part-{i:05d}.safetensors", self.folder / final)
            weight_map.update(dict.fromkeys(names, final))
        if n > 1:
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
            (self.folder / INDEX_NAME).write_text(json.dumps(index, indent=2))


def write_config(folder: Path, config: dict[str, Any] | Any, torch_dtype: torch.dtype | None = None) -> None:
    """Write `config` (a `NemotronHConfig` or a dict of either style) as a native config.json, serialised by
    transformers itself so that `AutoConfig.from_pretrained` reads back exactly what was written."""
    cfg = copy.deepcopy(hf_config(config))
    if torch_dtype is not None:
        cfg.dtype = torch_dtype
    # Every key, not only those differing from today's defaults: other readers may default differently.
    cfg.to_json_file(Path(folder) / "config.json", use_diff=False)


def copy_tokenizer(src: str | Path | None, dst: str | Path) -> list[str]:
    """Copy tokenizer and generation-config files that exist in `src` into `dst`."""
    copied = []
    if src is None:
        return copied
    for name in TOKENIZER_FILES:
        f = Path(src) / name
        if f.is_file():
            shutil.copy2(f, Path(dst) / name)
            copied.append(name)
    return copied


def save_state_dict(
    state: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]],
    layout: Layout,
    out: str | Path,
    *,
    base_config: dict[str, Any] | Any | None = None,
    tokenizer_from: str | Path | None = None,
    max_shard_bytes: int = SHARD_BYTES,
    overwrite: bool = False,
    extra_files: dict[str, str] | None = None,
) -> Path:
    """Write `state` (native names; a dict, or (name, tensor) pairs consumed one at a time, so a caller may
    produce each tensor only when it is written) as a standard Nemotron-H checkpoint at `out`, atomically."""
    with atomic_dir(out, overwrite) as tmp:
        writer = ShardWriter(tmp, max_shard_bytes)
        dtype = None
        for name, t in state.items() if isinstance(state, Mapping) else state:
            writer.add(native_name(name), t)
            if dtype is None and t.is_floating_point() and not keeps_float32(name):  # config: the model's dtype
                dtype = t.dtype
        writer.close()
        write_config(tmp, layout.to_hf_config(base_config), dtype)
        copy_tokenizer(tokenizer_from, tmp)
        for fname, text in (extra_files or {}).items():
            (tmp / fname).write_text(text)
    return Path(out)
