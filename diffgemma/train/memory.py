"""What a training run holds whatever its batch: the weights, the gradients of what it trains, and AdamW's two
moments (and step count) for each trained tensor. Counted on a meta-device build of the network, so exact and
free; the activations a step adds on top depend on the batch, the sequence and the device (bench/train_memory.py
measures them)."""

from __future__ import annotations

import torch

from ..config import ModelConfig
from ..quant import QuantFormat, held_bytes, meta_network
from .lora import LoraSettings, add_lora, trainable_parameters

ADAMW_STEP_BYTES = 4  # AdamW keeps each trained tensor's step count as a float32 scalar


def training_state_bytes(
    config: ModelConfig, dtype: torch.dtype, fmt: QuantFormat | None = None, lora: LoraSettings | None = None
) -> dict[str, int]:
    """Bytes by part for training the network in `dtype` (its base quantized to `fmt`, for QLoRA), every weight
    or (`lora`) adapters alone: `weights` (all it holds, adapters included), `trained` (values trained),
    `gradients`, `optimizer` (AdamW's state)."""
    network = meta_network(config, dtype, fmt)
    if lora is not None:
        with torch.device("meta"):  # (the adapters too)
            add_lora(network, lora)
    trained = trainable_parameters(network)
    gradients, optimizer = update_bytes(trained)
    return {
        "weights": held_bytes(network),
        "trained": sum(p.numel() for p in trained),
        "gradients": gradients,
        "optimizer": optimizer,
    }


def update_bytes(trained: list[torch.nn.Parameter]) -> tuple[int, int]:
    """(bytes of the gradients of the `trained` tensors, bytes of AdamW's state for them)."""
    gradients = sum(p.numel() * p.element_size() for p in trained)
    return gradients, 2 * gradients + ADAMW_STEP_BYTES * len(trained)
