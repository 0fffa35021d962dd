"""The vision tower: an image's patches -> soft tokens in the text model's embedding space.

Gemma 4's image encoder, which DiffusionGemma keeps in front of its causal encoder: patches (pixels scaled to
[-1, 1]) are projected and given learned x and y position embeddings, run through bidirectional transformer
layers with 2-D RoPE (the first half of each head rotated by the patch's column, the second by its row),
averaged in k x k blocks of patches (`pooling_kernel_size`), scaled by sqrt(hidden), optionally standardized,
then normed and projected to the text model's hidden size. Each soft token takes the place of one image id in
the prompt. Images are encoded one at a time at their own size, so no patch is padding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint import StoredTensor, read_tensor
from .config import VisionConfig
from .errors import DiffGemmaError
from .model import ACTIVATION_FNS, RMSNorm, apply_rope, rms_norm, rope_tables
from .resources import check_memory

TOWER_PREFIX = "model.encoder."  # where the reference keeps the tower and its projection


class ClippedLinear(nn.Module):
    """A bias-free projection whose input and output may be clamped to stored ranges (`use_clipped_linears`)."""

    def __init__(self, in_features: int, out_features: int, clipped: bool) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features, out_features, bias=False)
        self.clipped = clipped
        if clipped:
            for name in ("input_min", "input_max", "output_min", "output_max"):
                bound = float("-inf") if name.endswith("min") else float("inf")
                self.register_buffer(name, torch.tensor(bound))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.clipped:
            return self.linear(x)
        x = torch.clamp(x, self.input_min, self.input_max)
        return torch.clamp(self.linear(x), self.output_min, self.output_max)


class VisionAttention(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        h, d, clip = config.hidden_size, config.head_dim, config.use_clipped_linears
        self.heads, self.kv_heads, self.head_dim = config.num_attention_heads, config.num_key_value_heads, d
        self.q_proj = ClippedLinear(h, self.heads * d, clip)
        self.k_proj = ClippedLinear(h, self.kv_heads * d, clip)
        self.v_proj = ClippedLinear(h, self.kv_heads * d, clip)
        self.o_proj = ClippedLinear(self.heads * d, h, clip)
        self.q_norm = RMSNorm(d, config.rms_norm_eps)
        self.k_norm = RMSNorm(d, config.rms_norm_eps)
        self.v_norm = RMSNorm(d, config.rms_norm_eps, with_scale=False)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, ...]) -> torch.Tensor:
        batch, patches, _ = x.shape
        q = _rotated(self.q_norm(self.q_proj(x).view(batch, patches, -1, self.head_dim)), rope)
        k = _rotated(self.k_norm(self.k_proj(x).view(batch, patches, -1, self.head_dim)), rope)
        v = self.v_norm(self.v_proj(x).view(batch, patches, -1, self.head_dim))
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            scale=1.0,  # the query and key norms set the scale
            enable_gqa=self.kv_heads != self.heads,
        )
        return self.o_proj(out.transpose(1, 2).reshape(batch, patches, -1))


def _rotated(x: torch.Tensor, rope: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """x [B, P, heads, D]: its first half rotated by column positions, its second by row positions."""
    cos_x, sin_x, cos_y, sin_y = rope
    half = x.shape[-1] // 2
    return torch.cat([apply_rope(x[..., :half], cos_x, sin_x), apply_rope(x[..., half:], cos_y, sin_y)], dim=-1)


class VisionLayer(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        h, i, eps, clip = config.hidden_size, config.intermediate_size, config.rms_norm_eps, config.use_clipped_linears
        self.self_attn = VisionAttention(config)
        self.mlp = nn.Module()
        self.mlp.gate_proj = ClippedLinear(h, i, clip)
        self.mlp.up_proj = ClippedLinear(h, i, clip)
        self.mlp.down_proj = ClippedLinear(i, h, clip)
        self.act = ACTIVATION_FNS[config.hidden_activation]
        self.input_layernorm = RMSNorm(h, eps)
        self.post_attention_layernorm = RMSNorm(h, eps)
        self.pre_feedforward_layernorm = RMSNorm(h, eps)
        self.post_feedforward_layernorm = RMSNorm(h, eps)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, ...]) -> torch.Tensor:
        x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), rope))
        normed = self.pre_feedforward_layernorm(x)
        mlp = self.mlp
        return x + self.post_feedforward_layernorm(mlp.down_proj(self.act(mlp.gate_proj(normed)) * mlp.up_proj(normed)))


class VisionTransformer(nn.Module):
    """Patches [B, rows x columns, 3 x patch^2] of a rows x columns grid -> pooled states, float32."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.config = config
        h, patch = config.hidden_size, config.patch_size
        self.patch_embedder = nn.Module()
        self.patch_embedder.input_proj = nn.Linear(3 * patch * patch, h, bias=False)
        self.patch_embedder.position_embedding_table = nn.Parameter(torch.ones(2, config.position_embedding_size, h))
        self.encoder = nn.Module()
        self.encoder.layers = nn.ModuleList(VisionLayer(config) for _ in range(config.num_hidden_layers))
        if config.standardize:
            self.register_buffer("std_bias", torch.zeros(h))
            self.register_buffer("std_scale", torch.ones(h))

    def forward(self, patches: torch.Tensor, rows: int, columns: int) -> torch.Tensor:
        config = self.config
        if max(rows, columns) > config.position_embedding_size:
            raise DiffGemmaError(
                f"an image of {rows} x {columns} patches is larger than the vision tower's "
                f"{config.position_embedding_size} positions a side"
            )
        device = patches.device
        y, x = torch.meshgrid(torch.arange(rows, device=device), torch.arange(columns, device=device), indexing="ij")
        x, y = x.reshape(1, -1), y.reshape(1, -1)
        embedder = self.patch_embedder
        weight = embedder.input_proj.weight
        table = embedder.position_embedding_table
        hidden = embedder.input_proj((2 * (patches - 0.5)).to(weight.dtype)) + (table[0][x] + table[1][y])
        spatial = config.head_dim // 2  # each axis rotates half a head
        inv_freq = 1.0 / config.rope_theta ** (torch.arange(0, spatial, 2, dtype=torch.float, device=device) / spatial)
        rope = (*rope_tables(inv_freq, x, hidden.dtype), *rope_tables(inv_freq, y, hidden.dtype))
        for layer in self.encoder.layers:
            hidden = layer(hidden, rope)
        k = config.pooling_kernel_size
        grid = hidden.float().view(hidden.shape[0], rows // k, k, columns // k, k, -1)
        pooled = grid.mean(dim=(2, 4)).flatten(1, 2) * config.hidden_size**0.5  # (in float32: it can pass fp16's range)
        if config.standardize:
            pooled = (pooled - self.std_bias.float()) * self.std_scale.float()
        return pooled


class VisionProjection(nn.Module):
    """Pooled vision states -> the text model's hidden size (an unscaled norm, then a projection)."""

    def __init__(self, config: VisionConfig, text_hidden_size: int) -> None:
        super().__init__()
        self.embedding_projection = nn.Linear(config.hidden_size, text_hidden_size, bias=False)
        self.eps = config.rms_norm_eps

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        return self.embedding_projection(rms_norm(states, None, self.eps))


class ImageEncoder(nn.Module):
    """The tower and its projection, named as the checkpoint names them (under `TOWER_PREFIX`)."""

    def __init__(self, config: VisionConfig, text_hidden_size: int) -> None:
        super().__init__()
        self.config = config
        self.vision_tower = VisionTransformer(config)
        self.embed_vision = VisionProjection(config, text_hidden_size)

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_vision.embedding_projection.weight.dtype

    @torch.no_grad()
    def forward(self, patches: torch.Tensor, rows: int, columns: int) -> torch.Tensor:
        """One image's patches [rows x columns, 3 x patch^2] (row by row; pixels in [0, 1]) -> its soft tokens
        [rows x columns / k^2, text hidden] in the model's dtype."""
        k = self.config.pooling_kernel_size
        if rows % k or columns % k or patches.shape != (rows * columns, 3 * self.config.patch_size**2):
            raise DiffGemmaError(
                f"an image's patches must be [{rows} x {columns}, 3 x {self.config.patch_size}^2] with sides "
                f"that are multiples of {k}; got {list(patches.shape)}"
            )
        weight = self.embed_vision.embedding_projection.weight
        pooled = self.vision_tower(patches[None].to(weight.device), rows, columns)[0]
        return self.embed_vision(pooled.to(weight.dtype))


def load_image_encoder(
    config: VisionConfig,
    text_hidden_size: int,
    stored: dict[str, StoredTensor],
    device: torch.device,
    dtype: torch.dtype,
) -> ImageEncoder:
    """The image encoder filled from the checkpoint's vision tensors (`stored`: by their names), each checked."""
    with torch.device("meta"):
        encoder = ImageEncoder(config, text_hidden_size).to(dtype)
    weights = sum(tensor.numel() * tensor.element_size() for tensor in encoder.state_dict().values())
    check_memory(weights, device, "the vision tower's weights")
    encoder = encoder.to_empty(device=device)
    targets = dict(encoder.named_parameters()) | dict(encoder.named_buffers())
    by_name = {TOWER_PREFIX + name: tensor for name, tensor in targets.items()}
    missing = sorted(set(by_name) - set(stored))
    if missing:
        raise DiffGemmaError(f"the checkpoint's vision tower is missing tensor `{missing[0]}` ({len(missing)} in all)")
    with torch.no_grad():
        for name, tensor in by_name.items():
            entry = stored[name]
            if tuple(entry.shape) != tuple(tensor.shape):
                raise DiffGemmaError(
                    f"{entry.path}: tensor `{name}` has shape {list(entry.shape)}, expected {list(tensor.shape)}"
                )
            tensor.copy_(read_tensor(entry))
    return encoder.eval().requires_grad_(False)


def parameter_count(config: VisionConfig, text_hidden_size: int) -> int:
    """The tower's and its projection's parameters (made without memory)."""
    with torch.device("meta"):
        return sum(parameter.numel() for parameter in ImageEncoder(config, text_hidden_size).parameters())
