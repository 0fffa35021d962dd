"""The DiffusionGemma network: one set of weights, used two ways.

`encode` runs the layers causally over new tokens (the prompt, or a committed canvas) and writes their keys
and values into the `EncoderCache`. `denoise` runs the same layers bidirectionally over a canvas, reading
the cache without changing what it holds, and returns the canvas logits.

Each layer: attention (sliding window or full; full layers use the key projection as the value, K=V),
then a dense gated MLP and a mixture of experts side by side, each with its own norms, summed.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.checkpoint import checkpoint

from .cache import DecoderView, EncoderCache, LayerCache
from .config import SLIDING, AttentionShape, ModelConfig
from .errors import DiffGemmaError

ACTIVATION_FNS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
    "silu": F.silu,
}

PREFILL_CHUNK = 512  # prompt tokens encoded at a time when no gradient is needed (`DiffusionGemma.encode`)


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """Gemma RMSNorm, computed in float32: x / rms(x), times `weight` (not 1 + weight) when it has one.

    PyTorch's own op computes in float32 for bf16 inputs as Gemma does (on the CPU its result is bit-for-bit
    the upcast formula's); on CUDA it is one fused kernel where the formula takes eight, and a layer has
    eleven norms. Under autocast (bf16 activations, float32 weights) the op has no fused form: the formula.
    """
    if weight is None or weight.dtype == x.dtype:
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    x32 = x.float()
    return (x32 * torch.pow(x32.pow(2).mean(-1, keepdim=True) + eps, -0.5) * weight.float()).type_as(x)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, with_scale: bool = True) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if with_scale else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


def rope_inv_freq(shape: AttentionShape) -> torch.Tensor:
    """Inverse frequencies for one layer type: standard RoPE, or proportional partial RoPE.

    Proportional RoPE rotates the first `partial_rotary_factor` of the angle pairs with frequencies of the
    full head size and leaves the rest unrotated (frequency 0), so cos/sin always span the whole head.
    """
    if shape.rope_type == "proportional":
        angles = int(shape.partial_rotary_factor * shape.head_dim // 2)
        exponents = torch.arange(0, 2 * angles, 2, dtype=torch.int64, device="cpu").float() / shape.head_dim
        rotated = 1.0 / (shape.rope_theta**exponents)
        unrotated = torch.zeros(shape.head_dim // 2 - angles, device="cpu")
        return torch.cat([rotated, unrotated]) / shape.rope_factor
    dim = int(shape.head_dim * shape.partial_rotary_factor)
    steps = torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float()
    return 1.0 / (shape.rope_theta ** (steps / dim))


def rope_tables(inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """cos and sin [1 or B, tokens, 1, head_dim] for positions [tokens] (shared) or [B, tokens] (per row)."""
    rows = positions if positions.ndim == 2 else positions[None]
    freqs = rows.float()[..., None] * inv_freq
    angles = torch.cat([freqs, freqs], dim=-1)[:, :, None, :]
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, shape: AttentionShape) -> None:
        super().__init__()
        self.shape = shape
        heads, kv_heads, head_dim = config.num_attention_heads, shape.num_kv_heads, shape.head_dim
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, heads * head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, kv_heads * head_dim, bias=bias)
        self.v_proj = None if shape.shares_kv else nn.Linear(config.hidden_size, kv_heads * head_dim, bias=bias)
        self.o_proj = nn.Linear(heads * head_dim, config.hidden_size, bias=bias)
        self.q_norm = RMSNorm(head_dim, config.rms_norm_eps)
        self.k_norm = RMSNorm(head_dim, config.rms_norm_eps)
        self.eps = config.rms_norm_eps

    def project(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Queries [B, H, T, D] and keys/values [B, KV, T, D], normed (no score scaling: the norms do it)."""
        batch, tokens, _ = x.shape
        head_dim = self.shape.head_dim
        q = self.q_proj(x).view(batch, tokens, -1, head_dim)
        k_raw = self.k_proj(x).view(batch, tokens, -1, head_dim)
        v_raw = k_raw if self.v_proj is None else self.v_proj(x).view(batch, tokens, -1, head_dim)
        q = apply_rope(self.q_norm(q), cos, sin).transpose(1, 2)
        k = apply_rope(self.k_norm(k_raw), cos, sin).transpose(1, 2)
        v = rms_norm(v_raw, None, self.eps).transpose(1, 2)
        return q, k, v


class DenseMLP(nn.Module):
    def __init__(self, hidden: int, intermediate: int, activation: str) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)
        self.act = ACTIVATION_FNS[activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class Router(nn.Module):
    """Picks `top_k` experts per token: softmax over experts, renormalised top-k, then a per-expert scale."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.proj = nn.Linear(config.hidden_size, config.num_experts, bias=False)
        self.scale = nn.Parameter(torch.ones(config.hidden_size))
        self.per_expert_scale = nn.Parameter(torch.ones(config.num_experts))
        self.top_k = config.top_k_experts
        self.eps = config.rms_norm_eps
        self.root_size = config.hidden_size**-0.5

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scores = self.proj(rms_norm(x, None, self.eps) * self.scale * self.root_size)
        probs = scores.softmax(dim=-1, dtype=torch.float32)
        weights, experts = torch.topk(probs, k=self.top_k, dim=-1)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights * self.per_expert_scale[experts], experts


class Experts(nn.Module):
    """All experts' weights as two stacked tensors, in the checkpoint's fused layout."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        e, h, i = config.num_experts, config.hidden_size, config.moe_intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(e, 2 * i, h))
        self.down_proj = nn.Parameter(torch.empty(e, h, i))
        self.num_experts = e
        self.group_align: int | None = None  # rows a group is padded to a multiple of; None: by device (group_layout)
        self.act = ACTIVATION_FNS[config.hidden_activation]

    def forward(self, x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x [N, H]; experts, weights [N, K] -> [N, H].

        Each token-expert pair gets a slot in a layout grouped by expert (`group_layout`, which depends on the
        device), each projection is one matmul over all the groups, and one gather brings every pair's output
        back in token order.
        """
        tokens, top_k = experts.shape
        pairs = experts.numel()
        routed = experts.reshape(-1)
        # A counting sort: a running count over one-hot rows gives each pair its rank among the pairs routed to
        # the same expert (in pair order), and the last row the group sizes; no comparison sort, no host read.
        running = torch.zeros(pairs, self.num_experts, dtype=torch.int32, device=x.device)
        running = running.scatter_(1, routed[:, None], 1).cumsum(0, dtype=torch.int32)
        rank = running.gather(1, routed[:, None]).squeeze(1).long() - 1
        pair_slot, offsets, slots = self.group_layout(x, routed, rank, running[-1])
        token_of_pair = torch.arange(pairs, device=x.device) // top_k
        source = torch.full((slots,), tokens, dtype=torch.long, device=x.device).scatter_(0, pair_slot, token_of_pair)
        if slots == pairs:  # packed: every slot holds a pair (index_select: its gradient is a plain index_add)
            rows = x.index_select(0, source)
        else:  # padding slots read an appended zero row: finite, so they add nothing to the weights' gradients
            rows = torch.cat([x, x.new_zeros(1, x.shape[1])]).index_select(0, source)
        if offsets is None:
            rows = rows.view(self.num_experts, slots // self.num_experts, -1)
        gate, up = self.project(rows, "gate_up_proj", offsets).chunk(2, dim=-1)
        projected = self.project(self.act(gate) * up, "down_proj", offsets).reshape(-1, x.shape[1])
        picked = projected.index_select(0, pair_slot).view(tokens, top_k, -1)
        # Each token's k expert outputs weighted and summed in float32 in a fixed order (deterministic, no
        # atomics), as one batched product: a broadcast multiply of bf16 outputs by float32 weights, then a sum,
        # took the CPU six times as long (the 26B shape's 256 tokens x 8 experts: 10.8 ms against 1.7).
        summed = torch.bmm(weights.float()[:, None, :], picked.float()).squeeze(1)
        return summed.to(x.dtype)

    def group_layout(
        self, x: torch.Tensor, routed: torch.Tensor, rank: torch.Tensor, group_sizes: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None, int]:
        """Where each pair's row goes, given its expert (`routed`) and its rank within that expert's group:
        (each pair's slot; the groups' cumulative ends, or None when every group has the same number of
        rows; the number of slots).

        - CUDA: each group starts on a multiple of 16 rows (its grouped GEMMs need aligned groups), in a
          layout whose size the shapes fix, so no host synchronisation and graphs can be captured.
        - CPU and other devices (eager): every group padded to the largest, one batched matmul. The CPU's
          grouped matmul runs one small product per expert, each too small to keep both cores busy (bench-90m:
          8.7 ms for a layer's gate/up projection against 6.5 ms batched). Reading the largest group's size
          costs little off CUDA. On the CPU, packed instead when the padding would more than double the rows
          (a skewed routing), and where the products go an expert at a time anyway (`batches_groups`).
        `group_align` overrides the choice: 1 packed, more than 1 aligned to that many rows.
        """
        pairs = routed.numel()
        compiling = torch.compiler.is_compiling()
        if self.group_align is None and not x.is_cuda and not compiling and self.batches_groups(x, pairs):
            capacity = int(group_sizes.max())
            # Other devices (Apple's MPS) may have no grouped matmul at all: batched whatever the padding.
            if x.device.type != "cpu" or self.num_experts * capacity <= MAX_BATCHED_PADDING * pairs:
                return routed * capacity + rank, None, self.num_experts * capacity
        align = self.row_alignment(x)
        # Groups one after another, each padded to a multiple of `align` rows: the layout fits in
        # pairs + experts * (align - 1) rows whatever the routing, a size the shapes fix.
        padded_sizes = (group_sizes + align - 1) // align * align
        ends = torch.cumsum(padded_sizes, dim=0, dtype=torch.int32)
        slot = (ends - padded_sizes)[routed].long() + rank
        return slot, ends, pairs + self.num_experts * (align - 1)

    def batches_groups(self, x: torch.Tensor, pairs: int) -> bool:
        """Whether groups off CUDA are padded to one batched matmul (float weights: yes)."""
        return True

    def row_alignment(self, x: torch.Tensor) -> int:
        """Rows each group of the grouped (not batched) layout is padded to a multiple of."""
        if self.group_align is not None:
            return self.group_align
        return GPU_GROUP_ALIGN if x.is_cuda else 1

    def project(self, rows: torch.Tensor, name: str, offsets: torch.Tensor | None) -> torch.Tensor:
        """rows sorted by expert through each expert's `name` weight (quantized experts override this)."""
        return grouped_linear(rows, getattr(self, name), offsets)


GPU_GROUP_ALIGN = 16  # rows; the fp8 grouped GEMM's requirement, which also suits the bf16 one
MAX_BATCHED_PADDING = 2  # the CPU's batched expert layout may at most double the rows


# Public in recent PyTorch; older releases (2.11 and before) have the same operator under its private name.
_grouped_mm = getattr(F, "grouped_mm", None) or torch._grouped_mm


def grouped_linear(rows: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor | None) -> torch.Tensor:
    """rows [S, in] sorted by group; weight [G, out, in]; offsets [G] cumulative group ends -> [S, out].

    With `offsets` None, rows are [G, capacity, in], every group padded to the same size: a batched matmul.
    """
    if offsets is None:
        return torch.bmm(rows.to(weight.dtype), weight.transpose(-2, -1))
    if any(size * weight.element_size() % 16 for size in weight.shape[1:]):
        # the grouped GEMM wants rows 16-byte aligned: other shapes (hidden 50 in float32, say) go group by group
        return each_group(
            rows, offsets, weight.shape[1], weight.dtype, lambda part, group: part.to(weight.dtype) @ weight[group].T
        )
    if rows.is_cuda and weight.dtype != torch.bfloat16:
        # CUDA's grouped GEMM takes bf16 operands (float32 weights, e.g. in training, run it in bf16).
        out = _grouped_mm(rows.to(torch.bfloat16), weight.to(torch.bfloat16).transpose(-2, -1), offs=offsets)
        return out.to(weight.dtype)
    return _grouped_mm(rows.to(weight.dtype), weight.transpose(-2, -1), offs=offsets)


def each_group(
    rows: torch.Tensor,
    ends: torch.Tensor,
    columns: int,
    dtype: torch.dtype,
    product: Callable[[torch.Tensor, int], torch.Tensor],
) -> torch.Tensor:
    """rows [S, K] sorted by group (`ends`: the groups' cumulative ends) -> [S, columns] in `dtype`, each
    group's rows through `product(rows, group)`, one group at a time (empty groups skipped)."""
    out = rows.new_empty(rows.shape[0], columns, dtype=dtype)
    start = 0
    for group, end in enumerate(ends.tolist()):
        if end > start:
            out[start:end] = product(rows[start:end], group)
        start = end
    return out


Attend = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class Layer(nn.Module):
    def __init__(self, config: ModelConfig, index: int) -> None:
        super().__init__()
        h, eps = config.hidden_size, config.rms_norm_eps
        self.index = index
        self.self_attn = Attention(config, config.layers[index])
        self.mlp = DenseMLP(h, config.intermediate_size, config.hidden_activation)
        self.router = Router(config)
        self.experts = Experts(config)
        self.input_layernorm = RMSNorm(h, eps)
        self.post_attention_layernorm = RMSNorm(h, eps)
        self.pre_feedforward_layernorm = RMSNorm(h, eps)
        self.post_feedforward_layernorm = RMSNorm(h, eps)
        self.post_feedforward_layernorm_1 = RMSNorm(h, eps)
        self.pre_feedforward_layernorm_2 = RMSNorm(h, eps)
        self.post_feedforward_layernorm_2 = RMSNorm(h, eps)
        self.compiled: tuple[Callable, Callable] | None = None  # compile_halves
        self.recompute = False  # DiffusionGemma.checkpoint_layers
        # The checkpoint stores a scalar per layer for each role; they are buffers, not tied weights.
        self.register_buffer("layer_scalar", torch.ones(1))
        self.register_buffer("encoder_layer_scalar", torch.ones(1))

    def forward(
        self, hidden: torch.Tensor, rope: tuple[torch.Tensor, ...], attend: Attend, encoder: bool, fused: bool = False
    ) -> torch.Tensor:
        """`fused`: the two halves around attention through their compiled forms (`compile_halves`)."""
        attention_inputs, feed_forward = (
            self.compiled if fused and self.compiled else (self.attention_inputs, self.feed_forward)
        )
        if self.recompute and torch.is_grad_enabled():
            attention_inputs, feed_forward = _recomputed(attention_inputs), _recomputed(feed_forward)
        attended = attend(self.index, *attention_inputs(hidden, *rope))  # queries, keys, values freed here
        return feed_forward(hidden, attended, self.encoder_layer_scalar if encoder else self.layer_scalar)

    def attention_inputs(self, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.self_attn.project(self.input_layernorm(hidden), cos, sin)

    def feed_forward(self, hidden: torch.Tensor, attended: torch.Tensor, scalar: torch.Tensor) -> torch.Tensor:
        """Attention's output projection, then the dense MLP and the experts side by side (attended [B, H, T, D])."""
        # The heads' merge (a copy) stays inside the expression: freed after the projection, not held to the end.
        hidden = hidden + self.post_attention_layernorm(
            self.self_attn.o_proj(attended.transpose(1, 2).reshape(*hidden.shape[:2], -1))
        )
        residual = hidden
        dense = self.post_feedforward_layernorm_1(self.mlp(self.pre_feedforward_layernorm(hidden)))
        flat = hidden.reshape(-1, hidden.shape[-1])
        weights, experts = self.router(flat)
        sparse = self.experts(self.pre_feedforward_layernorm_2(flat), experts, weights)
        sparse = self.post_feedforward_layernorm_2(sparse.reshape(hidden.shape))
        hidden = residual + self.post_feedforward_layernorm(dense + sparse)
        return hidden * scalar

    def compile_halves(self) -> None:
        """Compile both halves (torch.compile fuses their elementwise work: norms, rotary, routing) for the
        decoder's fixed canvas shape; every layer of a kind shares the compiled code."""
        self.compiled = (
            torch.compile(self.attention_inputs, dynamic=False),
            torch.compile(self.feed_forward, dynamic=False),
        )


def raise_recompile_limits() -> None:
    """Room for more compiled entries per function than Dynamo's default of 8 (one per shape we compile for)."""
    limits = torch._dynamo.config
    limits.recompile_limit = max(limits.recompile_limit, 64)
    limits.accumulated_recompile_limit = max(limits.accumulated_recompile_limit, 512)


def _recomputed(half: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """`half`, keeping only its inputs for the backward pass, which runs it again (gradient checkpointing)."""
    return lambda *inputs: checkpoint(half, *inputs, use_reentrant=False)


class SelfConditioning(nn.Module):
    """Turns the previous step's distribution into a signal added to the canvas embeddings."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        h = config.hidden_size
        self.pre_norm = RMSNorm(h, config.rms_norm_eps)
        self.gate_proj = nn.Linear(h, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(h, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, h, bias=False)
        self.act = ACTIVATION_FNS[config.hidden_activation]
        self.eps = config.rms_norm_eps

    def forward(self, embeds: torch.Tensor, soft_embeds: torch.Tensor | None) -> torch.Tensor:
        if soft_embeds is not None:
            normed = self.pre_norm(soft_embeds)
            embeds = embeds + self.down_proj(self.act(self.gate_proj(normed)) * self.up_proj(normed))
        # With no signal the MLP adds exactly zero; the closing unscaled norm still applies.
        return rms_norm(embeds, None, self.eps)


def _attention_mask(
    key_valid: torch.Tensor,
    key_positions: torch.Tensor,
    query_positions: torch.Tensor | None,
    window: int | None,
) -> torch.Tensor | None:
    """Boolean mask [B, 1, Q or 1, K]; None when every key is visible to every query.

    With `query_positions` the mask is causal (and windowed when `window` is set). A query may always see its
    own key, so a padding query never has an empty row (its output is unused, but must stay finite).
    """
    if query_positions is None:
        return None if bool(key_valid.all()) else key_valid[:, None, None, :]
    allowed = key_positions[None, :] <= query_positions[:, None]
    if window is not None:
        allowed &= key_positions[None, :] > query_positions[:, None] - window
    allowed = key_valid[:, None, :] & allowed[None]
    allowed |= (key_positions[None, :] == query_positions[:, None])[None]
    return allowed[:, None]


@dataclass(frozen=True)
class ImageInputs:
    """Images' soft tokens in prompt ids [B, T]: `index` [B, T] says which row of `features` [N, H] takes each
    position's place (-1: the token's own embedding), `blocks` [B, T] numbers each image's run of positions
    (-1 elsewhere): where the config asks for it (`use_bidirectional_attention: vision`), a run's positions see
    each other both ways in the causal encoder, on every layer, as the reference's encoder does."""

    features: torch.Tensor
    index: torch.Tensor
    blocks: torch.Tensor

    @classmethod
    def in_prompts(
        cls, ids: torch.Tensor, valid: torch.Tensor | None, pictures: list[list[torch.Tensor]], image_token_id: int
    ) -> ImageInputs | None:
        """Padded prompt ids [B, T] (`valid`: their real tokens) and each row's pictures' soft tokens (in order)
        -> where each soft token goes: the image ids of rows with pictures, row by row. None where none has any."""
        with_pictures = torch.tensor([bool(row) for row in pictures], device=ids.device)
        if not bool(with_pictures.any()):
            return None
        is_image = (ids == image_token_id) & with_pictures[:, None]
        if valid is not None:
            is_image &= valid.to(ids.device)
        features = torch.cat([picture for row in pictures for picture in row])
        if int(is_image.sum()) != features.shape[0]:
            raise DiffGemmaError(
                f"the prompts hold {int(is_image.sum())} image ids for {features.shape[0]} soft tokens of their "
                "pictures: each picture needs its run of image ids (`DiffGemma.image_prompt` writes them)"
            )
        index = torch.full_like(ids, -1)
        index[is_image] = torch.arange(features.shape[0], device=ids.device)
        starts = is_image & ~F.pad(is_image, (1, 0))[:, :-1]
        return cls(features, index, torch.where(is_image, starts.long().cumsum(1) - 1, -1))

    def columns(self, start: int, end: int) -> ImageInputs:
        return ImageInputs(self.features, self.index[:, start:end], self.blocks[:, start:end])

    def chunk_ends(self, chunk: int) -> list[int]:
        """Where to cut the prompt into pieces of about `chunk` tokens without cutting an image's run (a run
        must be encoded whole: its first positions attend to its last); a run longer than `chunk` is a piece."""
        blocks = self.blocks.cpu()
        tokens = blocks.shape[1]
        inside = ((blocks[:, 1:] == blocks[:, :-1]) & (blocks[:, 1:] >= 0)).any(0).tolist()  # cut before t+1?
        cuts = [t for t in range(1, tokens) if not inside[t - 1]] + [tokens]
        ends, start = [], 0
        while start < tokens:
            furthest = cuts[bisect.bisect_right(cuts, start + chunk) - 1]  # the last cut within a chunk's reach
            start = furthest if furthest > start else cuts[bisect.bisect_right(cuts, start)]
            ends.append(start)
        return ends


def chunk_ends(tokens: int, images: ImageInputs | None, chunk: int) -> list[int]:
    """The ends of a prompt's pieces of `chunk` tokens (the last shorter), none inside an image's run."""
    return images.chunk_ends(chunk) if images is not None else [*range(chunk, tokens, chunk), tokens]


class PassRole:
    """Which pass runs now: `encoding` while the causal encoder runs, else the decoder. Read by modules whose
    weights differ between the two (an adapter PEFT trained on the reference model's two copies apart)."""

    def __init__(self) -> None:
        self.encoding = False


class DiffusionGemma(nn.Module):
    """The text model: embeddings, layers, final norm, tied head with soft-capping, self-conditioning."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Layer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_conditioning = SelfConditioning(config)
        self._inv_freq_on: dict[torch.device, dict[str, torch.Tensor]] = {}  # each layer type's, by device
        self.compiled_decoder = False
        self.role = PassRole()

    def compile_decoder(self) -> None:
        """Run the decoder's layers through torch.compile (the encoder stays eager: its token count varies).

        The compiled halves fuse the elementwise work around the matrix products, so a step launches far
        fewer kernels (with a CUDA graph, a bf16 step of the 26B shape on an H100 went from 41 to 34 ms,
        bench/RESULTS.md). Compilation happens on the first pass of each new shape (canvas batch, layer kind,
        weight format); it raises Dynamo's process-wide recompile limits to leave room for those entries.
        """
        # One compiled entry per (layer kind, batch, format): more than the default limit of 8 in a bench run.
        raise_recompile_limits()
        for layer in self.layers:
            layer.compile_halves()
        self.compiled_decoder = True

    def checkpoint_layers(self, enabled: bool = True) -> None:
        """Gradient checkpointing for training: each layer keeps only the inputs of its two halves around
        attention for the backward pass and runs them again there, rather than every intermediate of its
        norms, projections, dense MLP and experts, for about a third more compute (bench/train_memory.py).
        Attention itself keeps what it keeps: it writes the cache, which must happen once."""
        for layer in self.layers:
            layer.recompute = enabled

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        weight = self.embed_tokens.weight
        return F.embedding(ids, weight) * torch.tensor(self.config.embed_scale).to(weight.dtype)

    def soft_embed(self, probs: torch.Tensor) -> torch.Tensor:
        """Expected embedding under a distribution over the vocabulary [B, C, V] -> [B, C, H]."""
        weight = self.embed_tokens.weight
        scale = torch.tensor(self.config.embed_scale).to(weight.dtype)
        if probs.dtype == weight.dtype or torch.is_grad_enabled():
            return (probs.to(weight.dtype) @ weight) * scale
        # The distribution cast whole to the weights' dtype would be a second vocabulary-sized tensor (bf16 at
        # batch 8 on the 26B shape: 1 GiB): cast and multiply a slice of the vocabulary at a time instead,
        # summing the slices in float32. The weights are still read once.
        total = None
        for start in range(0, weight.shape[0], VOCAB_SLICE):
            part = probs[..., start : start + VOCAB_SLICE].to(weight.dtype) @ weight[start : start + VOCAB_SLICE]
            total = part.float() if total is None else total.add_(part)
        return total.to(weight.dtype) * scale

    def head(
        self, hidden: torch.Tensor, out: torch.Tensor | None = None, scale: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Tied LM head, float32 logits, soft-capped to +-final_logit_softcapping.

        `out` (float32, the logits' shape) receives the logits, so a generation loop can reuse one
        vocabulary-sized buffer instead of asking the allocator for a new one each step; with weights in
        another dtype they are computed a slice of the vocabulary at a time, so no whole-vocabulary temporary
        in that dtype is made (bf16 at batch 8 on the 26B shape: 1 GiB). Without `out` (and without gradients)
        such weights get a new float32 tensor filled the same way (training's detached drafts, for one).
        `scale` (a 0-dim tensor, without gradients) asks for sampling logits: the capped logits times `scale`
        (an inverse temperature) less a constant, which no softmax, entropy or argmax sees.
        """
        cap = self.config.final_logit_softcapping
        weight = self.embed_tokens.weight
        if out is None and weight.dtype != torch.float32 and not torch.is_grad_enabled():
            # Made whole in bf16 and then cast, the logits would be 1.5 times their float32 size at once.
            out = hidden.new_empty((*hidden.shape[:-1], weight.shape[0]), dtype=torch.float32)
        if scale is not None:
            # cap * tanh(x / cap) = 2 cap * sigmoid(2x / cap) - cap: the 2 / cap goes into the (small) hidden
            # states, the constant -cap is dropped, so the vocabulary-sized work is the sigmoid and one multiply.
            hidden = hidden * (2 / cap)
        if out is not None and out.is_contiguous() and (out.device.type == "cpu" or weight.dtype != out.dtype):
            logits = _head_in_slices(hidden, weight, out, HEAD_SLICE if out.device.type == "cpu" else VOCAB_SLICE)
        elif out is not None and weight.dtype == torch.float32:
            logits = torch.matmul(hidden, weight.t(), out=out)
        elif out is not None:
            logits = out.copy_(F.linear(hidden, weight))
        else:
            logits = F.linear(hidden, weight).float()
        if scale is not None:
            return logits.sigmoid_().mul_(scale * (2 * cap))
        if torch.is_grad_enabled() and logits.requires_grad:
            return torch.tanh(logits / cap) * cap
        # In place, and through the sigmoid (above). A CPU's tanh costs three times its sigmoid (on bench-90m's
        # logits: 54 ms against 29 for the whole cap, one thread); the results differ by a float32 rounding
        # of the capped value (8e-6 at cap 30).
        return logits.mul_(2 / cap).sigmoid_().mul_(2 * cap).sub_(cap)

    def _rope(self, positions: torch.Tensor, dtype: torch.dtype) -> dict[str, tuple[torch.Tensor, ...]]:
        device = positions.device
        return {kind: rope_tables(inv, positions, dtype) for kind, inv in self._inv_freqs(device).items()}

    def _inv_freqs(self, device: torch.device) -> dict[str, torch.Tensor]:
        """Each layer type's RoPE inverse frequencies on `device`: made at the first pass (so a meta-device build,
        which `load` checks for room before anything is allocated, makes none), copied once per device (a copy
        from the host each step would wait)."""
        if device not in self._inv_freq_on:
            made = {shape.layer_type: rope_inv_freq(shape) for shape in self.config.layers}
            self._inv_freq_on[device] = {kind: inv.to(device) for kind, inv in made.items()}
        return self._inv_freq_on[device]

    def shift_keys(self, keys: torch.Tensor, layer_index: int, shift: int) -> torch.Tensor:
        """Cached keys [B, KV, slots, D] of a layer as their tokens' keys `shift` positions later: RoPE turns a
        key by its position, so turning it by `shift` more moves it (in float32, rounded once). Values carry no
        position."""
        inv_freq = self._inv_freqs(keys.device)[self.config.layer_types[layer_index]]
        cos, sin = rope_tables(inv_freq, torch.tensor([shift], device=keys.device), torch.float32)
        return apply_rope(keys.float(), cos, sin).to(keys.dtype)

    def new_cache(self, batch_size: int, capacity: int, keep_all: bool = False) -> EncoderCache:
        return EncoderCache(self.config, batch_size, capacity, self.device, self.dtype, keep_all)

    def encode(
        self,
        ids: torch.Tensor,
        cache: EncoderCache,
        attention_mask: torch.Tensor | None = None,
        return_hidden: bool = True,
        images: ImageInputs | None = None,
    ) -> torch.Tensor | None:
        """Run the causal encoder over `ids` [B, T] (positions continue the cache) and append them to the cache.

        `attention_mask` [B, T] marks real tokens (False for padding); `images` puts images' soft tokens in
        place of their ids. Returns the final hidden states [B, T, H], or None with `return_hidden` False
        (generation needs only the cache: a 32k prompt's states would hold 0.2 GB on the 26B shape, twice that
        while joined). Without gradients a long prompt goes in chunks of about `PREFILL_CHUNK` tokens (an
        image's run never cut), each attending to the cache the earlier ones wrote: the same result, with
        activations bounded by the chunk (a 4k prompt's experts would otherwise hold [4k x top-k, hidden]
        tensors, about 1 GB on the 26B shape), not the context.
        """
        self.role.encoding = True
        try:
            tokens = ids.shape[1]
            if tokens <= PREFILL_CHUNK or torch.is_grad_enabled():
                return self._encode(ids, cache, attention_mask, return_hidden, images)
            hidden, start = [], 0
            for end in chunk_ends(tokens, images, PREFILL_CHUNK):
                hidden.append(
                    self._encode(
                        ids[:, start:end],
                        cache,
                        None if attention_mask is None else attention_mask[:, start:end],
                        return_hidden,
                        None if images is None else images.columns(start, end),
                    )
                )
                start = end
            return torch.cat(hidden, dim=1) if return_hidden else None
        finally:
            self.role.encoding = False

    def _encode(
        self,
        ids: torch.Tensor,
        cache: EncoderCache,
        attention_mask: torch.Tensor | None,
        return_hidden: bool,
        images: ImageInputs | None = None,
    ) -> torch.Tensor | None:
        batch, tokens = ids.shape
        start = cache.length
        cache.ensure_capacity(tokens)
        positions = torch.arange(start, start + tokens, device=ids.device)
        new_valid = (
            torch.ones(batch, tokens, dtype=torch.bool, device=ids.device)
            if attention_mask is None
            else attention_mask.to(device=ids.device, dtype=torch.bool)
        )
        window = self.config.sliding_window
        masks: dict[str, torch.Tensor | None] = {}
        for kind in set(self.config.layer_types):
            layer = cache.layers[self.config.layer_types.index(kind)]
            stored = cache.stored_slots(layer)
            key_valid = torch.cat([layer.valid[:, :stored], new_valid], dim=1)
            key_positions = torch.cat([layer.positions[:stored], positions])
            masks[kind] = _attention_mask(key_valid, key_positions, positions, window if kind == SLIDING else None)
        if images is not None and self.config.use_bidirectional_attention == "vision":
            blocks = images.blocks.to(ids.device)
            same_image = (blocks[:, :, None] == blocks[:, None, :]) & (blocks[:, :, None] >= 0)
            for mask in masks.values():  # (a run is never cut, so its keys are all among the new ones)
                mask[:, 0, :, -tokens:] |= same_image

        def attend(index: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            layer = cache.layers[index]
            mask = masks[self.config.layer_types[index]]
            if layer.ring is None:
                _write(layer, slice(start, start + tokens), k, v, positions, new_valid)
                if start == 0:  # nothing cached before: attend to the new keys themselves (keeps autograd simple)
                    return _sdpa(q, k, v, mask)
                keys, values = layer.keys[:, :, : start + tokens], layer.values[:, :, : start + tokens]
            else:
                ring = layer.ring
                keys = torch.cat([layer.keys[:, :, :ring], k], dim=2)
                values = torch.cat([layer.values[:, :, :ring], v], dim=2)
                # Keep the window in time order (oldest first), as the reference's cache does.
                _write(
                    layer,
                    slice(0, ring),
                    keys[:, :, -ring:],
                    values[:, :, -ring:],
                    torch.cat([layer.positions[:ring], positions])[-ring:],
                    torch.cat([layer.valid[:, :ring], new_valid], dim=1)[:, -ring:],
                )
            return _sdpa(q, keys, values, mask)

        hidden = self.embed(ids)
        if images is not None:
            index = images.index.to(ids.device)
            hidden[index >= 0] = images.features.to(hidden)[index[index >= 0]]
        rope = self._rope(positions, hidden.dtype)
        # A finished canvas has the decoder's shape, so it runs through the decoder's compiled halves (no new
        # compilation); other lengths (prompts, single tokens) would each compile anew and stay eager.
        fused = self.compiled_decoder and tokens == self.config.canvas_length
        for layer in self.layers:
            kind = self.config.layer_types[layer.index]
            hidden = layer(hidden, rope[kind], attend, encoder=True, fused=fused)
        cache.length = start + tokens
        return self.norm(hidden) if return_hidden else None

    def denoise(
        self,
        canvas: torch.Tensor,
        cache: EncoderCache,
        self_conditioning: torch.Tensor | None = None,
        self_conditioning_mask: torch.Tensor | None = None,
        context_end: torch.Tensor | None = None,
        logits_out: torch.Tensor | None = None,
        logit_scale: torch.Tensor | None = None,
        view: DecoderView | None = None,
        return_hidden: bool = False,
        soft_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits [B, C, V] for a canvas [B, C] that attends to itself and to everything the cache holds.

        `self_conditioning` is the previous step's distribution over the vocabulary [B, C, V] (probabilities,
        i.e. the softmax of its logits), or None on a first step; or `soft_embeds`, that distribution already
        turned into embeddings [B, C, H] (`soft_embed`), so that a caller can drop the vocabulary-sized
        distribution before the layers run (training). `self_conditioning_mask` [B] zeroes the signal for some
        rows. The cache is read, never advanced.

        `context_end` [B] (training, with a `keep_all` cache) lets each row see only the cached tokens before
        its own position (and, on sliding layers, only the last window of them), exactly what inference would
        have cached at that point; the canvas then sits at positions context_end + 0..C-1.

        `logits_out` is an optional [B, C, V] float32 buffer for the logits; `logit_scale` asks for sampling
        logits, scaled and shifted by a constant (see `head`). With a `view` (a `DecoderView` of this cache) the
        pass reads only tensors whose addresses stay put from canvas to canvas, for a CUDA graph to replay.
        With `return_hidden` the final hidden states [B, C, H] come back instead of the logits (a training loss
        takes the head a slice of the tokens at a time).
        """
        batch, length = canvas.shape
        if view is not None:
            view.refresh(cache)
            positions = view.positions
        elif context_end is None:
            positions = torch.arange(cache.length, cache.length + length, device=canvas.device)
        else:
            positions = context_end[:, None] + torch.arange(length, device=canvas.device)[None, :]
        if view is not None:  # the view's masks, kept current in place
            masks = {kind: view.masks[kind == SLIDING] for kind in set(self.config.layer_types)}
        else:
            # The masks depend only on what the cache holds, so every step of a canvas reuses them (building
            # one asks the host whether any key is padding: a synchronisation, paid once per canvas).
            memo_key = (cache.length, length) if context_end is None else None
            masks = cache.decoder_masks.get(memo_key) if memo_key is not None else None
            if masks is None:
                masks = self._decoder_masks(cache, batch, length, context_end, canvas.device)
                if memo_key is not None:
                    cache.decoder_masks = {memo_key: masks}

        def attend(index: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            layer = cache.layers[index]
            stored = cache.stored_slots(layer)
            mask = masks[self.config.layer_types[index]]
            if context_end is not None:  # training: no in-place writes into tensors autograd has saved
                keys = torch.cat([layer.keys[:, :, :stored], k], dim=2)
                values = torch.cat([layer.values[:, :, :stored], v], dim=2)
                return _sdpa(q, keys, values, mask)
            if view is not None:  # every slot, the unwritten ones masked
                slots = view.canvas_slots(layer)
                if isinstance(slots, slice):
                    layer.keys[:, :, slots] = k
                    layer.values[:, :, slots] = v
                else:
                    layer.keys.index_copy_(2, slots, k)
                    layer.values.index_copy_(2, slots, v)
                return _sdpa(q, layer.keys, layer.values, mask)
            end = stored + length
            layer.keys[:, :, stored:end] = k
            layer.values[:, :, stored:end] = v
            return _sdpa(q, layer.keys[:, :, :end], layer.values[:, :, :end], mask)

        embeds = self.embed(canvas)
        soft = soft_embeds if self_conditioning is None else self.soft_embed(self_conditioning)
        if soft is not None and self_conditioning_mask is not None:
            soft = soft * self_conditioning_mask.to(soft.dtype)[:, None, None]
        hidden = self.self_conditioning(embeds, soft)
        rope = self._rope(positions, hidden.dtype)
        for layer in self.layers:
            kind = self.config.layer_types[layer.index]
            hidden = layer(hidden, rope[kind], attend, encoder=False, fused=self.compiled_decoder)
        hidden = self.norm(hidden)
        return hidden if return_hidden else self.head(hidden, logits_out, logit_scale)

    def _decoder_masks(
        self, cache: EncoderCache, batch: int, length: int, context_end: torch.Tensor | None, device: torch.device
    ) -> dict[str, torch.Tensor | None]:
        canvas_valid = torch.ones(batch, length, dtype=torch.bool, device=device)
        masks: dict[str, torch.Tensor | None] = {}
        for kind in set(self.config.layer_types):
            layer = cache.layers[self.config.layer_types.index(kind)]
            stored = cache.stored_slots(layer)
            visible = layer.valid[:, :stored]
            if context_end is not None:
                cached = layer.positions[:stored][None, :]
                visible = visible & (cached < context_end[:, None])
                if kind == SLIDING:
                    visible = visible & (cached >= context_end[:, None] - (self.config.sliding_window - 1))
            masks[kind] = _attention_mask(torch.cat([visible, canvas_valid], dim=1), None, None, None)
        return masks

    def denoise_logits(
        self,
        prompt_ids: torch.Tensor,
        canvas_ids: torch.Tensor,
        self_conditioning_logits: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Encode the prompt, then one decoder pass over the canvas: logits [B, C, V] (float32).

        The stable parity surface: `self_conditioning_logits` are the previous step's (temperature-scaled)
        logits, turned into a distribution here exactly as the reference does.
        """
        prompt_ids = prompt_ids.to(self.device)
        canvas_ids = canvas_ids.to(self.device)
        cache = self.new_cache(prompt_ids.shape[0], prompt_ids.shape[1])
        with torch.no_grad():
            self.encode(prompt_ids, cache)
            probs = None
            if self_conditioning_logits is not None:
                probs = self_conditioning_logits.to(self.device).softmax(dim=-1, dtype=torch.float32)
            return self.denoise(canvas_ids, cache, probs)


HEAD_SLICE = 4096  # vocabulary ids per product in `_head_in_slices` on the CPU (its cache)
VOCAB_SLICE = 16384  # elsewhere, ids per product where the whole vocabulary would make a large temporary


def _onednn_linear() -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None:
    """oneDNN's linear on plain float32 weights (the operator torch.compile's CPU code calls), if this build
    has it; None otherwise."""
    if not torch.backends.mkldnn.is_available():
        return None
    try:
        op = torch.ops.mkldnn._linear_pointwise
    except (AttributeError, RuntimeError):
        return None
    return lambda x, weight: op(x, weight, None, "none", [], "")


_ONEDNN_LINEAR = _onednn_linear()


def _head_in_slices(hidden: torch.Tensor, weight: torch.Tensor, out: torch.Tensor, ids: int) -> torch.Tensor:
    """The logits into `out`, `ids` of the vocabulary at a time.

    On bench-90m's head ([256, 512] x [512, 32768], float32) one BLAS product takes 90-95 ms; oneDNN's, a slice
    of 4096 ids at a time with each slice's result copied out while it is in cache, 70 ms (alternating runs).
    The logits differ from the BLAS product's in float32 rounding (summation order), about 1e-6.
    """
    flat_hidden, flat_out = hidden.reshape(-1, hidden.shape[-1]), out.view(-1, out.shape[-1])
    onednn = _ONEDNN_LINEAR is not None and hidden.dtype == weight.dtype == torch.float32
    linear = _ONEDNN_LINEAR if onednn else F.linear
    for start in range(0, weight.shape[0], ids):
        flat_out[:, start : start + ids].copy_(linear(flat_hidden, weight[start : start + ids]))
    return out


def _write(
    layer: LayerCache,
    slots: slice,
    k: torch.Tensor,
    v: torch.Tensor,
    positions: torch.Tensor,
    valid: torch.Tensor,
) -> None:
    layer.keys[:, :, slots] = k
    layer.values[:, :, slots] = v
    layer.positions[slots] = positions
    layer.valid[:, slots] = valid


# On CUDA, cuDNN's attention builds a plan per new key length (every token of a growing cache): measured on an
# H100, 7.7 ms of host time a call. Flash and memory-efficient attention have no such cost.
_CUDA_ATTENTION = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    # Scores are not scaled by 1/sqrt(d): the q/k RMS norms set their size.
    grouped = q.shape[1] != k.shape[1]
    if not q.is_cuda:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0, enable_gqa=grouped)
    flash = mask is None and q.shape[-1] <= 256 and q.dtype in (torch.float16, torch.bfloat16)
    with sdpa_kernel(_CUDA_ATTENTION):
        if grouped and not flash:
            # Flash attention takes no mask (nor heads over 256) and the memory-efficient kernel no grouped heads:
            # left grouped, such a call falls to PyTorch's float32 math path (5 ms a step on the 26B shape's
            # decoder, an H100, bench/RESULTS.md).
            return grouped_attention(q, k, v, mask)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0, enable_gqa=grouped)


def grouped_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Grouped-query attention for kernels without grouped heads (q [B, H, Q, D]; k, v [B, KV, K, D]; mask
    [B or 1, 1, Q or 1, K]) -> [B, H, Q, D], through whichever copy is smaller (`stacks_heads`): the query heads
    that share a key head stacked along the query axis, so each key head is attended as it is stored (a mask
    per query is then repeated once per stacked head), or the keys and values repeated to every query head.
    Both give the scores and softmax rows of plain grouped attention. On the 26B shape's full layers the
    repeat is 8 times the cache it reads (136 MB a decoder step at a 4k context, 1 GB at 32k): the decoder,
    whose mask is per key, always stacks; a prompt chunk stacks there too."""
    batch, heads, queries, dim = q.shape
    groups = heads // k.shape[1]
    if not stacks_heads(q, k, mask):
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0)
    folded = q.reshape(batch, k.shape[1], groups * queries, dim)  # head h = key head h // groups, as repeating
    if mask is not None and mask.shape[-2] != 1:
        mask = mask.repeat(1, 1, groups, 1)  # a per-query mask, once for each stacked head
    out = F.scaled_dot_product_attention(folded, k, v, attn_mask=mask, scale=1.0)
    return out.reshape(batch, heads, queries, dim)


def stacks_heads(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None) -> bool:
    """Whether `grouped_attention` stacks the query heads (else repeats the keys and values): the smaller copy.
    A key costs the repeat 2 x heads x D values; stacking costs nothing more with no mask or one per key, and
    with a mask per query its repeated booleans and their additive form beyond the one attention makes anyway."""
    queries, value_bytes = q.shape[2], q.element_size()
    if mask is None or mask.shape[-2] == 1:
        return True
    groups = q.shape[1] // k.shape[1]
    stacked = mask.shape[0] * queries * (groups * (1 + value_bytes) - value_bytes)
    return stacked <= 2 * q.shape[0] * q.shape[1] * q.shape[-1] * value_bytes


def activation_bytes(config: ModelConfig, context: int, batch: int, bytes_per_value: int) -> tuple[int, int]:
    """The largest temporaries of inference beyond the weights, the cache and the sampler's buffers, estimated
    from the shapes (an upper estimate, as on CUDA): (one denoising step, one prompt chunk). On CUDA the
    decoder's graph keeps its own memory pool, so both are held at once.

    A layer's largest moment is one of: the queries' projection with its float32 norm and rotary temporaries;
    attention's queries (stacked by key head where heads are grouped, `grouped_attention`, as on CUDA),
    output and its copy, and while encoding a sliding layer's window joined to the new keys, the causal mask
    made additive, and the smaller of the copies grouped heads take (the mask repeated per stacked head, or
    the keys and values repeated per query head); the experts' rows in their group layout (16-row
    aligned on CUDA), gate/up and down products, each pair's output (and its float32 copy, where narrower), the
    routing's count and attention's output. Beside it: the masks and a few hidden-state-sized tensors. A step
    also casts and multiplies the vocabulary a slice at a time (head, self-conditioning). Checked against the
    tensors a CPU pass allocates (tests/test_engine.py); the CUDA kernels' own workspaces are not counted.
    """
    b, h, heads = bytes_per_value, config.hidden_size, config.num_attention_heads

    def pass_bytes(queries: int, full_keys: int, encoding: bool) -> int:
        tokens = batch * queries
        window_keys = config.sliding_window - 1 + queries
        attention = 0
        for shape in config.layers:
            keys = window_keys if shape.is_sliding else full_keys
            groups = heads // shape.num_kv_heads
            queries_bytes = tokens * heads * shape.head_dim * b
            held = 2 * queries_bytes  # the output and its copy
            # grouped heads: the queries stacked by key head (a copy) and, for a prompt, the smaller of that
            # with its mask repeated per stacked head or the keys and values repeated (`grouped_attention`)
            stacked = queries_bytes + (tokens * keys * (groups * (1 + b) - b) if encoding else 0)
            held += min(stacked, 2 * batch * keys * heads * shape.head_dim * b) if groups > 1 else 0
            if encoding:  # a sliding layer's window joined to the new keys; the causal mask made additive
                held += 2 * batch * keys * shape.head_dim * shape.num_kv_heads * b if shape.is_sliding else 0
                held += tokens * keys * b
            projection = tokens * heads * shape.head_dim * max(12 + b, 6 * b)
            attention = max(attention, projection, held)
        pairs = tokens * config.top_k_experts
        rows = pairs + config.num_experts * (GPU_GROUP_ALIGN - 1)
        pair_outputs = pairs * h * (b + (4 if b < 4 else 0))  # the weighted sum reads them in float32
        experts = rows * (2 * h + 2 * config.moe_intermediate_size) * b + pair_outputs + tokens * h * 4
        experts += pairs * config.num_experts * 4  # the routing's running count
        experts += tokens * heads * max(shape.head_dim for shape in config.layers) * b  # attention's output
        masks = tokens * (full_keys + window_keys)  # booleans, one mask of each kind for the whole pass
        return 6 * tokens * h * b + masks + max(attention, experts)

    canvas = config.canvas_length
    vocabulary_slice = batch * canvas * (min(VOCAB_SLICE, config.vocab_size) * b + h * 4)
    step = max(pass_bytes(canvas, context + canvas, False), 4 * batch * canvas * h * b + vocabulary_slice)
    # The prompt chunk by chunk, each attending to the keys so far (generation keeps no hidden states): the
    # largest is the last full chunk or the shorter one after it, which attends to the most keys.
    last_full = (context // PREFILL_CHUNK) * PREFILL_CHUNK
    chunks = [(last_full - PREFILL_CHUNK, PREFILL_CHUNK)] if last_full else []
    chunks += [(last_full, context - last_full)] if context > last_full else []
    return step, max((pass_bytes(queries, start + queries, True) for start, queries in chunks), default=0)
