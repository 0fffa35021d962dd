"""Small random checkpoints made by the reference implementation (`transformers`), for parity tests."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from diffgemma.presets import write_tokenizer

TINY_VISION = {
    "model_type": "gemma4_vision",
    "hidden_size": 16,
    "intermediate_size": 32,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "head_dim": 8,
    "position_embedding_size": 16,
    "patch_size": 4,
}

# Two shapes that differ in head dims, KV heads, experts, top-k and layer pattern.
CONFIG_A = {
    "vocab_size": 265,
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "global_head_dim": 32,
    "num_global_key_value_heads": 1,
    "sliding_window": 8,
    "num_experts": 4,
    "top_k_experts": 2,
    "moe_intermediate_size": 32,
    "layer_types": ["sliding_attention", "sliding_attention", "full_attention", "full_attention"],
}
CONFIG_B = {
    "vocab_size": 265,
    "hidden_size": 48,
    "intermediate_size": 80,
    "num_hidden_layers": 7,
    "num_attention_heads": 6,
    "num_key_value_heads": 3,
    "head_dim": 8,
    "global_head_dim": 24,
    "num_global_key_value_heads": 2,
    "sliding_window": 12,
    "num_experts": 8,
    "top_k_experts": 3,
    "moe_intermediate_size": 16,
    # layer_types left out: the reference's 5:1 pattern, last layer forced to full attention
}
# Sizes no fast path is tuned for: a hidden size of 50 (rows not 16-byte aligned in float32), one KV head for
# five query heads on sliding layers, five experts, an odd vocabulary.
CONFIG_C = {
    "vocab_size": 301,
    "hidden_size": 50,
    "intermediate_size": 70,
    "num_hidden_layers": 3,
    "num_attention_heads": 5,
    "num_key_value_heads": 1,
    "head_dim": 10,
    "global_head_dim": 14,
    "num_global_key_value_heads": 5,
    "sliding_window": 6,
    "num_experts": 5,
    "top_k_experts": 2,
    "moe_intermediate_size": 18,
    "layer_types": ["sliding_attention", "full_attention", "full_attention"],
}
CANVAS = {"A": 16, "B": 24, "C": 20}
GENERATION = {
    "max_denoising_steps": 12,
    "sampler_config": {"entropy_bound": 0.1, "_cls_name": "EntropyBoundSamplerConfig"},
    "t_min": 0.4,
    "t_max": 0.8,
    "stability_threshold": 1,
    "confidence_threshold": 0.005,
    "eos_token_id": 1,
    "pad_token_id": 0,
}


@torch.no_grad()
def randomize_(model: torch.nn.Module, seed: int, scale: float = 1.0) -> None:
    """Weights large enough that every path matters: matrices ~ 1/sqrt(fan-in), norms/scales around 1.

    Encoder and decoder layer scalars get different values, so mixing them up fails the parity tests.
    """
    generator = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        if param.ndim >= 2:
            fan_in = param.shape[-1]
            std = 0.25 if "embed_tokens" in name else 0.6 / math.sqrt(fan_in)
            param.copy_(torch.randn(param.shape, generator=generator) * std * scale)
        else:
            param.copy_(torch.rand(param.shape, generator=generator) + 0.5)
    for name, buffer in model.named_buffers():
        if name.endswith("layer_scalar"):
            buffer.copy_(torch.rand(buffer.shape, generator=generator) + 0.5)


def make_reference_checkpoint(
    folder: Path,
    which: str,
    seed: int = 0,
    scale: float = 1.0,
    prepare=None,
    vision: dict | None = None,
    top: dict | None = None,
    **text_overrides,
) -> Path:
    """Build a random `DiffusionGemmaForBlockDiffusion` (its text config one of ours with `text_overrides`, its
    vision config TINY_VISION with `vision`, `top` for the top level's keys (image ids); `prepare` sees the model
    before it is saved), save it with `save_pretrained`, add a tokenizer."""
    from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion

    text = {"A": CONFIG_A, "B": CONFIG_B, "C": CONFIG_C}[which]
    config = DiffusionGemmaConfig(
        text_config={**text, **text_overrides},
        vision_config={**TINY_VISION, **(vision or {})},
        canvas_length=CANVAS[which],
        **(top or {}),
    )
    torch.manual_seed(seed)
    model = DiffusionGemmaForBlockDiffusion(config)
    randomize_(model, seed, scale)
    if prepare is not None:
        prepare(model)
    model.save_pretrained(folder)
    (folder / "generation_config.json").write_text(json.dumps(GENERATION, indent=2))
    write_tokenizer(folder)
    return folder


def load_reference(folder: Path):
    """The reference model; its experts as a plain loop where its grouped GEMM refuses the shape (rows must be
    16-byte aligned: config C's hidden size of 50 in float32 is not)."""
    from transformers import DiffusionGemmaForBlockDiffusion

    hidden = json.loads((folder / "config.json").read_text())["text_config"]["hidden_size"]
    aligned = hidden * 4 % 16 == 0
    kwargs = {} if aligned else {"experts_implementation": "eager"}
    return DiffusionGemmaForBlockDiffusion.from_pretrained(folder, **kwargs).eval()
