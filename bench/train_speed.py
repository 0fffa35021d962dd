"""Training speed: optimizer steps of a full fine-tune with float32 products and under bf16 autocast.

The trainer runs its products in bf16 under autocast wherever the device multiplies bf16 in hardware
(`trainer.bf16_autocast`: CUDA GPUs and CPUs with AVX512-BF16 or AMX); DIFFGEMMA_AUTOCAST=0 keeps float32.
bench-90m with random weights (float32 weights and optimizer state either way), a batch of examples of a
128-token prompt and a 256-token response (one canvas), the block-diffusion objective; the same examples and
seed both ways, which take turns. Reports seconds an optimizer step (after the first), tokens/s and the losses.

    python bench/train_speed.py [--steps 4] [--batch 2] [--rounds 2] [--device cpu] [--results FILE]
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import append_results

import diffgemma
from diffgemma.presets import random_checkpoint
from diffgemma.train.objective import Example
from diffgemma.train.trainer import TrainConfig, bf16_autocast, train

WAYS = {"float32 products": "0", "bf16 autocast": "1"}


def timed_run(folder: Path, examples: list[Example], args) -> tuple[list[float], list[float]]:
    """(seconds of each optimizer step after the first, the losses) of a fresh model's run."""
    network = diffgemma.load(folder, device=args.device, dtype="float32").network
    stamps: list[float] = []
    config = TrainConfig(steps=args.steps, batch_size=args.batch, warmup=1, seed=0)
    losses = train(
        network,
        lambda step: examples,
        config,
        eos_id=1,
        pad_id=0,
        show_progress=False,
        on_step=lambda step, loss: stamps.append(time.perf_counter()),
    )
    return [b - a for a, b in itertools.pairwise(stamps)], losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps a run (the first is left out)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2, help="runs of each way, taking turns")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--results", default=None, help="append the section here instead of bench/RESULTS.md")
    args = parser.parse_args()
    if args.steps < 2:
        parser.error("--steps must be at least 2 (the first step is left out)")
    device = torch.device(args.device)
    if not bf16_autocast(device):
        print(f"note: {device} does not multiply bf16 in hardware; the trainer would not autocast here")
    generator = torch.Generator().manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        folder = random_checkpoint(Path(tmp) / "bench", preset="bench-90m", seed=0)
        vocab = diffgemma.load(folder).config.vocab_size

        def ids(length: int) -> list[int]:
            return torch.randint(3, vocab, (length,), generator=generator).tolist()

        examples = [Example(ids(128), ids(256), id=i) for i in range(args.batch)]
        seconds: dict[str, list[float]] = {way: [] for way in WAYS}
        losses: dict[str, list[float]] = {}
        for _ in range(args.rounds):
            for way, switch in WAYS.items():
                os.environ["DIFFGEMMA_AUTOCAST"] = switch  # read by the trainer as each run starts
                steps, losses[way] = timed_run(folder, examples, args)
                seconds[way].append(statistics.median(steps))
        os.environ.pop("DIFFGEMMA_AUTOCAST")
    tokens = args.batch * (128 + 256)
    base = statistics.median(seconds["float32 products"])
    rows = []
    for way, values in seconds.items():
        step = statistics.median(values)
        shown = ", ".join(f"{loss:.3f}" for loss in losses[way])
        rows.append(f"| {way} | {step:.2f} | {tokens / step:.0f} | {base / step:.2f}x | {shown} |")
    header = "| products | s an optimizer step | tokens/s | vs float32 | losses (last run) |"
    table = "\n".join([header, "|---|---|---|---|---|", *rows])
    append_results(
        "Training speed: float32 products or bf16 autocast (bench/train_speed.py)",
        table,
        f"bench-90m, random weights, a full fine-tune on {args.device}: batch {args.batch} of a 128-token prompt "
        f"and a 256-token response, {args.steps} optimizer steps a run (the first left out), {args.rounds} runs "
        "of each way in turn; a figure is the median over runs of each run's median step.",
        args.results,
    )


if __name__ == "__main__":
    main()
