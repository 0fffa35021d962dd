"""Where the time of a step goes on a GPU, and which lines make the host wait: one short device call.

For a denoising step and an autoregressive token of the `bench-90m` shape, and a sudoku training step, it
prints the top operators by GPU time and by host time (torch.profiler), and the Python stack of every
call that synchronises with the host (torch.cuda.set_sync_debug_mode) during one step of each.

    python bench/gpu_profile.py --out DIR      # tables and stacks, also written to DIR/profile.txt
"""

from __future__ import annotations

import argparse
import random
import sys
import time
import traceback
import warnings
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).parent))
from gpu import ar_token, denoise_step

from diffgemma.config import parse_model_config
from diffgemma.model import DiffusionGemma
from diffgemma.presets import init_random_, preset_config
from diffgemma.tasks import sudoku
from diffgemma.train.trainer import Objective, TrainConfig

REPORT: list[str] = []


def say(text: str) -> None:
    print(text, flush=True)
    REPORT.append(text)


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def synchronize() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def build(shape: str, dtype: torch.dtype) -> DiffusionGemma:
    config = parse_model_config(preset_config(shape), shape)
    with torch.device("meta"):
        network = DiffusionGemma(config)
    network = network.to(dtype).to_empty(device=DEVICE)
    init_random_(network, 0)
    return network.eval()


def sync_stacks(label: str, fn) -> None:
    """Run fn once with sync debugging on; print where each synchronising call came from."""
    stacks: list[str] = []

    if not torch.cuda.is_available():
        return

    def hook(message, category, filename, lineno, file=None, line=None):
        if "prototype" in str(message):
            return
        frames = [f for f in traceback.format_stack()[:-2] if "/diffgemma/" in f or "/bench/" in f]
        stacks.append(f"{str(message).splitlines()[0][:120]}\n" + "".join(frames[-4:]))

    previous = warnings.showwarning
    warnings.showwarning = hook
    warnings.simplefilter("always")
    synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        fn()
    finally:
        torch.cuda.set_sync_debug_mode("default")
        warnings.showwarning = previous
    say(f"--- {label}: {len(stacks)} synchronising calls")
    for stack in stacks[:6]:
        say(stack)


def profile_table(label: str, fn, steps: int) -> None:
    for _ in range(3):
        fn()
    synchronize()
    started = time.perf_counter()
    for _ in range(steps):
        fn()
    synchronize()
    ms = (time.perf_counter() - started) * 1000 / steps
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if DEVICE == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            fn()
        synchronize()
    averages = prof.key_averages()
    say(f"=== {label}: {ms:.1f} ms a call (unprofiled, mean of {steps})")
    for key in ("self_device_time_total", "self_cpu_time_total"):
        try:
            say(averages.table(sort_by=key, row_limit=14, max_name_column_width=60))
        except Exception as err:  # older names
            say(f"(table by {key} failed: {err})")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=".")
    args = parser.parse_args()
    warnings.filterwarnings("ignore", message="Synchronization debug mode")
    network = build("bench-90m", torch.bfloat16)
    with torch.no_grad():
        step = denoise_step(network, 1, 128)
        token = ar_token(network, 1, 128, 64)
        step()
        token()
        sync_stacks("denoising step (bench-90m, bf16)", step)
        sync_stacks("AR token (bench-90m, bf16)", token)
        profile_table("denoising step (bench-90m, bf16, batch 1)", step, 5)
        profile_table("AR token (bench-90m, bf16, batch 1)", token, 10)
    del network

    network = build("sudoku", torch.float32).train()
    for parameter in network.parameters():
        parameter.requires_grad_(True)
    pool = sudoku.puzzle_pool(0, 16, (30, 36))
    batch_size = 512 if DEVICE == "cuda" else 4
    batches = sudoku.DeviceBatches(pool, batch_size, 0, DEVICE, network.config.vocab_size)
    objective = Objective(network, TrainConfig(ar_weight=0.0))
    optimizer = torch.optim.AdamW(network.parameters(), lr=1e-4)
    counter = iter(range(10**6))

    def train_step():
        with torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=DEVICE == "cuda"):
            loss = objective(batches(next(counter)))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    random.seed(0)
    train_step()
    sync_stacks("sudoku training step (batch 512)", train_step)
    profile_table("sudoku training step (batch 512, bf16 autocast)", train_step, 3)
    Path(args.out, "profile.txt").write_text("\n".join(REPORT))


if __name__ == "__main__":
    main()
