"""The server under two requests at once: a short answer asked for while a long one is being denoised: with one
batch at a time (`serve --max-runs 1`: the short one joins the long one's batch after its canvas), with two
taking steps in turn (the CPU's default), and with two where a request joins a running batch first
(`--join-first`, the GPU's default).

bench-90m with random weights (or --model), EOS banned so every canvas runs; the long request is several
canvases, the short one one canvas. The short request is sent once the long one's batch has started; the table
gives how long the short one took (alone, for reference, and beside the long one) and how long the long one
took from then on, the median of --rounds.

    python bench/server.py [--model DIR] [--long-canvases 4] [--steps 16] [--rounds 3] [--results FILE]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))
from common import append_results
from server_util import running

import diffgemma
from diffgemma.presets import random_checkpoint
from diffgemma.server import ServerOptions, create_app
from diffgemma.server.batcher import Batcher


def ask(url: str, question: str, max_tokens: int, extra: dict) -> float:
    """Seconds a chat completion took to come back."""
    started = time.perf_counter()
    body = {"model": "bench", "messages": [{"role": "user", "content": question}], "max_tokens": max_tokens, **extra}
    response = httpx.post(url + "/v1/chat/completions", json=body, timeout=3600)
    response.raise_for_status()
    return time.perf_counter() - started


def one_round(
    model, runs: int, join_first: bool, long_tokens: int, short_tokens: int, extra: dict
) -> tuple[float, float, float]:
    """(short alone, short beside the long one, the long one from the short one's start), seconds."""
    batcher = Batcher(model, max_batch=8, max_runs=runs, join_first=join_first)
    app = create_app(model, ServerOptions(model_name="bench", max_tokens=long_tokens), batcher)
    with running(app) as url:
        alone = ask(url, "Say hello.", short_tokens, extra)
        ended: list[float] = []

        def long_answer() -> None:
            ask(url, "Tell me a long story.", long_tokens, extra)
            ended.append(time.perf_counter())

        long = threading.Thread(target=long_answer)
        long.start()
        while len(batcher.batches_run) < 2:  # the long answer's batch has started
            time.sleep(0.01)
        began = time.perf_counter()
        beside = ask(url, "Say hello.", short_tokens, extra)
        long.join()
    return alone, beside, ended[0] - began


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default=None, help="a checkpoint folder (default: bench-90m, random weights)")
    parser.add_argument("--long-canvases", type=int, default=4)
    parser.add_argument("--steps", type=int, default=16, help="denoising steps a canvas (no early stop)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--results", default=None, help="append the section here instead of bench/RESULTS.md")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.model or random_checkpoint(Path(tmp) / "bench", preset="bench-90m", seed=0)
        model = diffgemma.load(folder)
    canvas = model.config.canvas_length
    banned = {str(eos): -100 for eos in model.settings.eos_token_id}
    extra = {"seed": 1, "logit_bias": banned, "max_denoising_steps": args.steps, "confidence_threshold": 1e-9}
    rows = []
    for runs, join_first, label in ((1, False, "--max-runs 1"), (2, False, "--max-runs 2"), (2, True, "--join-first")):
        times = [
            one_round(model, runs, join_first, args.long_canvases * canvas, canvas, extra) for _ in range(args.rounds)
        ]
        alone, beside, long = (statistics.median(kind) for kind in zip(*times, strict=True))
        rows.append(f"| {label} | {alone:.1f} | {beside:.1f} | {long:.1f} |")
    table = "\n".join(
        [
            "| server | short answer alone, s | short answer beside the long one, s | the long one from then, s |",
            "|---|---|---|---|",
            *rows,
        ]
    )
    append_results(
        "The server: a short answer asked for during a long one (bench/server.py)",
        table,
        f"{Path(folder).name if args.model else 'bench-90m (random weights)'}, {model.network.dtype}, canvas "
        f"{canvas}; the long answer {args.long_canvases} canvases, the short one 1, each canvas {args.steps} steps "
        f"(EOS banned, no early stop); median of {args.rounds} rounds.",
        args.results,
    )


if __name__ == "__main__":
    main()
