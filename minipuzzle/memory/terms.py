"""Per-token and per-model terms: bytes a block keeps for the backward or holds in its forward, by layer kind and
Mamba path; the largest layer and tensor; reading a checkpoint; a layer-by-layer pass."""

from __future__ import annotations

from minipuzzle.anatomy import ATTENTION, MAMBA, MLP, MOE
from minipuzzle.arch import Layout
from minipuzzle.hardware import Hardware
from minipuzzle.kernels import MAMBA_CHUNK
from minipuzzle.memory.fitting import host_baseline, process_baseline
from minipuzzle.memory.parts import Memory


def largest_block(layout: Layout) -> int:
    """Parameters of the largest layer: the unit FSDP2 gathers at once, the layer a streamed pass holds."""
    return max(layout.layer_params(kind) for kind in set(layout.pattern))


def _scan_fallback(layout: Layout) -> int:
    """Bytes per token transformers' PyTorch chunked scan (`mamba2_chunk_scan`) keeps, all float32: the segment
    sums L, the C.B scores G and their product M ([chunk x heads] each), B and C repeated to every head and cut into
    chunks (and their einsum copies: 5 x heads x state), the chunk states (2 x heads x head_dim x state / chunk),
    x, dt.x, Y_diag, Y_off, the output and the gated norm's float32 tensors (9 x I), and per-head dt and A terms.
    Counted from the tensors autograd saves for one block (tests/test_memory_terms.py measures them)."""
    hp, n, p, i = layout.mamba_num_heads, layout.ssm_state_size, layout.mamba_head_dim, layout.mamba_intermediate
    return 4 * (3 * MAMBA_CHUNK * hp + 5 * hp * n + 2 * hp * p * n // MAMBA_CHUNK + 9 * i + 5 * hp)


def eager_saved(layout: Layout, b: int, seq_len: int) -> int:
    """Bytes per token eager attention keeps for the backward beyond what SDPA's flash / memory-efficient path
    keeps, for sequences of `seq_len`: the float32 softmax ([heads, T] per query) and the `b`-byte copy of it that
    multiplies V (none in float32), and the output before its reshape, less SDPA's float32 log-sum-exp."""
    heads, (q, _) = layout.num_attention_heads, _attention_widths(layout)
    return (4 + (b if b != 4 else 0)) * heads * seq_len + b * q - 4 * heads


def eager_forward(layout: Layout, b: int, seq_len: int) -> int:
    """Peak bytes per token eager attention's forward holds beyond SDPA's: the scores, the masked scores, the
    float32 softmax and its `b`-byte copy ([heads, T] each per query; in float32 the unmasked scores are gone and
    the copy is the softmax itself by then) and the additive [T, T] mask (`b` T per query)."""
    per_score = 4 + 3 * b if b != 4 else 8
    return per_score * layout.num_attention_heads * seq_len + b * seq_len


def saved_bytes_per_token(layout: Layout, kind: str, b: int = 2, kernels: bool = True, eager_len: int = 0) -> int:
    """Bytes per token autograd keeps for the backward of one block of `kind`, computing in `b`-byte floats.

    Every block: RMSNorm keeps its float32 input and normalised output (8 h) and the projection its input (b h).
    MLP: relu's output and its square (down_proj's input), b x 2 x ffn. MoE: `_moe_saved`. Attention (SDPA's
    flash/efficient path): q, k, v, the output (read by o_proj as is) and a float32 log-sum-exp per head. Mamba
    with the fused kernels
    (mamba_ssm's split-conv1d-scan): in_proj's output [z|xBC|dt] and the scan output (I), a float32 rstd per group;
    the conv, the gated norm and out_proj's input are recomputed. Mamba without them: in_proj's output, the conv
    output twice (padded, then activated) and the PyTorch scan's tensors (`_scan_fallback`). `eager_len`: with
    eager attention, its sequence length (`eager_saved` adds the scores it keeps).
    """
    q, kv = _attention_widths(layout)
    mixer = {
        MLP: lambda: 2 * b * layout.intermediate_size,
        MOE: lambda: _moe_saved(layout, b),
        ATTENTION: lambda: b * (2 * q + 2 * kv) + 4 * layout.num_attention_heads
        + (eager_saved(layout, b, eager_len) if eager_len else 0),
        MAMBA: lambda: b * (layout.mamba_in_proj_rows + layout.mamba_intermediate) + 4 * layout.n_groups
        if kernels else b * (layout.mamba_in_proj_rows + 2 * layout.mamba_conv_dim) + _scan_fallback(layout),
    }  # fmt: skip
    return (8 + b) * layout.hidden_size + mixer[kind]()


def forward_bytes_per_token(layout: Layout, kind: str, b: int = 2, kernels: bool = True, eager_len: int = 0) -> int:
    """Peak bytes per token alive inside one block's forward without autograd (scoring, ranking, eval, the
    teacher): the block's input and output (2 b h), RMSNorm's float32 temporaries and output ((8 + b) h), then
    MLP: up_proj's output, relu and its square (3 b ffn); MoE: `_moe_forward`; attention: q, k, v, the SDPA
    output and its reshaped copy; Mamba with kernels: in_proj's output, the conv output, the scan output
    (b (rows + conv + I)), the scan's float32 chunk states and the gated norm's float32 temporaries (three [T, I]
    at once: 12 I); without kernels, the PyTorch scan's tensors, which stay referenced until it returns.
    `eager_len`: with eager attention, its sequence length (`eager_forward` adds its scores)."""
    base = (2 * b + 8 + b) * layout.hidden_size
    if kind in (MLP, MOE, ATTENTION):
        q, kv = _attention_widths(layout)
        eager = eager_forward(layout, b, eager_len) if eager_len else 0
        return base + {MLP: lambda: 3 * b * layout.intermediate_size, MOE: lambda: _moe_forward(layout, b),
                       ATTENTION: lambda: b * (3 * q + 2 * kv) + eager}[kind]()  # fmt: skip
    i = layout.mamba_intermediate
    if kernels:
        states = 4 * layout.mamba_num_heads * layout.mamba_head_dim * layout.ssm_state_size // MAMBA_CHUNK
        return base + b * (layout.mamba_in_proj_rows + layout.mamba_conv_dim + i) + states + 12 * i
    return base + b * (layout.mamba_in_proj_rows + 2 * layout.mamba_conv_dim) + _scan_fallback(layout)


def _attention_widths(layout: Layout) -> tuple[int, int]:
    """(query width, key/value width) of an attention layer: heads x head_dim."""
    return layout.num_attention_heads * layout.head_dim, layout.num_key_value_heads * layout.head_dim


def _moe_saved(layout: Layout, b: int) -> int:
    """Bytes per token a mixture-of-experts mixer keeps for the backward beyond its RMSNorm (transformers'
    `NemotronHExperts` runs each routed expert on the tokens that chose it): per routed expert a token runs, its
    gathered input and weighted output (2 x expert input width) and relu's output and its square (2 x width); the
    shared expert's two (2 x its width); the router's float32 scores and mask (5 E), its float32 copy of the
    input when computing in bf16, and its int64 choices; with a latent space, fc2's input."""
    d, k, e = layout.moe_expert_input, layout.num_experts_per_tok, layout.n_routed_experts
    routed = k * (2 * d + 2 * layout.moe_intermediate_size) + 2 * layout.moe_shared_expert_intermediate_size
    latent = d if layout.moe_latent_size is not None else 0
    router = 5 * e + 40 * k + (4 * layout.hidden_size if b != 4 else 0)
    return b * (routed + latent) + router


def _moe_forward(layout: Layout, b: int) -> int:
    """Peak bytes per token of a mixture-of-experts mixer's forward without autograd beyond its RMSNorm: the
    router's float32 input copy, scores (3 E) and int64 one-hot choices (k x (E + 1)), the float32 sum of the
    experts' outputs (one expert input width), and the larger of one expert's pass (at most every token: its
    input, relu's output, its square and its output) and the shared expert's (3 x its width)."""
    d, k, e, w = (
        layout.moe_expert_input,
        layout.num_experts_per_tok,
        layout.n_routed_experts,
        layout.moe_intermediate_size,
    )
    router = 4 * layout.hidden_size + 12 * e + 8 * k * (e + 1)
    return router + 4 * d + b * max(2 * d + 2 * w, 3 * layout.moe_shared_expert_intermediate_size)


def _max_kind(layout: Layout, per_token, b: int, kernels: bool, eager_len: int = 0) -> int:
    return max(per_token(layout, kind, b, kernels, eager_len) for kind in set(layout.pattern))


def largest_tensor(layout: Layout) -> int:
    """Elements of the largest single tensor a checkpoint of `layout` stores: the embeddings or LM head [V, h], or
    a layer's largest matrix (Mamba in_proj, an MLP or attention projection, one expert, the shared expert)."""
    h, kinds = layout.hidden_size, set(layout.pattern)
    sizes = [layout.vocab_size * h]
    if "M" in kinds:
        sizes.append(h * layout.mamba_in_proj_rows)
    if "-" in kinds:
        sizes.append(h * layout.intermediate_size)
    if "*" in kinds:
        sizes.append(
            h * max(layout.num_attention_heads * layout.head_dim, layout.num_key_value_heads * layout.head_dim)
        )
    if "E" in kinds:
        sizes.append(h * max(layout.moe_intermediate_size, layout.moe_shared_expert_intermediate_size))
    return max(sizes)


def _read_host(layout: Layout, stored: int, streamed: bool, *, compute: int | None = None,
               hw: Hardware | None = None) -> int:  # fmt: skip
    """Host bytes of reading a checkpoint: a streamed pass reads one layer whole from the shards (and the
    embeddings when it opens); a load reads one tensor at a time, the largest being the embeddings [V, h]. Nothing
    when the weights are used as read (`compute` bytes equal to `stored` on a CPU `hw`): a tensor read from a shard
    is a view of its mapping and becomes the weight itself, with no copy beside it."""
    if hw is not None and hw.device == "cpu" and compute == stored:
        return 0
    emb = layout.vocab_size * layout.hidden_size
    return stored * (max(largest_block(layout), emb) if streamed else emb)


def _layerwise(layout: Layout, hw: Hardware, *, b: int, streamed: bool, rows: int, micro: int, seq_len: int,
               states: int, hooks: dict[str, int] | None = None, after: int = 0, logits: int = 0, host: int = 0,
               copies: int = 1) -> Memory:  # fmt: skip
    """A pass that runs windows through the layers one layer at a time (`score.layerwise.iter_layerwise`,
    depth scores): `rows` windows of residual stream in `states` copies of [T, h] each, plus the largest of one
    block's forward over `micro` rows (with `hooks[kind]` bytes per token of the hooks it runs) and `after`, the
    bytes per token of what the pass computes once the walk is done. Streamed, the weights are the resident
    embeddings, final norm and head (`copies` of them: a pruned candidate cuts its own) and one block; otherwise
    the whole model (`copies` times: ranking in memory builds each candidate next to its parent)."""
    h, kernels, hooks = layout.hidden_size, hw.fused_mamba, hooks or {}
    if streamed:
        weights = (copies * layout.embedding_params() + largest_block(layout)) * b
    else:
        weights = copies * layout.num_params() * b
    block = max(forward_bytes_per_token(layout, kind, b, kernels) + hooks.get(kind, 0) for kind in set(layout.pattern))
    act = rows * states * seq_len * h * b + micro * seq_len * max(block, after)
    return Memory(
        weights=weights,
        activations=act,
        logits=logits,
        host_buffers=host,
        baseline=process_baseline(hw),
        host_baseline=host_baseline(hw),
    )


def quantized_linears(layout: Layout) -> list[tuple[int, int]]:
    """(weight elements, input features) of every linear layer the hybrid quantization config fake-quantizes
    (`quantize.configs.hybrid_config`): Mamba in_proj and out_proj, MLP up and down projections, and per MoE layer
    its routed experts (all experts of a projection at once, [E, out, in]) and shared expert. Attention, conv1d,
    routers, latent projections, embeddings and the LM head are kept unquantized."""
    h, out = layout.hidden_size, []
    for kind in layout.pattern:
        if kind == MAMBA:
            out += [(h * layout.mamba_in_proj_rows, h), (layout.mamba_intermediate * h, layout.mamba_intermediate)]
        elif kind == MLP:
            out += [(h * layout.intermediate_size, h), (layout.intermediate_size * h, layout.intermediate_size)]
        elif kind == MOE:
            e, w, x, s = (layout.n_routed_experts, layout.moe_intermediate_size, layout.moe_expert_input,
                          layout.moe_shared_expert_intermediate_size)  # fmt: skip
            out += [(e * w * x, x), (e * x * w, w), (s * h, h), (h * s, s)]
    return out


def qad_step_bytes(layout: Layout, tokens: int, compute_bytes: int, checkpointing: bool) -> int:
    """Bytes fake quantization adds to a training micro-step of `tokens` tokens (quantization-aware distillation).

    Saved for the backward: the fake-quantized copy of every quantized weight the matmul's backward reads, in
    the compute dtype (the rounded input takes the place of the input the matmul would have saved, so it costs
    nothing extra); with activation checkpointing only the recomputed block's, the largest block's. Transient,
    while one quantized linear runs: its weight's rounded float32 copy and its input's rounded copy [tokens, in]
    in the compute dtype; the largest over the quantized linears. Under bf16 autocast on one GPU the rounded
    weights take the place of autocast's cached bf16 copies, which the plan still counts (an over-count)."""
    linears = quantized_linears(layout)
    if not linears:
        return 0
    if checkpointing:
        per_block = {kind: sum(w for w, _ in quantized_linears(layout.replace(pattern=kind))) for kind in set(layout.pattern)}
        saved = max(per_block.values())
    else:
        saved = sum(w for w, _ in linears)
    transient = max(w * 4 + tokens * x * compute_bytes for w, x in linears)
    return saved * compute_bytes + transient
