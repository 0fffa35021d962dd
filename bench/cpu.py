"""diffgemma against the reference `transformers` implementation on the CPU, side by side in one process.

The fixed mid-size shape (bench-90m: about 90M parameters, vocabulary 32k, canvas 256), prompt 128, batch 1,
16 denoising steps a canvas (no early stop), the same random weights for both (float32, or both in `--dtype
bfloat16`, which CPUs with bf16 instructions multiply several times faster), the implementations taking turns
over a few rounds. Reports ms per denoising step (decoder pass + sampler, timed between consecutive drafts),
its range over the rounds, tokens/s at 16 steps, the speed-up within each round, and resident memory.

    python bench/cpu.py [--steps 16] [--canvases 2] [--rounds 3] [--dtype float32] [--results FILE]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import append_results, peak_resident_gib, resident_gib

import diffgemma
from diffgemma.generate import Draft
from diffgemma.presets import random_checkpoint


def step_times_ours(model, prompt, steps: int, canvases: int, mode: str) -> list[float]:
    marks = []
    stream = model.stream(
        prompt,
        max_new_tokens=canvases * model.config.canvas_length,
        seed=0,
        mode=mode,
        max_denoising_steps=steps,
        confidence_threshold=1e-9,
        eos_token_id=[],
    )
    last = time.perf_counter()
    for event in stream:
        now = time.perf_counter()
        if isinstance(event, Draft) and event.step > 1:  # step 1 includes the prefill or the canvas encode
            marks.append(now - last)
        last = time.perf_counter()
    return marks


class DraftTimer:
    """A streamer for the reference `generate`: records the time between consecutive drafts."""

    def __init__(self) -> None:
        self.marks: list[float] = []
        self.last = time.perf_counter()
        self.step = 0

    def put(self, value) -> None:
        self.last = time.perf_counter()
        self.step = 0

    def put_draft(self, value=None, logits=None) -> None:
        now = time.perf_counter()
        self.step += 1
        if self.step > 1:
            self.marks.append(now - self.last)
        self.last = now

    def end(self) -> None:
        pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--canvases", type=int, default=2, help="canvases a round, each implementation")
    parser.add_argument("--rounds", type=int, default=3, help="rounds, the implementations taking turns")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="both implementations")
    parser.add_argument("--results", default=None, help="append the section here instead of bench/RESULTS.md")
    args = parser.parse_args()
    if args.steps < 2 or min(args.canvases, args.rounds) < 1:
        parser.error("--steps must be at least 2 (a canvas's first step is left out), --canvases and --rounds 1")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    from transformers import DiffusionGemmaForBlockDiffusion

    ours_modes = {"diffgemma (fast sampler)": "fast", "diffgemma (reference sampler)": "reference"}
    reference_name = "transformers 5.23 (reference)"
    with tempfile.TemporaryDirectory() as tmp:
        folder = random_checkpoint(Path(tmp) / "bench", preset="bench-90m", seed=0)
        base = resident_gib()
        model = diffgemma.load(folder, dtype=args.dtype)
        ours_loaded = resident_gib()
        config = model.config
        torch.manual_seed(0)
        prompt = torch.randint(3, config.vocab_size, (1, 128))
        for mode in ours_modes.values():
            step_times_ours(model, prompt, 3, 1, mode)  # warm up
        ours_peak = peak_resident_gib()
        reference = DiffusionGemmaForBlockDiffusion.from_pretrained(folder, dtype=model.dtype).eval()
        reference_loaded = resident_gib()
        settings = dict(max_denoising_steps=args.steps, confidence_threshold=1e-9, eos_token_id=None, pad_token_id=None)

        def reference_marks(canvases: int, steps: int) -> list[float]:
            timer = DraftTimer()
            with torch.no_grad():
                reference.generate(
                    prompt,
                    max_new_tokens=canvases * config.canvas_length,
                    streamer=timer,
                    **{**settings, "max_denoising_steps": steps},
                )
            return timer.marks

        reference_marks(1, 3)  # warm up
        # The implementations take turns, round after round: a shared machine's speed drifts over minutes,
        # and turns expose every implementation to the same drift (the ratio is also taken within each round).
        round_medians: dict[str, list[float]] = {name: [] for name in [*ours_modes, reference_name]}
        round_ratios = []
        for _ in range(args.rounds):
            medians = {}
            for name, mode in ours_modes.items():
                medians[name] = statistics.median(step_times_ours(model, prompt, args.steps, args.canvases, mode))
            medians[reference_name] = statistics.median(reference_marks(args.canvases, args.steps))
            for name, value in medians.items():
                round_medians[name].append(value)
            round_ratios.append(medians[reference_name] / medians["diffgemma (fast sampler)"])
        reference_peak = peak_resident_gib()
    results = {name: statistics.median(values) for name, values in round_medians.items()}
    reference_ms = results[reference_name] * 1000
    rows = []
    for name, seconds in results.items():
        ms = seconds * 1000
        tokens_per_second = config.canvas_length / (args.steps * seconds)
        spread = f"{min(round_medians[name]) * 1000:.0f}-{max(round_medians[name]) * 1000:.0f}"
        rows.append(f"| {name} | {ms:.0f} | {spread} | {tokens_per_second:.1f} | {reference_ms / ms:.2f}x |")
    table = "\n".join(
        [
            f"| implementation | ms per denoising step | rounds' range | tokens/s at {args.steps} steps "
            "| vs reference |",
            "|---|---|---|---|---|",
            *rows,
        ]
    )
    within = ", ".join(f"{ratio:.2f}x" for ratio in round_ratios)
    memory = (
        f"Resident memory: interpreter {base:.2f} GB; diffgemma loaded {ours_loaded:.2f} GB, peak {ours_peak:.2f} GB; "
        f"then the reference loaded {reference_loaded:.2f} GB (it also builds a default vision tower), "
        f"peak {reference_peak:.2f} GB."
    )
    append_results(
        f"CPU: diffgemma vs transformers, {args.dtype} (bench/cpu.py)",
        table,
        f"bench-90m ({config.parameter_counts()[0] / 1e6:.0f}M parameters, vocabulary {config.vocab_size}), "
        f"prompt 128, canvas {config.canvas_length}, batch 1, {args.steps} steps a canvas, {args.dtype}. Each of "
        f"{args.rounds} rounds times {args.canvases} canvases of every implementation in turn; a figure is the "
        f"median over rounds of each round's median step (the first step of a canvas, which includes encoding, "
        f"is left out). The fast sampler against the reference within each round: {within}.\n{memory}",
        args.results,
    )


if __name__ == "__main__":
    main()
