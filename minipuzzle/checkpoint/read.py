"""Reading a Nemotron-H checkpoint folder one tensor at a time, and the names its weights go by.

Reading never builds the model: a 56B checkpoint is a set of safetensors shards, and every stage that streams
(scoring, the cut) asks for one tensor or one layer at a time. Both weight-name styles are accepted (NVIDIA's
remote-code `backbone.*` and transformers' native `model.*`); everything is returned under native names.

Routed experts of mixture-of-experts layers live in memory as two 3-D tensors per layer (`mixer.experts.up_proj`
[E, width, in], `mixer.experts.down_proj` [E, in, width]) but on disk, as transformers' `save_pretrained` and the
hub checkpoints store them, as one 2-D tensor per expert (`mixer.experts.{j}.up_proj.weight`); transformers merges
them on load. `Checkpoint` reads either form and answers to both names.
"""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path

import torch
from safetensors import safe_open

from minipuzzle.arch import Layout, load_config
from minipuzzle.checkpoint.dtypes import code_dtype
from minipuzzle.errors import UserError

INDEX_NAME = "model.safetensors.index.json"


def native_name(name: str) -> str:
    """Map a remote-code weight name (`backbone.*`) to the native transformers name (`model.*`). The embedding
    may be stored as `backbone.embedding.weight`: some transformers releases (5.15 among them) save it so, their
    conversion mapping renaming `embedding.weight` to `embeddings.weight` on load and back on save."""
    if name.startswith("backbone."):
        name = "model." + name[len("backbone.") :]
    return "model.embeddings.weight" if name == "model.embedding.weight" else name


# A merged (in-memory) routed-experts tensor, and one expert's tensor as stored on disk.
_MERGED_EXPERTS_RE = re.compile(r"^(.+\.mixer\.experts)\.(up_proj|down_proj)$")
_PER_EXPERT_RE = re.compile(r"^(.+\.mixer\.experts)\.(\d+)\.(up_proj|down_proj)\.weight$")


def expert_part(name: str) -> tuple[str, int] | None:
    """(merged name, expert index) of a per-expert name (`...experts.3.up_proj.weight` -> (`...experts.up_proj`,
    3)); None for any other name."""
    m = _PER_EXPERT_RE.match(name)
    return (f"{m.group(1)}.{m.group(3)}", int(m.group(2))) if m else None


def is_merged_experts(name: str) -> bool:
    """True for a routed-experts tensor in its in-memory 3-D form (`...mixer.experts.up_proj`)."""
    return _MERGED_EXPERTS_RE.match(name) is not None


def split_experts(name: str, t: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """A merged routed-experts tensor [E, ...] as E per-expert (name, tensor) pairs, the on-disk form; any other
    tensor as itself."""
    m = _MERGED_EXPERTS_RE.match(name)
    if m is None or t.ndim != 3:
        return [(name, t)]
    # Copies, not views: safetensors refuses to write tensors that share memory.
    return [(f"{m.group(1)}.{j}.{m.group(2)}.weight", t[j].clone()) for j in range(t.shape[0])]


def layer_prefix(i: int) -> str:
    return f"model.layers.{i}."


class Checkpoint:
    """A safetensors checkpoint folder (single file or sharded with an index), read lazily.

    `keys()` are native names as stored (routed experts one tensor per expert, when stored so); `get(name)` reads
    one tensor from its shard, and also answers to a merged routed-experts name (`...mixer.experts.up_proj`) by
    stacking the experts' tensors. `state_dict()` and `layer_state(i)` use the model's own names (merged experts).
    `config` is config.json as transformers reads it (a `NemotronHConfig`) and `layout` the architecture in it.
    Raises `UserError` for a missing folder, a corrupt shard or a config that is not Nemotron-H.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.exists():
            raise UserError(f"checkpoint not found: {self.path}")
        if not self.path.is_dir():
            raise UserError(f"checkpoint must be a folder with config.json and *.safetensors: {self.path}")
        self.config = load_config(self.path)  # transformers' NemotronHConfig
        self.layout = Layout.from_config(self.config)
        self._files: dict[str, Path] = {}  # native name -> shard
        self._stored: dict[str, str] = {}  # native name -> name as stored in the shard
        self._dtypes: dict[str, str] = {}  # native name -> safetensors dtype code ("BF16")
        index = self.path / INDEX_NAME
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError):
                raise UserError(f"{index} is not a valid safetensors index") from None
            shards = {f: self.path / f for f in set(weight_map.values())}
            headers = {}
            for f, p in shards.items():
                if not p.is_file():
                    raise UserError(f"shard {f} named in {index.name} is missing from {self.path}")
                headers[f] = read_header(p)  # validates every shard up front: fail before any work is done
            for stored, f in weight_map.items():
                self._add(stored, shards[f], headers[f].get(stored, ""))
        else:
            files = sorted(self.path.glob("*.safetensors"))
            if not files:
                raise UserError(f"no *.safetensors weights in {self.path}")
            for f in files:
                for stored, code in read_header(f).items():  # also validates the header: fail before any work
                    self._add(stored, f, code)
        self._experts = self._expert_groups()

    def _add(self, stored: str, file: Path, dtype_code: str = "") -> None:
        name = native_name(stored)
        self._files[name] = file
        self._stored[name] = stored
        self._dtypes[name] = dtype_code

    def _expert_groups(self) -> dict[str, list[str]]:
        """Merged routed-experts name -> its per-expert stored names in expert order (for experts stored apart)."""
        parts: dict[str, dict[int, str]] = {}
        for name in self._files:
            got = expert_part(name)
            if got is not None:
                parts.setdefault(got[0], {})[got[1]] = name
        groups = {}
        for merged, by_index in parts.items():
            if sorted(by_index) != list(range(len(by_index))):
                raise UserError(f"checkpoint {self.path} stores experts {sorted(by_index)} of {merged}: not 0..n-1")
            groups[merged] = [by_index[j] for j in range(len(by_index))]
        return groups

    def keys(self) -> list[str]:
        """Native names as stored."""
        return list(self._files)

    def module_keys(self) -> list[str]:
        """Native names as the model names its tensors: per-expert tensors under their merged name, once."""
        out: dict[str, None] = {}
        for name in self._files:
            got = expert_part(name)
            out[got[0] if got else name] = None
        return list(out)

    def __contains__(self, name: str) -> bool:
        return name in self._files or name in self._experts

    def _open(self, file: Path):
        """A fresh safetensors handle on `file`. Not cached: a handle maps its whole shard, and every page a tensor
        read from it touched stays in the process's resident memory until the handle is gone. Opened per read, the
        mapping lives exactly as long as the tensors taken from it (a few microseconds per open)."""
        try:
            return safe_open(str(file), framework="pt")
        except Exception as e:  # safetensors raises its own error types for corrupt files
            raise UserError(f"cannot read {file}: {e}") from None

    def get(self, name: str) -> torch.Tensor:
        """One tensor by native name, read from its shard (only that tensor is loaded)."""
        if name not in self._files and name in self._experts:
            return torch.stack([self.get(part) for part in self._experts[name]])
        if name not in self._files:
            raise KeyError(name)
        try:
            with self._open(self._files[name]) as h:
                return h.get_tensor(self._stored[name])
        except UserError:
            raise
        except Exception as e:
            raise UserError(f"cannot read tensor {name} from {self._files[name]}: {e}") from None

    def source_of(self, name: str) -> str | None:
        """The stored tensor behind the model weight `name`: itself, or, for the LM head of a tied checkpoint that
        omits it (transformers' NemotronH keeps a separate head), the embeddings; None when there is none."""
        if name in self:
            return name
        if name == "lm_head.weight" and self.layout.tie_word_embeddings and "model.embeddings.weight" in self:
            return "model.embeddings.weight"
        return None

    def shape(self, name: str) -> tuple[int, ...]:
        if name not in self._files and name in self._experts:
            return (len(self._experts[name]), *self.shape(self._experts[name][0]))
        with self._open(self._files[name]) as h:
            return tuple(h.get_slice(self._stored[name]).get_shape())

    def layer_keys(self, i: int) -> list[str]:
        """Layer i's tensors under the model's names (merged routed experts)."""
        pre = layer_prefix(i)
        return [k for k in self.module_keys() if k.startswith(pre)]

    def layer_state(self, i: int) -> dict[str, torch.Tensor]:
        """All tensors of layer i, with names relative to the layer (`norm.weight`, `mixer.in_proj.weight`,
        `mixer.experts.up_proj` [E, width, in] with the experts merged)."""
        pre = layer_prefix(i)
        return {k[len(pre) :]: self.get(k) for k in self.layer_keys(i)}

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Every tensor under the model's names (merged routed experts), as `model.state_dict()` has them."""
        return {k: self.get(k) for k in self.module_keys()}

    def stored_dtype(self, name: str) -> torch.dtype:
        """The dtype tensor `name` is stored in (from the shard's header: nothing is read); a merged routed-experts
        name answers for its experts."""
        if name not in self._files and name in self._experts:
            return self.stored_dtype(self._experts[name][0])
        # A code not in the table is asked of safetensors by reading the tensor.
        return code_dtype(self._dtypes[name]) or self.get(name).dtype

    def dtype(self) -> torch.dtype:
        return self.get("model.norm_f.weight").dtype if "model.norm_f.weight" in self else torch.float32

    def nbytes(self) -> int:
        return sum(f.stat().st_size for f in set(self._files.values()))


def read_header(file: Path) -> dict[str, str]:
    """Tensor name -> safetensors dtype code ("BF16") of a safetensors file, checking that the header parses and
    fits in the file."""
    try:
        size = file.stat().st_size
        with open(file, "rb") as fh:
            raw = fh.read(8)
            if len(raw) < 8:
                raise ValueError("file too short")
            (n,) = struct.unpack("<Q", raw)
            if n > size - 8:
                raise ValueError("header longer than the file")
            header = json.loads(fh.read(n))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        if 8 + n + end > size:
            raise ValueError("file is truncated")
    except (OSError, ValueError, KeyError, TypeError, struct.error) as e:
        raise UserError(f"corrupt safetensors file {file}: {e}") from None
    return {k: v["dtype"] for k, v in header.items() if k != "__metadata__"}
