"""Nemotron-H checkpoints on disk: find them, read one tensor at a time, write new ones atomically.

Reading never builds the model: a 56B checkpoint is a set of safetensors shards, and every stage that streams
(scoring, surgery) asks for one tensor or one layer at a time. Both weight-name styles are accepted (NVIDIA's
remote-code `backbone.*` and transformers' native `model.*`); everything is returned under native names and
everything written is native, so the output loads with `AutoModelForCausalLM.from_pretrained` without remote code.

Routed experts of mixture-of-experts layers live in memory as two 3-D tensors per layer (`mixer.experts.up_proj`
[E, width, in], `mixer.experts.down_proj` [E, in, width]) but on disk, as transformers' `save_pretrained` and the
hub checkpoints store them, as one 2-D tensor per expert (`mixer.experts.{j}.up_proj.weight`); transformers merges
them on load. `Checkpoint` reads either form and answers to both names; `ShardWriter` writes the per-expert form.
"""

from __future__ import annotations

import copy
import functools
import json
import logging
import os
import re
import shutil
import struct
import tempfile
import uuid
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from minipuzzle.arch import Layout, hf_config, load_config
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
INDEX_NAME = "model.safetensors.index.json"
# The largest shard a writer fills before writing it (safetensors writes a shard from memory, so one is buffered
# whole); the memory plan counts it and makes it smaller where the host is small.
SHARD_BYTES = 5 * 10**9
DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def parse_dtype(dtype: str | torch.dtype | None, device: str | torch.device = "cpu") -> torch.dtype:
    """A compute dtype by name; None or "auto" is float32 on the CPU and bfloat16 on a GPU."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    try:
        return DTYPES[dtype.lower()]
    except KeyError:
        raise UserError(f"unknown dtype {dtype!r}: choose auto or one of {', '.join(DTYPES)}") from None


def resolve_device(device: str | None = "auto", dtype: str | torch.dtype | None = "auto"):
    """(torch.device, torch.dtype) for a stage: device None / "auto" is cuda when available, else the CPU; dtype
    as `parse_dtype`. A bad name, or cuda on a machine without it, is a `UserError`."""
    dev = "cuda" if device in (None, "auto") and torch.cuda.is_available() else device
    dev = "cpu" if dev in (None, "auto") else dev
    try:
        dev_t = torch.device(dev)
    except RuntimeError:
        raise UserError(f"unknown device {dev!r} (use auto, cpu or cuda[:N])") from None
    if dev_t.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {dev}: no CUDA device on this machine")
    return dev_t, parse_dtype(dtype, dev_t)


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
                headers[f] = _read_header(p)  # validates every shard up front: fail before any work is done
            for stored, f in weight_map.items():
                self._add(stored, shards[f], headers[f].get(stored, ""))
        else:
            files = sorted(self.path.glob("*.safetensors"))
            if not files:
                raise UserError(f"no *.safetensors weights in {self.path}")
            for f in files:
                for stored, code in _read_header(f).items():  # also validates the header: fail before any work
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
        code = self._dtypes[name]
        # A code not in the table (float8, say) is asked of safetensors by reading the tensor.
        return _SAFETENSORS_DTYPES[code] if code in _SAFETENSORS_DTYPES else self.get(name).dtype

    def dtype(self) -> torch.dtype:
        return self.get("model.norm_f.weight").dtype if "model.norm_f.weight" in self else torch.float32

    def nbytes(self) -> int:
        return sum(f.stat().st_size for f in set(self._files.values()))



_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                       "U8": torch.uint8, "BOOL": torch.bool}  # fmt: skip


def _read_header(file: Path) -> dict[str, str]:
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


# ---- resolving a MODEL argument ---------------------------------------------------------------------------------


def resolve_checkpoint(model: str, model_path: str | Path | None = None) -> Path:
    """Turn a MODEL argument (local folder, preset name, or hub id) into a local checkpoint folder.

    Presets and hub ids are looked up in the local Hugging Face cache only; nothing is downloaded.
    """
    from minipuzzle.presets import get_preset, is_preset

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
        from minipuzzle.presets import PRESETS

        raise UserError(f"{model!r} is not a checkpoint folder, a hub id or a preset ({', '.join(PRESETS)})")
    if p.is_absolute() or model.startswith((".", "~")) or hub_id.count("/") != 1:
        raise UserError(f"checkpoint not found: {model}")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(hub_id, local_files_only=True))
    except Exception:
        raise UserError(
            f"weights of {hub_id} are not in the local Hugging Face cache: run "
            f"`huggingface-cli download {hub_id}` on a machine with internet, or pass --model-path DIR"
        ) from None


# ---- writing ----------------------------------------------------------------------------------------------------


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


# ---- models -----------------------------------------------------------------------------------------------------


class _KernelNotice(logging.Filter):
    """transformers warns once per Mamba kernel (four of them) that mamba_ssm / causal_conv1d are missing.

    Those are CUDA kernels: without a GPU there is nothing to install, so nothing is said. With one, the four
    warnings become one plain line.
    """

    said = False

    def filter(self, record: logging.LogRecord) -> bool:
        if "falling back to its reference PyTorch implementation" not in record.getMessage():
            return True
        if _KernelNotice.said or not torch.cuda.is_available():
            return False
        _KernelNotice.said = True
        record.msg, record.args = (
            "mamba_ssm and causal_conv1d are not installed, so Mamba layers run transformers' PyTorch code: "
            "correct, but slower on GPU (pip install 'minipuzzle[gpu]')"
        ), ()
        return True


def plain_kernel_notice() -> None:
    """Replace transformers' per-kernel fallback warnings by `_KernelNotice` (idempotent); call before building
    NemotronH modules."""
    log = logging.getLogger("transformers.integrations.hub_kernels")
    if not any(isinstance(f, _KernelNotice) for f in log.filters):
        log.addFilter(_KernelNotice())


def build_model(layout: Layout, base_config: dict[str, Any] | Any | None = None, device: str | torch.device = "meta"):
    """An uninitialised `NemotronHForCausalLM` for `layout` (on the meta device by default: no memory)."""
    from transformers import NemotronHForCausalLM

    plain_kernel_notice()
    cfg = layout.to_hf_config(base_config)
    with torch.device(device):
        return NemotronHForCausalLM(cfg)


def keeps_float32(name: str) -> bool:
    """True for a weight that transformers keeps in float32 whatever dtype the model loads in.

    NemotronH names the MoE router's weight and `e_score_correction_bias` (`_keep_in_fp32_modules_strict`):
    sigmoid scores plus a small bias choose the experts, and bf16 rounding of either changes which are chosen.
    Matched as transformers matches them, anywhere in the name, so block-relative names (`mixer.gate.weight`)
    answer like full ones.
    """
    return any(k in name for k in _float32_names())


@functools.cache
def _float32_names() -> tuple[str, ...]:
    from transformers.models.nemotron_h.modeling_nemotron_h import NemotronHPreTrainedModel

    return tuple(getattr(NemotronHPreTrainedModel, "_keep_in_fp32_modules_strict", None) or ())


def weight_dtype(name: str, stored: torch.dtype, dtype: torch.dtype | None) -> torch.dtype:
    """The dtype weight `name` (stored as `stored`) takes in a model computing in `dtype`: `dtype`, except the
    tensors transformers keeps in float32 (`keeps_float32`) and integer tensors, which stay as they are. None
    keeps every tensor as stored. The one rule for every way a model is built: loaded whole, streamed a block at a
    time, offloaded, sharded."""
    if dtype is None or not stored.is_floating_point:
        return stored
    return torch.float32 if keeps_float32(name) else dtype


def load_model(
    source: str | Path | Checkpoint,
    dtype: torch.dtype | None = torch.float32,
    device: str | torch.device = "cpu",
):
    """Load a checkpoint (either weight-name style) as a native `NemotronHForCausalLM` in eval mode.

    Built on the meta device and filled tensor by tensor (`fill_weights`), so no random initialisation is paid for.
    """
    ckpt = source if isinstance(source, Checkpoint) else Checkpoint(source)
    model = build_model(ckpt.layout, ckpt.config)
    fill_weights(model, ckpt, dtype, lambda name: device)
    return model.eval()


def fill_weights(model, ckpt: Checkpoint, dtype: torch.dtype | None, place) -> None:
    """Assign every weight of `model` (built on the meta device) from `ckpt`, each read once and put straight on
    `place(name)`: in `dtype`, except those transformers keeps in float32 (`weight_dtype`: the MoE routers).
    A tied checkpoint may omit the LM head: transformers' NemotronH keeps a separate one, filled from the
    embeddings."""
    sources = {k: ckpt.source_of(k) for k in model.state_dict()}
    missing = sorted(k for k, v in sources.items() if v is None)
    if missing:
        raise UserError(f"checkpoint {ckpt.path} lacks {len(missing)} weights, e.g. {missing[0]}")
    state = {}
    for k, src in sources.items():
        t = ckpt.get(src)
        state[k] = t.to(device=place(k), dtype=weight_dtype(k, t.dtype, dtype))
    model.load_state_dict(state, strict=True, assign=True)


def model_state_dict(model) -> dict[str, torch.Tensor]:
    """State dict of a `NemotronHForCausalLM` (native names, every tensor including the LM head)."""
    return model.state_dict()
