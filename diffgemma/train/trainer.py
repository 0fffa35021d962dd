"""A compact training loop: AdamW, warmup then cosine decay to a tenth of the peak, gradient clipping and
accumulation, bf16 autocast where the device has it, a progress bar, and exact resume.

Batches are a function of the step number (`batch_for_step`), and corruption is seeded per example, so a
run stopped and resumed from a checkpoint sees exactly the data and noise an unbroken run would.
"""

from __future__ import annotations

import math
import os
import random
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

from ..api import bf16_is_fast
from ..errors import DiffGemmaError
from ..model import DiffusionGemma
from ..resources import check_memory, writing
from .lora import trainable_parameters
from .memory import update_bytes
from .objective import Batch, Example, autoregressive_loss, block_diffusion_loss, make_batch

OBJECTIVES = {"diffusion", "autoregressive"}

STATE_FILE = "trainer_state.pt"


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
    objective: str = "diffusion"  # or "autoregressive": the left-to-right baseline on the same network
    # the caller's data options, (name, value): a resumed run must be given the same ones
    recipe: tuple[tuple[str, object], ...] = ()

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise DiffGemmaError(f"objective must be one of {sorted(OBJECTIVES)}, got {self.objective!r}")


def learning_rate(step: int, config: TrainConfig) -> float:
    """Linear warmup to the peak, then cosine decay to peak/10 at the last step."""
    if step < config.warmup:
        return config.peak_lr * (step + 1) / config.warmup
    progress = (step - config.warmup) / max(1, config.steps - config.warmup)
    return config.peak_lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def epoch_batches(examples: Sequence[Example], batch_size: int, seed: int) -> Callable[[int], list[Example]]:
    """Batches over a fixed list, reshuffled each epoch; batch k is the same whenever it is asked for."""
    pool = list(examples)
    if not pool:
        raise DiffGemmaError("no training examples")
    per_epoch = max(1, len(pool) // batch_size)

    def batch(index: int) -> list[Example]:
        epoch, offset = divmod(index, per_epoch)
        order = list(pool)
        random.Random(seed * 1_000_003 + epoch).shuffle(order)
        chosen = order[offset * batch_size : (offset + 1) * batch_size] or order[:batch_size]
        return [Example(e.prompt, e.response, e.id + epoch * len(pool)) for e in chosen]

    return batch


def save_state(folder: Path, step: int, optimizer: torch.optim.Optimizer, config: TrainConfig, losses: list[float]):
    """Optimizer and progress beside the weights, written atomically."""
    with writing(folder):
        folder.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(prefix=".trainer_state.", dir=folder)
        os.close(handle)
        try:
            payload = {"step": step, "optimizer": optimizer.state_dict(), "config": asdict(config), "losses": losses}
            torch.save(payload, temporary)
            os.replace(temporary, folder / STATE_FILE)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise


def check_same_run(path: Path, saved: dict, config: TrainConfig) -> None:
    """Refuse to resume with settings other than the run's own: it would not continue that run. The step
    count may grow (the schedule stretches to it); a setting an older state did not record is not checked."""
    before, now = _settings(saved), _settings(asdict(config))
    changed = [
        f"{name} {before[name]} (now {now[name]})"
        for name in now
        if name != "steps" and name in before and before[name] != now[name]
    ]
    if changed:
        raise DiffGemmaError(
            f"{path}: the run was started with {', '.join(changed)}; resume it with the options it started with"
        )


def _settings(config: dict) -> dict[str, str]:
    """A config's settings by name, the recipe's entries among them, as text (a tuple saved reads back the
    same as a list given)."""
    flat = {name: value for name, value in config.items() if name != "recipe"}
    flat.update((name, value) for name, value in config.get("recipe", ()))
    return {name: str(list(v) if isinstance(v, tuple | list) else v) for name, v in flat.items()}


@torch.no_grad()
def evaluation_loss(
    network: DiffusionGemma, examples: Sequence[Example], config: TrainConfig, eos_id: int, pad_id: int
) -> float:
    """Mean loss over held-out examples with fixed corruption (the same every time it is asked for)."""
    was_training = network.training
    network.eval()
    objective = Objective(network, config)
    total, count = 0.0, 0
    for start in range(0, len(examples), config.batch_size):
        chunk = list(examples[start : start + config.batch_size])
        batch = make_batch(
            chunk, network.config.canvas_length, network.config.vocab_size, eos_id, pad_id, config.seed, -1
        )
        total += float(objective(batch)) * len(chunk)
        count += len(chunk)
    network.train(was_training)
    return total / max(1, count)


class Objective(torch.nn.Module):
    """The loss as a module's forward, so DistributedDataParallel can wrap it (its gradient hooks and
    all-reduce run on every backward); the network inside is the same one inference runs."""

    def __init__(self, network: DiffusionGemma, config: TrainConfig) -> None:
        super().__init__()
        self.network = network
        self.config = config

    def forward(self, batch) -> torch.Tensor:
        if self.config.objective == "autoregressive":
            return autoregressive_loss(self.network, batch).total
        return block_diffusion_loss(self.network, batch, self.config.ar_weight).total


def _distributed() -> tuple[int, int]:
    """(rank, world size) under torchrun, else (0, 1)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def bf16_autocast(device: torch.device) -> bool:
    """Whether training runs its products in bf16 under autocast (weights and optimizer state stay float32): on
    CUDA GPUs and CPUs that multiply bf16 in hardware (`bf16_is_fast`; a bench-90m step on an AMD EPYC with
    AVX512-BF16: 4.0 s against 6.2 in float32, the same losses to 0.2%, bench/train_speed.py).
    DIFFGEMMA_AUTOCAST=0 keeps float32."""
    if os.environ.get("DIFFGEMMA_AUTOCAST") == "0" or device.type not in ("cuda", "cpu"):
        return False
    return bf16_is_fast(device)


def train(
    network: DiffusionGemma,
    batch_for_step: Callable[[int], list[Example] | Batch],
    config: TrainConfig,
    eos_id: int,
    pad_id: int,
    on_step: Callable[[int, float], None] | None = None,
    show_progress: bool = True,
    checkpoint: Callable[[int, torch.optim.Optimizer, list[float]], None] | None = None,
    checkpoint_every: int = 0,
    resume_from: Path | None = None,
    stop_at: int | None = None,
    deadline: float | None = None,
) -> list[float]:
    """Train `network` in place; returns the loss of every optimizer step (including resumed ones).

    Under `torchrun` (a process group initialised), the loss runs inside DistributedDataParallel and each
    rank takes its own micro-batches, so every rank ends each step with the same averaged gradients; rank 0
    alone calls `checkpoint`.

    `batch_for_step(k)` gives the k-th micro-batch: examples, or a `Batch` already laid out (a task that
    makes its batches on the device). `checkpoint(step, optimizer, losses)` is called every
    `checkpoint_every` steps and at the end; `resume_from` is a folder with a trainer state to continue
    from. `stop_at` ends early (after that many steps) without changing the schedule; so does `deadline` (a
    `time.monotonic()` value), after the step that passes it.
    """
    network.train()
    trainable = trainable_parameters(network)  # only the adapters, when the network has LoRA adapters
    # refused before the first step rather than in its backward pass (the activations come on top)
    check_memory(sum(update_bytes(trainable)), network.device, "training's gradients and AdamW's state")
    for parameter in trainable:
        parameter.requires_grad_(True)
    rank, world = _distributed()
    if rank != 0:  # the ranks hold the same weights: one of them writes them
        checkpoint = None
    objective: torch.nn.Module = Objective(network, config)
    if world > 1:
        # Every parameter takes part in every step (the experts are stacked tensors used whole by the
        # grouped matmuls), so DDP needs no search for unused ones.
        objective = torch.nn.parallel.DistributedDataParallel(objective)
    optimizer = torch.optim.AdamW(trainable, lr=config.peak_lr, betas=config.betas, weight_decay=config.weight_decay)
    start, losses = 0, []
    if resume_from is not None:
        path = Path(resume_from) / STATE_FILE
        if not path.is_file():
            raise DiffGemmaError(f"{path}: no trainer state to resume from")
        state = torch.load(path, map_location=network.device, weights_only=False)
        check_same_run(path, state["config"], config)
        optimizer.load_state_dict(state["optimizer"])
        start, losses = state["step"], list(state["losses"])
    autocast = bf16_autocast(network.device)
    end = min(config.steps, stop_at if stop_at is not None else config.steps)
    columns = (
        TextColumn("training"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} loss {task.fields[loss]} {task.fields[speed]} tokens/s"),
    )
    with Progress(*columns, TimeRemainingColumn(), disable=not show_progress or rank != 0) as progress:
        task = progress.add_task("train", total=config.steps, completed=start, loss="-", speed="-")
        tokens, started = 0, time.perf_counter()
        for step in range(start, end):
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(step, config)
            total = 0.0
            for micro in range(config.accumulation):
                chunk = batch_for_step((step * config.accumulation + micro) * world + rank)
                batch = (
                    chunk
                    if isinstance(chunk, Batch)
                    else make_batch(
                        chunk, network.config.canvas_length, network.config.vocab_size, eos_id, pad_id, config.seed, 0
                    )
                )
                tokens += batch.tokens * world
                with torch.autocast(network.device.type, dtype=torch.bfloat16, enabled=autocast):
                    loss = objective(batch) / config.accumulation
                loss.backward()
                total += loss.item()
            torch.nn.utils.clip_grad_norm_(trainable, config.clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(total)
            if on_step is not None:
                on_step(step, total)
            speed = tokens / max(1e-9, time.perf_counter() - started)
            progress.update(task, advance=1, loss=f"{total:.3f}", speed=f"{speed:,.0f}")
            done = step + 1
            if deadline is not None and time.monotonic() > deadline:
                end = done
                break
            if checkpoint is not None and checkpoint_every and done % checkpoint_every == 0 and done < end:
                checkpoint(done, optimizer, losses)
        if checkpoint is not None and end > start:
            checkpoint(end, optimizer, losses)
    network.eval()
    network.requires_grad_(False)
    return losses
