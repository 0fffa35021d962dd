"""A compact training loop: AdamW, warmup then cosine decay to a tenth of the peak, gradient clipping and
accumulation, bf16 autocast where the device has it, and a progress bar."""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

from ..model import DiffusionGemma
from .objective import Example, block_diffusion_loss, make_batch


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 1000
    batch_size: int = 16
    accumulation: int = 1
    peak_lr: float = 1e-3
    warmup: int = 100
    weight_decay: float = 1e-4
    betas: tuple[float, float] = (0.95, 0.99)
    clip: float = 1.0
    ar_weight: float = 1.0
    seed: int = 0


def learning_rate(step: int, config: TrainConfig) -> float:
    """Linear warmup to the peak, then cosine decay to peak/10 at the last step."""
    if step < config.warmup:
        return config.peak_lr * (step + 1) / config.warmup
    progress = (step - config.warmup) / max(1, config.steps - config.warmup)
    return config.peak_lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def train(
    network: DiffusionGemma,
    examples: Sequence[Example],
    config: TrainConfig,
    eos_id: int,
    pad_id: int,
    on_step: Callable[[int, float], None] | None = None,
    show_progress: bool = True,
) -> list[float]:
    """Train `network` in place on `examples`; returns the loss of every optimizer step."""
    network.train()
    network.requires_grad_(True)
    optimizer = torch.optim.AdamW(
        network.parameters(), lr=config.peak_lr, betas=config.betas, weight_decay=config.weight_decay
    )
    order = random.Random(config.seed)
    pool = list(examples)
    autocast = network.device.type == "cuda" and torch.cuda.is_bf16_supported()
    losses = []
    cursor, epoch = len(pool), -1
    columns = (
        TextColumn("training"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} loss {task.fields[loss]}"),
    )
    with Progress(*columns, TimeRemainingColumn(), disable=not show_progress) as progress:
        task = progress.add_task("train", total=config.steps, loss="-")
        for step in range(config.steps):
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(step, config)
            total = 0.0
            for _ in range(config.accumulation):
                if cursor + config.batch_size > len(pool):
                    order.shuffle(pool)
                    cursor, epoch = 0, epoch + 1
                chunk = pool[cursor : cursor + config.batch_size]
                cursor += config.batch_size
                batch = make_batch(
                    chunk, network.config.canvas_length, network.config.vocab_size, eos_id, pad_id, config.seed, epoch
                )
                with torch.autocast(network.device.type, dtype=torch.bfloat16, enabled=autocast):
                    loss = block_diffusion_loss(network, batch, config.ar_weight).total / config.accumulation
                loss.backward()
                total += loss.item()
            torch.nn.utils.clip_grad_norm_(network.parameters(), config.clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(total)
            if on_step is not None:
                on_step(step, total)
            progress.update(task, advance=1, loss=f"{total:.3f}")
    network.eval()
    network.requires_grad_(False)
    return losses
