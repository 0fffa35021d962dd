"""Rows that join a running batch at once (a server's burst of new chats, or one request's n choices): how long
their prompts take to encode at the canvas boundary where they join.

bench-90m with random weights (or --model), a prefix cache with room for every row's snapshot. One chat runs
in an open batch; when its first canvas is committed, K new chats of about --words words each (N choices of
each) are added, and the encoder's time until the next step is summed: the running chat's canvas, then the
joining prompts. The first line (none joining) is that canvas alone. Median of --rounds.

    python bench/joins.py [--model DIR] [--words 40] [--rounds 3] [--results FILE]
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import append_results

import diffgemma
from diffgemma.open_batch import BatchRow, RowsCommitted, RowsStep
from diffgemma.presets import random_checkpoint

WORDS = ("the", "a", "sky", "blue", "light", "air", "scatters", "more", "than", "red", "so", "why", "canvas")
CASES = ((0, 1), (1, 1), (4, 1), (8, 1), (1, 4))  # (new chats, choices of each)


def chat(model, seed: int, words: int) -> list[int]:
    rng = random.Random(seed)
    text = " ".join(rng.choice(WORDS) for _ in range(words))
    return model.tokenizer.encode_chat([{"role": "user", "content": text}])


def boundary(model, chats: int, choices: int, words: int, encoded: list[float]) -> float:
    """Seconds the encoder ran at the canvas boundary where `chats` new chats (`choices` rows each) join a
    running one (`encoded` gets each call's seconds)."""
    canvas = model.config.canvas_length
    banned = tuple(model.settings.eos_token_id)  # (every row runs its canvases)
    model.prefix_cache.clear()
    batch = model.open_batch(max_denoising_steps=2)
    batch.add(BatchRow(chat(model, 0, words), 3 * canvas, 0, banned=banned))
    events, committed = batch.events(), False
    try:
        for event in events:
            if isinstance(event, RowsCommitted):
                for index in range(chats):
                    prompt = chat(model, 1 + index, words)
                    for seed in range(choices):
                        batch.add(BatchRow(prompt, canvas, seed, banned=banned))
                encoded.clear()
                committed = True
            elif isinstance(event, RowsStep) and committed:
                return sum(encoded)
    finally:
        events.close()
    raise RuntimeError("no step after the boundary")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default=None, help="a checkpoint folder (default: bench-90m, random weights)")
    parser.add_argument("--words", type=int, default=40, help="words of each new chat's question")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--results", default=None, help="append the section here instead of bench/RESULTS.md")
    args = parser.parse_args()
    if args.model:
        model, name = diffgemma.load(args.model), args.model
    else:
        with tempfile.TemporaryDirectory() as tmp:
            model, name = diffgemma.load(random_checkpoint(Path(tmp) / "bench", preset="bench-90m", seed=0)), None
    model.prefix_cache.entries = 1 + max(chats for chats, _ in CASES)
    encoded: list[float] = []
    encode = model.network.encode

    def timed(*given, **kwargs):
        started = time.perf_counter()
        try:
            return encode(*given, **kwargs)
        finally:
            encoded.append(time.perf_counter() - started)

    model.network.encode = timed
    rows = []
    for chats, choices in CASES:
        seconds = [boundary(model, chats, choices, args.words, encoded) for _ in range(args.rounds)]
        calls = len(encoded)
        cells = (chats, choices, calls, f"{statistics.median(seconds) * 1000:.0f}")
        rows.append("| " + " | ".join(map(str, cells)) + " |")
    prompt_tokens = len(chat(model, 1, args.words))
    table = "\n".join(
        [
            "| new chats joining | choices of each | encoder passes at the boundary | encoder ms there |",
            "|---|---|---|---|",
            *rows,
        ]
    )
    append_results(
        "Rows joining a running batch at once (bench/joins.py)",
        table,
        f"{name or 'bench-90m (random weights, byte-level tokenizer)'}, canvas {model.config.canvas_length}, "
        f"{model.network.dtype}; each new chat's prompt {prompt_tokens} tokens; median of {args.rounds} rounds. "
        "The passes include the running chat's canvas (the first line: that alone).",
        args.results,
    )


if __name__ == "__main__":
    main()
