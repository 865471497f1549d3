"""Run a Nemotron-H model one layer at a time, from memory or streamed from safetensors shards.

Every Nemotron-H layer is `x + mixer(norm(x))` with no cache needed for a full-sequence pass, so a model is
embeddings -> blocks -> norm_f -> lm_head and can be executed block by block. A `LayerStack` hands out one block at a
time: `ModelStack` wraps a model already in memory (its blocks may sit on several devices), `StreamedStack` builds
each block on the meta device and fills it from the checkpoint's shards when asked, so only one layer's weights
(plus embeddings, final norm and LM head) are resident at once. Both run the same code on the same tensors, so they
give the same numbers.

`iter_layerwise` runs a set of rows through a chosen subset of layers (for candidate ranking: a layout that drops
layers is just `keep=`) in row chunks sized to a memory budget; every chunk streams each layer once.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn
from transformers.masking_utils import create_causal_mask
from transformers.models.nemotron_h.modeling_nemotron_h import NemotronHBlock, NemotronHRMSNorm

from minipuzzle.arch import Layout
from minipuzzle.checkpoint.build import load_model, plain_kernel_notice
from minipuzzle.checkpoint.dtypes import weight_dtype
from minipuzzle.checkpoint.read import Checkpoint

# Hook installer: called with (layer index, block) before a block runs; returns a context manager that is exited
# after the block has run over every row of the chunk (e.g. one that removes forward hooks).
OnBlock = Callable[[int, nn.Module], contextlib.AbstractContextManager]


class LayerStack:
    """Embeddings, blocks, final norm and LM head of a Nemotron-H model, one block at a time.

    `device` is where embeddings, norm_f and lm_head run (and where streamed blocks are placed); `dtype` is the
    compute dtype of the residual stream.
    """

    config: object
    pattern: str
    device: torch.device
    dtype: torch.dtype

    @property
    def num_layers(self) -> int:
        return len(self.pattern)

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [B, T] int64 -> residual stream [B, T, h] on `device`."""
        raise NotImplementedError

    def block(self, i: int) -> contextlib.AbstractContextManager[nn.Module]:
        """Context manager yielding block i ready to run; a streamed block is freed on exit."""
        raise NotImplementedError

    def final_norm(self, h: torch.Tensor) -> torch.Tensor:
        """[B, T, h] -> norm_f output [B, T, h] (the hidden state the LM head reads)."""
        raise NotImplementedError

    def logits(self, hn: torch.Tensor) -> torch.Tensor:
        """norm_f output [B, T, h] -> logits [B, T, V] in float32."""
        raise NotImplementedError


class ModelStack(LayerStack):
    """A `NemotronHForCausalLM` already in memory (blocks may be spread over devices: states follow them)."""

    def __init__(self, model):
        self.model = model
        self.config = model.config
        self.pattern = Layout.from_config(model.config).pattern
        emb = model.model.embeddings.weight
        self.device, self.dtype = emb.device, emb.dtype

    def embed(self, ids):
        return self.model.model.embeddings(ids.to(self.device))

    @contextmanager
    def block(self, i):
        yield self.model.model.layers[i]

    def final_norm(self, h):
        norm = self.model.model.norm_f
        return norm(h.to(norm.weight.device))

    def logits(self, hn):
        head = self.model.lm_head
        return head(hn.to(head.weight.device)).float()


class StreamedStack(LayerStack):
    """A checkpoint on disk, read one layer at a time.

    Embeddings, norm_f and lm_head stay loaded; `block(i)` builds block i on the meta device, assigns its tensors
    from the shards (cast to `dtype`, moved to `device`) and drops them on exit. Shard handles are closed after each
    layer so memory-mapped pages of layers already used are released, not kept resident. Weights take the dtype a
    loaded model gives them (`checkpoint.dtypes.weight_dtype`: `dtype`, the MoE routers float32).

    `StreamedStack.open(folder)` reads a checkpoint. The constructor takes the resident parts (embeddings [V, h],
    norm_f weight [h], head [V, h], on `device` in `dtype`) for stacks that derive them, such as a pruned view.
    """

    def __init__(self, ckpt: Checkpoint, layout: Layout, embed_weight: torch.Tensor, norm_f_weight: torch.Tensor,
                 head_weight: torch.Tensor, device="cpu", dtype: torch.dtype = torch.float32,
                 attn_implementation: str = "sdpa"):  # fmt: skip
        self.ckpt, self.pattern = ckpt, layout.pattern
        self.config = layout.to_hf_config(ckpt.config)
        # A config not built through from_pretrained has no attention implementation chosen; the default is the
        # one transformers picks, so streamed and in-memory attention run the same kernel.
        if getattr(self.config, "_attn_implementation", None) is None:
            self.config._attn_implementation = attn_implementation
        # Likewise for routed experts: a NemotronH model picks grouped_mm, a block built alone would get none (and
        # transformers' eager loop, which sums in another order).
        if getattr(self.config, "_experts_implementation", None) is None:
            self.config._experts_implementation = "grouped_mm"
        self.device, self.dtype = torch.device(device), dtype
        self.embed_weight, self.head_weight = embed_weight, head_weight
        self._norm_f = _build(lambda: _rmsnorm(self.config), {"weight": norm_f_weight})

    @classmethod
    def open(cls, source: str | Path | Checkpoint, device="cpu", dtype: torch.dtype = torch.float32) -> StreamedStack:
        """The checkpoint at `source`: embeddings, norm_f and head read now, layers when used."""
        ckpt = source if isinstance(source, Checkpoint) else Checkpoint(source)

        def read(name: str) -> torch.Tensor:
            t = ckpt.get(name)
            return t.to(device=device, dtype=weight_dtype(name, t.dtype, dtype))

        emb = read("model.embeddings.weight")
        # transformers' NemotronH keeps its own head even for tied configs; fall back only when none is stored.
        head = read("lm_head.weight") if "lm_head.weight" in ckpt else emb
        return cls(ckpt, ckpt.layout, emb, read("model.norm_f.weight"), head, device, dtype)

    @property
    def norm_f_weight(self) -> torch.Tensor:
        return self._norm_f.weight

    def embed(self, ids):
        return nn.functional.embedding(ids.to(self.device), self.embed_weight)

    def layer_tensors(self, i: int) -> dict[str, torch.Tensor]:
        """Block i's tensors by names relative to the block (`norm.weight`, `mixer.in_proj.weight`), as stored."""
        return self.ckpt.layer_state(i)

    @contextmanager
    def block(self, i):

        # Cast as a loaded model is (`weight_dtype`): a bf16 block keeps its MoE router in float32, else streamed
        # scoring and ranking would route some tokens to other experts than the model that ships.
        state = {k: t.to(device=self.device, dtype=weight_dtype(k, t.dtype, self.dtype))
                 for k, t in self.layer_tensors(i).items()}  # fmt: skip
        block = _build(lambda: NemotronHBlock(self.config, layer_idx=i), state)
        try:
            yield block
        finally:
            del block, state

    def final_norm(self, h):
        return self._norm_f(h)

    def logits(self, hn):
        return nn.functional.linear(hn, self.head_weight).float()


def _rmsnorm(config):

    return NemotronHRMSNorm(config.hidden_size, eps=config.layer_norm_epsilon)


def _build(make: Callable[[], nn.Module], state: dict[str, torch.Tensor]) -> nn.Module:
    """Construct a module without allocating or initialising weights, then adopt `state`'s tensors."""
    plain_kernel_notice()
    with torch.device("meta"):
        module = make()
    missing, unexpected = module.load_state_dict(state, strict=False, assign=True)
    if missing or unexpected:
        raise KeyError(f"layer weights do not match the config: missing {missing}, unexpected {unexpected}")
    return module.eval()


def open_stack(
    source, stream: bool | None = None, device="cpu", dtype: torch.dtype = torch.float32
) -> tuple[LayerStack, bool]:
    """A `LayerStack` for a model object or a checkpoint folder; returns (stack, streamed).

    stream=None streams when the checkpoint at `dtype` would not fit in 70% of the free memory of `device`.
    """
    if isinstance(source, nn.Module):
        return ModelStack(source), False
    ckpt = source if isinstance(source, Checkpoint) else Checkpoint(source)
    if stream is None:
        need = ckpt.nbytes() * torch.empty((), dtype=dtype).element_size() / ckpt_element_size(ckpt)
        stream = need > 0.7 * free_memory(device)
    if stream:
        return StreamedStack.open(ckpt, device, dtype), True

    return ModelStack(load_model(ckpt, dtype=dtype, device=device)), False


def ckpt_element_size(ckpt: Checkpoint) -> int:
    return torch.empty((), dtype=ckpt.dtype()).element_size()


def free_memory(device) -> int:
    """Bytes free on `device`: CUDA's free memory, or the host's MemAvailable."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"))


def rows_per_chunk(
    num_rows: int, seq_len: int, hidden: int, states: int, dtype: torch.dtype, budget_bytes: int | None, device
) -> int:
    """How many rows fit when each row needs `states` residual-stream copies [T, h] within `budget_bytes`
    (default: 40% of the device's free memory)."""
    budget = budget_bytes if budget_bytes is not None else int(0.4 * free_memory(device))
    per_row = max(1, states * seq_len * hidden * torch.empty((), dtype=dtype).element_size())
    return max(1, min(num_rows, budget // per_row))


def block_forward(block: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """One Nemotron-H block on a full sequence, h [B, T, h] -> [B, T, h], causal, no cache.

    The state moves to the block's device (layers placed across GPUs); attention gets the causal mask the model's
    own attention implementation expects (None for SDPA, which is then causal by itself; a float mask for eager).
    """
    dev = block.norm.weight.device
    h = h.to(dev)
    mask = None
    if block.block_type == "full_attention":

        pos = torch.arange(h.shape[1], device=dev).unsqueeze(0)
        # The cache argument is `cache` in newer transformers and `past_key_values` in 5.14-5.17: pass it by position.
        mask = create_causal_mask(block.config, h, None, None, position_ids=pos)
    return block(h, attention_mask=mask)


def run_block(block: nn.Module, states: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Apply `block` to `states` [R, T, h] in micro-batches of `batch_size` rows, in place; returns `states`."""
    for s in range(0, states.shape[0], batch_size):
        out = block_forward(block, states[s : s + batch_size])
        states[s : s + batch_size] = out.to(states.device)
    return states


@torch.no_grad()
def iter_layerwise(
    stack: LayerStack,
    windows: torch.Tensor,
    keep: Sequence[int] | None = None,
    *,
    batch_size: int = 8,
    chunk_rows: int | None = None,
    budget_bytes: int | None = None,
    on_block: OnBlock | None = None,
    progress: Callable[[int], None] | None = None,
) -> Iterator[tuple[slice, torch.Tensor]]:
    """Run `windows` [N, T] through the layers in `keep` (default all, in order) and yield, per row chunk,
    (rows, norm_f output [R, T, h]).

    Each chunk walks the layers once (a streamed stack reads each layer once per chunk); chunks hold R rows of
    the residual stream, R chosen from `budget_bytes` unless `chunk_rows` is given. `on_block(i, block)` may
    install hooks for the duration of layer i; `progress(n)` is called after each layer of each chunk.
    """
    layers = list(range(stack.num_layers)) if keep is None else list(keep)
    n, t = windows.shape
    r = chunk_rows or rows_per_chunk(n, t, stack.hidden_size, 2, stack.dtype, budget_bytes, stack.device)
    for start in range(0, n, r):
        rows = slice(start, min(n, start + r))
        h = torch.cat([stack.embed(windows[rows][s : s + batch_size]) for s in range(0, rows.stop - start, batch_size)])
        for i in layers:
            with stack.block(i) as block, on_block(i, block) if on_block else contextlib.nullcontext():
                run_block(block, h, batch_size)
            if progress:
                progress(1)
        yield rows, torch.cat([stack.final_norm(h[s : s + batch_size]) for s in range(0, h.shape[0], batch_size)])
