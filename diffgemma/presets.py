"""Named model shapes and random-weight checkpoints of them, for benchmarks, tests and demos offline.

The real shape (`26b-a4b`) is that of `google/diffusiongemma-26B-A4B-it`; the smaller ones keep its
structure (sliding and full layers, K=V, dense MLP + experts, self-conditioning) at sizes a CPU can run.
A random checkpoint is written through the same `save_checkpoint` as a trained one, so it has the
reference layout and `transformers` loads it too.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer as RustTokenizer
from tokenizers import decoders, models, pre_tokenizers, processors

from .checkpoint import save_checkpoint
from .config import ModelConfig, SamplerSettings, parse_model_config
from .errors import DiffGemmaError
from .model import DiffusionGemma
from .quant import held_bytes
from .resources import check_disk, check_memory
from .tokenizer import TEMPLATE_FILE, TOKENIZER_CONFIG, TOKENIZER_FILE
from .vision import TOWER_PREFIX, ImageEncoder

SPECIAL_TOKENS = ["<pad>", "<eos>", "<bos>", "<unk>", "<|turn>", "<turn|>", "<|channel>", "<channel|>", "<|think|>"]
# Gemma 4's tool-calling tokens, after the bytes (so the tokens above and the bytes keep their ids)
TOOL_TOKENS = ["<|tool>", "<tool|>", "<|tool_call>", "<tool_call|>", "<|tool_response>", "<tool_response|>", '<|"|>']
# Gemma 4's image markers (begin, one per soft token, end), after the tool tokens, for checkpoints with a vision tower
IMAGE_TOKENS = ["<|image>", "<|image|>", "<image|>"]

# A Gemma 4 style template: turns are `<|turn>role\n ... <turn|>`, thinking is asked for with `<|think|>`
# in a system turn, and a non-thinking answer starts after an empty thought channel. Tools are declared in
# that system turn; a model turn's calls (`<|tool_call>call:NAME{...}<tool_call|>`) and the tools' answers
# (`<|tool_response>response:NAME{...}<tool_response|>`) share the turn, which goes on after the answers.
# Values are written as the model writes a call's arguments (`toolcalls`): bare keys, strings in `<|"|>`.
CHAT_TEMPLATE = (
    "{% macro gemma_value(value) %}"
    '{% if value is string %}<|"|>{{ value }}<|"|>'
    "{% elif value is mapping %}{{ '{' }}"
    "{% for key, item in value.items() %}{{ key }}:{{ gemma_value(item) }}{{ ',' if not loop.last }}{% endfor %}"
    "{{ '}' }}"
    "{% elif value is sameas true %}true{% elif value is sameas false %}false{% elif value is none %}null"
    "{% elif value is iterable %}[{% for item in value %}{{ gemma_value(item) }}{{ ',' if not loop.last }}"
    "{% endfor %}]"
    "{% else %}{{ value }}{% endif %}"
    "{% endmacro %}"
    "{{ bos_token }}"
    "{% if enable_thinking or tools %}<|turn>system\n{% if enable_thinking %}<|think|>{% endif %}"
    "{% for tool in tools or [] %}<|tool>declaration:{{ tool.function.name }}"
    "{{ gemma_value({'description': tool.function.description or '', 'parameters': tool.function.parameters or {}}) }}"
    "<tool|>{% endfor %}<turn|>\n{% endif %}"
    "{% for message in messages %}"
    "{% set before = loop.previtem.role if not loop.first else '' %}"
    "{% set after = loop.nextitem.role if not loop.last else '' %}"
    "{% if message.role == 'tool' %}"
    "{% set found = namespace(name=message.name or '') %}"
    "{% for earlier in messages[:loop.index0] if not found.name %}{% for call in earlier.tool_calls or [] %}"
    "{% if call.id == message.tool_call_id %}{% set found.name = call.function.name %}{% endif %}"
    "{% endfor %}{% endfor %}"
    "<|tool_response>response:{{ found.name }}{{ gemma_value({'value': message.content or ''}) }}<tool_response|>"
    "{% if after not in ['', 'tool', 'assistant'] %}<turn|>\n{% endif %}"
    "{% else %}"
    "{% if not (message.role == 'assistant' and before == 'tool') %}"
    "<|turn>{{ 'model' if message.role == 'assistant' else message.role }}\n{% endif %}"
    "{% if message.content is string or not message.content %}{{ (message.content or '') | trim }}"
    "{% else %}{% for part in message.content %}"
    "{% if part.type == 'image' %}<|image|>{% elif part.type == 'text' %}{{ part.text | trim }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{% for call in message.tool_calls or [] %}"
    "<|tool_call>call:{{ call.function.name }}{{ gemma_value(call.function.arguments) }}<tool_call|>{% endfor %}"
    "{% if not (message.tool_calls and after == 'tool') %}<turn|>\n{% endif %}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt and messages[-1].role != 'tool' %}<|turn>model\n"
    "{% if not enable_thinking %}<|channel>thought\n<channel|>{% endif %}"
    "{% endif %}"
)


def _text_config(**shape: Any) -> dict[str, Any]:
    return {
        "model_type": "diffusion_gemma_text",
        "hidden_activation": "gelu_pytorch_tanh",
        "rms_norm_eps": 1e-6,
        "final_logit_softcapping": 30.0,
        "pad_token_id": 0,
        "eos_token_id": 1,
        "bos_token_id": 2,
        "tie_word_embeddings": True,
        "attention_bias": False,
        "max_position_embeddings": 131072,
        "rope_parameters": {
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1000000.0},
        },
        **shape,
    }


TINY_SHAPE: dict[str, Any] = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    global_head_dim=32,
    num_global_key_value_heads=1,
    sliding_window=16,
    num_experts=8,
    top_k_experts=2,
    moe_intermediate_size=32,
    layer_types=["sliding_attention", "sliding_attention", "sliding_attention", "full_attention"],
)

PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {
        "canvas_length": 32,
        "text_config": _text_config(vocab_size=len(SPECIAL_TOKENS) + 256 + len(TOOL_TOKENS), **TINY_SHAPE),
    },
    # `tiny` that reads images too: a small vision tower (8-pixel patches pooled 2 x 2) and the image tokens.
    "tiny-vision": {
        "canvas_length": 32,
        "text_config": _text_config(
            vocab_size=len(SPECIAL_TOKENS) + 256 + len(TOOL_TOKENS) + len(IMAGE_TOKENS),
            use_bidirectional_attention="vision",
            **TINY_SHAPE,
        ),
        "vision_config": {
            "model_type": "gemma4_vision",
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 2,
            "head_dim": 16,
            "patch_size": 8,
            "pooling_kernel_size": 2,
            "position_embedding_size": 64,
            "rope_parameters": {"rope_type": "axial", "rope_theta": 100.0},
        },
        **dict(zip(("boi_token_id", "image_token_id", "eoi_token_id"), range(272, 275), strict=True)),
    },
    # Sudoku (tasks/sudoku/tokens.py): 814 tokens (specials and 810 cell tokens), an 81-cell canvas.
    "sudoku": {
        "canvas_length": 81,
        "text_config": _text_config(
            vocab_size=814,
            hidden_size=128,
            intermediate_size=256,
            num_hidden_layers=6,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=32,
            global_head_dim=64,
            num_global_key_value_heads=1,
            sliding_window=256,
            num_experts=8,
            top_k_experts=2,
            moe_intermediate_size=128,
        ),
    },
    # About 90M parameters, a 32k vocabulary: the CPU benchmark's shape.
    "bench-90m": {
        "canvas_length": 256,
        "text_config": _text_config(
            vocab_size=32768,
            hidden_size=512,
            intermediate_size=1024,
            num_hidden_layers=6,
            num_attention_heads=8,
            num_key_value_heads=4,
            head_dim=64,
            global_head_dim=128,
            num_global_key_value_heads=2,
            sliding_window=128,
            num_experts=24,
            top_k_experts=4,
            moe_intermediate_size=256,
        ),
    },
    # google/diffusiongemma-26B-A4B-it: 25.2B text parameters, 3.8B active.
    "26b-a4b": {
        "canvas_length": 256,
        "text_config": _text_config(
            vocab_size=262144,
            hidden_size=2816,
            intermediate_size=2112,
            num_hidden_layers=30,
            num_attention_heads=16,
            num_key_value_heads=8,
            head_dim=256,
            global_head_dim=512,
            num_global_key_value_heads=2,
            sliding_window=1024,
            num_experts=128,
            top_k_experts=8,
            moe_intermediate_size=704,
            max_position_embeddings=262144,
        ),
    },
}


def preset_config(name: str, **text_overrides: Any) -> dict[str, Any]:
    """A full `config.json` dict for a named shape, with optional text_config overrides."""
    if name not in PRESETS:
        raise DiffGemmaError(f"unknown preset {name!r}; expected one of {', '.join(PRESETS)}")
    preset = copy.deepcopy(PRESETS[name])
    preset["text_config"].update(text_overrides)
    return {
        "architectures": ["DiffusionGemmaForBlockDiffusion"],
        "model_type": "diffusion_gemma",
        "tie_word_embeddings": True,
        "vision_config": None,
        **preset,
    }


def byte_tokenizer(image_tokens: bool = False) -> RustTokenizer:
    """A byte-level tokenizer: the special tokens, one token per byte, the tool tokens (and with `image_tokens`
    the image markers, ids 272-274). BOS is added to plain text."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    added = SPECIAL_TOKENS + TOOL_TOKENS + (IMAGE_TOKENS if image_tokens else [])
    for symbol in [*sorted(alphabet), *added[len(SPECIAL_TOKENS) :]]:
        vocab[symbol] = len(vocab)
    tokenizer = RustTokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(added)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", vocab["<bos>"])]
    )
    return tokenizer


def write_tokenizer(folder: Path, image_tokens: bool = False) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    byte_tokenizer(image_tokens).save(str(folder / TOKENIZER_FILE))
    settings = {
        "bos_token": "<bos>",
        "eos_token": "<eos>",
        "pad_token": "<pad>",
        "unk_token": "<unk>",
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": 131072,
    }
    (folder / TOKENIZER_CONFIG).write_text(json.dumps(settings, indent=2), encoding="utf-8")
    (folder / TEMPLATE_FILE).write_text(CHAT_TEMPLATE, encoding="utf-8")


@torch.no_grad()
def init_random_(network: DiffusionGemma, seed: int, std: float = 0.02) -> None:
    """Random weights on whatever device the network lives: normal matrices, norms and scales near 1."""
    generator = torch.Generator(device=network.device).manual_seed(seed)
    for name, tensor in list(network.named_parameters()) + list(network.named_buffers()):
        if tensor.ndim >= 2:
            tensor.normal_(0.0, std, generator=generator)
        else:
            tensor.uniform_(0.8, 1.2, generator=generator)
        if name.endswith("layer_scalar"):
            tensor.fill_(1.0)


@torch.no_grad()
def random_image_encoder(config: ModelConfig, seed: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """A random vision tower and projection for `config`, as the checkpoint names their tensors."""
    encoder = ImageEncoder(config.vision, config.hidden_size).to(dtype)
    generator = torch.Generator().manual_seed(seed + 1)
    for name, tensor in encoder.state_dict().items():
        if tensor.ndim >= 2:
            tensor.normal_(0.0, 0.02, generator=generator)
        elif name.endswith("weight"):
            tensor.uniform_(0.8, 1.2, generator=generator)
    return {TOWER_PREFIX + name: tensor for name, tensor in encoder.state_dict().items()}


def random_checkpoint(
    folder: str | os.PathLike,
    preset: str = "tiny",
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    max_shard_bytes: int | None = None,
    **text_overrides: Any,
) -> Path:
    """Write a random-weight checkpoint of a named shape (with a byte-level tokenizer) to `folder`."""
    raw = preset_config(preset, **text_overrides)
    config = parse_model_config(raw, f"preset {preset}")
    with torch.device("meta"):
        network = DiffusionGemma(config).to(dtype)
    # both checked before minutes of filling random weights (the 26B shape: 47 GiB in bf16)
    weights = held_bytes(network)
    name = str(dtype).removeprefix("torch.")
    check_memory(weights, torch.device(device), f"a random {preset} checkpoint's weights in {name}")
    check_disk(Path(folder).absolute(), weights)
    network = network.to_empty(device=device)
    init_random_(network, seed)
    vision = random_image_encoder(config, seed, dtype) if config.vision is not None else None
    staging = Path(folder).absolute().parent / f".{Path(folder).name}.tokenizer"
    write_tokenizer(staging, image_tokens=vision is not None)
    try:
        extra = {name: staging / name for name in (TOKENIZER_FILE, TOKENIZER_CONFIG, TEMPLATE_FILE)}
        kwargs = {} if max_shard_bytes is None else {"max_shard_bytes": max_shard_bytes}
        settings = SamplerSettings(eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id)
        return save_checkpoint(network, settings, folder, extra, vision, **kwargs)
    finally:
        for path in staging.iterdir():
            path.unlink()
        staging.rmdir()
