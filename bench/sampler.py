"""Per-step time of the sampler modes on the CPU benchmark shape (bench-90m: ~90M parameters, 32k vocabulary,
canvas 256, prompt 128), how much of a step the sampler itself takes, and what top-k / top-p / min-p and the
penalties add (there, and on random logits of the 26B's vocabulary; and to a whole fast step, whose next pass reads
the cut distribution).

    python bench/sampler.py [--steps 16] [--threads N] [--exp-floor -50]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import gpu
from common import append_results

import diffgemma
from diffgemma import sampling
from diffgemma.generate import RandomSource, sampler_step
from diffgemma.presets import random_checkpoint


def time_it(fn, repeats: int) -> float:
    """Median ms of `fn` on the CPU (one call first, to warm up)."""
    return gpu.median_ms(fn, repeats, torch.device("cpu"), warmup=1)


CUTS = ({"top_k": 50}, {"top_p": 0.9}, {"min_p": 0.05}, {"top_k": 50, "top_p": 0.9})


def truncation_rows(logits: torch.Tensor, label: str, step_ms: float | None) -> list[str]:
    """A table row per cut: its ms a step, as the fast sampler cuts (logits divided by temperature 0.8, measured
    at 1)."""
    scale = torch.tensor(0.8)
    rows = []
    fast = {"scale": scale, "reference_arithmetic": False, "host_reads": True}  # (the CPU's fast sampler)
    for cut in CUTS:
        ms = time_it(lambda c=cut: sampling.truncate(logits.clone(), **fast, **c), 3)
        copy_ms = time_it(lambda: logits.clone(), 3)  # (the clone is not the cut's)
        share = f"{(ms - copy_ms) / step_ms:.0%}" if step_ms else ""
        rows.append(f"| {label} | {', '.join(f'{k} {v}' for k, v in cut.items())} | {ms - copy_ms:.1f} | {share} |")
    return rows


PENALTIES = (
    ("presence 0.5, frequency 0.5", {"presence": 0.5, "frequency": 0.5}, True),
    ("repetition 1.1, the CPU's way (seen tokens' logits)", {"repetition": 1.1}, True),
    ("repetition 1.1, an accelerator's way (every logit)", {"repetition": 1.1}, False),
)


def penalty_rows(logits: torch.Tensor, label: str, step_ms: float | None) -> list[str]:
    """A table row per penalty: its ms a step, with 300 tokens seen (a prompt and answer of a few hundred), each
    written once (logits divided by temperature 0.8)."""
    vocab = logits.shape[-1]
    counts = torch.zeros(1, vocab)
    counts[0, torch.randperm(vocab, generator=torch.Generator().manual_seed(1))[:300]] = 1
    rows = []
    copy_ms = time_it(lambda: logits.clone(), 3)
    for name, penalty, host_reads in PENALTIES:
        how = {**penalty, "scale": torch.tensor(0.8), "host_reads": host_reads}
        ms = time_it(lambda h=how: sampling.penalize(logits.clone(), counts, counts > 0, **h), 3) - copy_ms
        share = f"{ms / step_ms:.0%}" if step_ms else ""
        rows.append(f"| {label} | {name} | {ms:.1f} | {share} |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument(
        "--exp-floor", type=float, default=sampling.EXP_FLOOR, help="the fast sampler's (the first was -87)"
    )
    args = parser.parse_args()
    sampling.EXP_FLOOR = args.exp_floor
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        model = diffgemma.load(random_checkpoint(Path(tmp) / "bench", preset="bench-90m", seed=0))
    config = model.config
    torch.manual_seed(0)
    prompt = torch.randint(3, config.vocab_size, (1, 128))
    network = model.network
    cache = network.new_cache(1, 128 + config.canvas_length)
    canvas = torch.randint(0, config.vocab_size, (1, config.canvas_length))
    with torch.no_grad():
        network.encode(prompt, cache)
        logits = network.denoise(canvas, cache)
        probs = torch.softmax(logits, -1)
        denoise_ms = time_it(lambda: network.denoise(canvas, cache, probs), 5)
        scaled = logits / 0.8
        rows = []
        for label, sharpen in (("model's own (random weights)", 1.0), ("the same, sharpened x6", 6.0)):
            step_logits = scaled * sharpen
            accepted = int(sampling.entropy_bound_accept(sampling.logit_stats(step_logits)[1], 0.1).sum())
            for mode in ("reference", "fast"):
                rng = RandomSource(mode, 1, torch.device("cpu"), 0)
                ms = time_it(lambda lg=step_logits, r=rng: sampler_step(lg.clone(), canvas, 0.1, r), 10)
                rows.append((label, accepted, mode, ms))

        def whole_step_ms(mode: str, **cut) -> float:
            start = time.perf_counter()
            result = model.generate(
                prompt,
                max_new_tokens=config.canvas_length,
                mode=mode,
                seed=0,
                max_denoising_steps=args.steps,
                confidence_threshold=1e-9,
                **cut,
            )
            return (time.perf_counter() - start) * 1000 / sum(result.steps[0])

        step_ms = {mode: whole_step_ms(mode) for mode in ("reference", "fast")}
        cut_step_ms = {", ".join(f"{k} {v}" for k, v in cut.items()): whole_step_ms("fast", **cut) for cut in CUTS}
        for penalty in ({"frequency_penalty": 0.5, "presence_penalty": 0.5}, {"repetition_penalty": 1.1}):
            cut_step_ms[", ".join(f"{k} {v}" for k, v in penalty.items())] = whole_step_ms("fast", **penalty)
    table = ["| logits | accepted/step | mode | sampler ms/step | share of a step |", "|---|---|---|---|---|"]
    for label, accepted, mode, ms in rows:
        table.append(f"| {label} | {accepted} | {mode} | {ms:.1f} | {ms / (ms + denoise_ms):.0%} |")
    table.append("")
    table.append("| logits | cut | ms a step | share of a fast step |")
    table.append("|---|---|---|---|")
    table += truncation_rows(scaled, f"bench-90m's own, vocabulary {config.vocab_size}", step_ms["fast"])
    vocab_26b = torch.randn(1, config.canvas_length, 262_144, generator=torch.Generator().manual_seed(0)) * 3
    table += truncation_rows(vocab_26b, "random, vocabulary 262,144", None)
    # (nuclei of a few thousand tokens: past the first count of NUCLEUS_CANDIDATES, within the second)
    table += truncation_rows(vocab_26b * 1.5, "random x1.5, vocabulary 262,144", None)
    # (a trained model's distributions are far peakier than random logits: top-p 0.9 keeps ~200 tokens here)
    table += truncation_rows(vocab_26b * 2, "random x2, vocabulary 262,144", None)
    table.append("")
    table.append("| logits | penalty | ms a step | share of a fast step |")
    table.append("|---|---|---|---|")
    table += penalty_rows(scaled, f"bench-90m's own, vocabulary {config.vocab_size}", step_ms["fast"])
    table += penalty_rows(vocab_26b, "random, vocabulary 262,144", None)
    table.append("")
    table.append("| cut or penalty | whole fast step ms (generate, incl. prefill) | against none |")
    table.append("|---|---|---|")
    for label, ms in [("none", step_ms["fast"]), *cut_step_ms.items()]:
        table.append(f"| {label} | {ms:.1f} | {ms / step_ms['fast']:.2f}x |")
    table.append("")
    table.append("| mode | whole step ms (generate, incl. prefill) | decoder pass ms | speed-up |")
    table.append("|---|---|---|---|")
    for mode in ("reference", "fast"):
        speedup = step_ms["reference"] / step_ms[mode]
        table.append(f"| {mode} | {step_ms[mode]:.1f} | {denoise_ms:.1f} | {speedup:.2f}x |")
    append_results(
        "Sampler modes (bench/sampler.py)",
        "\n".join(table),
        f"bench-90m ({sum(network.config.parameter_counts()[:1]) / 1e6:.0f}M parameters, vocabulary "
        f"{config.vocab_size}), batch 1, prompt 128, canvas {config.canvas_length}, {args.steps} steps; the fast "
        f"sampler's exponential floored at {args.exp_floor:g}.",
    )


if __name__ == "__main__":
    main()
