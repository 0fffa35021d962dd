"""What serving LoRA adapters beside the model costs (`serve --lora-modules`, `DiffGemma.add_adapter`): a
denoising pass with the base model alone, with adapters kept but none in place, with one in place (unfolded:
each adapted projection adds its update), and with the same adapter folded into the weights (`--adapter`);
how long switching between adapters takes; and rows of two adapters in one pass (as the server batches
requests for several) against a pass for each adapter's row.

bench-90m with random weights (float32 on the CPU, bf16 on a GPU), prompt 128, canvas 256, batch 1; adapters on
every attention and dense-MLP projection (PEFT's widest usual pick), random matrices.

    python bench/adapters.py [--ranks 16,64] [--repeats 5] [--results FILE]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import append_results
from gpu import median_ms

import diffgemma
from diffgemma.presets import random_checkpoint
from diffgemma.train.lora import LoraSettings, add_lora, save_adapter

PROMPT, BATCH = 128, 1


def random_adapter(folder: Path, rank: int, out: Path) -> Path:
    """An adapter of `rank` on every layer projection, its B matrices random (a trained adapter's are not zero)."""
    model = diffgemma.load(folder)
    settings = LoraSettings(rank=rank, alpha=2.0 * rank)
    add_lora(model.network, settings)
    generator = torch.Generator().manual_seed(rank)
    with torch.no_grad():
        for name, param in model.network.named_parameters():
            if name.endswith("lora_B.weight"):
                param.copy_(torch.randn(param.shape, generator=generator) * 0.01)
    return save_adapter(model.network, settings, out)


def pass_ms(model, repeats: int, batch: int = BATCH, before=lambda: None) -> float:
    """The median ms of one decoder pass of `batch` rows over a 256-token canvas, the prompt's cache encoded once;
    `before()` runs ahead of each pass (and the encoding), adapters put in place, say."""
    network, config = model.network, model.config
    generator = torch.Generator().manual_seed(0)
    prompt = torch.randint(3, config.vocab_size, (batch, PROMPT), generator=generator).to(model.device)
    canvas = torch.randint(3, config.vocab_size, (batch, config.canvas_length), generator=generator).to(model.device)
    with torch.no_grad():
        cache = network.new_cache(batch, PROMPT + config.canvas_length)
        before()
        network.encode(prompt, cache, return_hidden=False)
        return median_ms(lambda: (before(), network.denoise(canvas, cache)), repeats, model.device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", default="16,64")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--results", default=None, help="append to this file instead of bench/RESULTS.md")
    args = parser.parse_args()
    ranks = [int(rank) for rank in args.ranks.split(",")]
    with tempfile.TemporaryDirectory() as scratch:
        folder = random_checkpoint(Path(scratch) / "bench-90m", preset="bench-90m", seed=0)
        adapters = {rank: random_adapter(folder, rank, Path(scratch) / f"rank{rank}") for rank in ranks}
        plain = diffgemma.load(folder)
        rows = [("base model alone", pass_ms(plain, args.repeats))]
        served = diffgemma.load(folder)
        for rank, adapter in adapters.items():
            served.add_adapter(f"rank{rank}", adapter)
        rows.append(("adapters kept, none in place", pass_ms(served, args.repeats)))
        for rank, adapter in adapters.items():
            served.use_adapter(f"rank{rank}")
            rows.append((f"rank {rank} in place (unfolded)", pass_ms(served, args.repeats)))
            folded = diffgemma.load(folder)
            folded.load_adapter(adapter)
            rows.append((f"rank {rank} folded in (--adapter)", pass_ms(folded, args.repeats)))
        names = [f"rank{rank}" for rank in ranks]
        switches = [names[i % len(names)] if i % 2 else None for i in range(2 * len(names))]
        switch_ms = median_ms(lambda: [served.use_adapter(name) for name in switches], args.repeats, served.device)
        pair = [names[0], names[-1]]
        mixed = served._bank.for_rows(pair)  # (what an open batch of the two rows puts in place)
        shared = [
            ("a pass of both rows, the base model's (no adapter)", pass_ms(plain, args.repeats, 2)),
            ("a pass of both rows, each with its adapter", pass_ms(served, args.repeats, 2, mixed)),
            (
                "a pass for each row (its adapter put in place)",
                sum(pass_ms(served, args.repeats, 1, lambda name=name: served.use_adapter(name)) for name in pair),
            ),
        ]
    base = rows[0][1]
    table = "| weights | ms a decoder pass | against the base |\n|---|---|---|\n"
    table += "".join(f"| {what} | {ms:.1f} | {ms / base:.2f}x |\n" for what, ms in rows)
    notes = (
        f"bench-90m (random weights, {plain.dtype}), prompt {PROMPT}, canvas {plain.config.canvas_length}, batch "
        f"{BATCH}; adapters on every attention and dense-MLP projection; median of {args.repeats}. Switching "
        f"between adapters (use_adapter): {switch_ms / len(switches):.3f} ms a switch."
    )
    table += f"\n| two requests: {pair[0]} and {pair[1]} | ms a step of both |\n|---|---|\n"
    table += "".join(f"| {what} | {ms:.1f} |\n" for what, ms in shared)
    append_results("LoRA adapters served beside the model (bench/adapters.py)", table, notes, args.results)


if __name__ == "__main__":
    main()
