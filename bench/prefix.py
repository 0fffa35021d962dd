"""A chat's next turn with and without the prefix cache: how long until its first draft, and how many prompt
tokens it encodes; alone, joining a batch under way (a server's other user), and a new conversation that opens
with a system turn the cache keeps.

bench-90m with random weights (byte-level tokenizer, the Gemma 4 style chat template). A conversation of
alternating turns is grown to about each length; the turn before the last is generated first (the cache keeps
its prompt, up to its last turn's opening), then the last turn is timed to its first draft (the prompt encoded,
one decoder pass, the sampler), the median of --rounds, each round with and without the cache. Joining: another
conversation, longer, runs in an open batch; the turn joins it when its first canvas is committed, timed from
there to the turn's first draft (the other's canvas encoded, the turn's prompt encoded, a pass of both rows).
A new conversation: a system turn of about each length and a short question, to its first draft, with no shared
system turn kept and with the one another conversation (the same system turn) kept.

    python bench/prefix.py [--lengths 1024,2048,4096] [--rounds 3] [--results FILE]
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
from diffgemma.cache import PrefixCache
from diffgemma.generate import Draft
from diffgemma.open_batch import BatchRow, RowsCommitted, RowsStep
from diffgemma.presets import random_checkpoint
from diffgemma.tokenizer import TURN_OPEN

WORDS = ("the", "a", "sky", "blue", "light", "air", "scatters", "more", "than", "red", "so", "why", "canvas", "step")


def conversation(tokens: int, seed: int) -> list[dict]:
    """Alternating user and assistant turns of random words, about `tokens` long (bytes, one token each), and a
    last user question."""
    rng = random.Random(seed)
    messages, size = [], 0
    while size < tokens or len(messages) < 3:
        text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 60)))
        messages.append({"role": "user" if len(messages) % 2 == 0 else "assistant", "content": text})
        size += len(text) + 8
    if messages[-1]["role"] == "user":
        messages.pop()
    return [*messages, {"role": "user", "content": "Why is the sky blue?"}]


def system_turn(tokens: int, seed: int) -> dict:
    """A system turn of random words, about `tokens` long: an assistant's instructions."""
    rng = random.Random(seed)
    words = []
    while sum(len(word) + 1 for word in words) < tokens:
        words.append(rng.choice(WORDS))
    return {"role": "system", "content": " ".join(words)}


def first_draft(model, messages: list[dict], counts: list[int]) -> float:
    """Seconds until the first draft of a chat turn; `counts` gets the token counts its encoder is given."""
    counts.clear()
    prompt = model.tokenizer.encode_chat(messages)
    started = time.perf_counter()
    stream = model.stream(prompt, seed=0, max_new_tokens=model.config.canvas_length)
    try:
        for event in stream:
            if isinstance(event, Draft):
                return time.perf_counter() - started
    finally:
        stream.close()
    raise RuntimeError("no draft")


def joined_first_draft(model, host: list[int], messages: list[dict]) -> tuple[float, int]:
    """Seconds from the canvas boundary where a chat turn joins a batch under way (running `host`, another
    conversation) to the turn's first draft, and the turn's prompt tokens the prefix cache held."""
    canvas = model.config.canvas_length
    batch = model.open_batch()
    batch.add(BatchRow(host, 4 * canvas, seed=1))
    turn = None
    events = batch.events()
    try:
        for event in events:
            if isinstance(event, RowsCommitted) and turn is None:
                turn = batch.add(BatchRow(model.tokenizer.encode_chat(messages), canvas, seed=0))
                started = time.perf_counter()
            elif isinstance(event, RowsStep) and turn in event.rows:
                if len(event.rows) < 2:
                    raise RuntimeError("the other conversation ended before the turn joined it")
                return time.perf_counter() - started, event.cached[event.rows.index(turn)]
    finally:
        events.close()
    raise RuntimeError("no draft")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--lengths", default="1024,2048,4096", help="conversation lengths, tokens")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--results", default=None, help="append the section here instead of bench/RESULTS.md")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = diffgemma.load(random_checkpoint(Path(tmp) / "bench", preset="bench-90m", seed=0))
    own = model.prefix_cache  # (the model's: it knows a system turn when it sees one)
    counts: list[int] = []
    encode = model.network.encode

    def counting(ids, cache, *rest, **kwargs):
        counts.append(ids.shape[1])
        return encode(ids, cache, *rest, **kwargs)

    model.network.encode = counting
    rows = []
    for length in (int(n) for n in args.lengths.split(",")):
        messages = conversation(length, seed=length)
        turns = {way: [] for way in ("cold", "warm", "joining, cold", "joining, warm", "new, cold", "new, warm")}
        encoded = {}
        prompt_tokens = len(model.tokenizer.encode_chat(messages))
        for _ in range(args.rounds):
            model.prefix_cache = None
            turns["cold"].append(first_draft(model, messages, counts))
            model.prefix_cache = PrefixCache(model.tokenizer.token_id(TURN_OPEN))
            first_draft(model, messages[:-2], counts)  # the turn before: its prompt is kept
            turns["warm"].append(first_draft(model, messages, counts))
            encoded["warm"] = sum(counts[:2])
        host = model.tokenizer.encode_chat(conversation(length + 512, seed=length + 1))
        for _ in range(args.rounds):
            model.prefix_cache = None
            seconds, _ = joined_first_draft(model, host, messages)
            turns["joining, cold"].append(seconds)
            model.prefix_cache = PrefixCache(model.tokenizer.token_id(TURN_OPEN), entries=2)
            joined_first_draft(model, host, messages[:-2])  # (the turn before, joining too: its prompt kept)
            seconds, cached = joined_first_draft(model, host, messages)
            turns["joining, warm"].append(seconds)
            encoded["joining, warm"] = prompt_tokens - cached
        system = system_turn(length, seed=length + 2)
        opening = [system, {"role": "user", "content": "Why is the sky blue?"}]
        model.prefix_cache = own
        for _ in range(args.rounds):
            own.clear()
            own.shared = 0
            turns["new, cold"].append(first_draft(model, opening, counts))
            own.clear()
            own.shared = 1
            first_draft(model, [system, {"role": "user", "content": "Say hello."}], counts)  # (another conversation)
            turns["new, warm"].append(first_draft(model, opening, counts))
            encoded["new, warm"] = sum(counts[:2])
        cold, warm, joining_cold, joining_warm, new_cold, new_warm = (
            statistics.median(turns[way]) * 1000
            for way in ("cold", "warm", "joining, cold", "joining, warm", "new, cold", "new, warm")
        )
        ways = (
            ("alone", cold, warm, encoded["warm"], prompt_tokens),
            ("joining a batch", joining_cold, joining_warm, encoded["joining, warm"], prompt_tokens),
            ("a new conversation, the same system turn", new_cold, new_warm, encoded["new, warm"], None),
        )
        for way, without, with_, kept, tokens in ways:
            tokens = tokens or len(model.tokenizer.encode_chat(opening))
            cells = (way, tokens, f"{without:.0f}", kept, f"{with_:.0f}", f"{without / with_:.1f}x")
            rows.append("| " + " | ".join(map(str, cells)) + " |")
    table = "\n".join(
        [
            "| the turn | prompt tokens | ms to first draft without | tokens encoded with | ms with | speed-up |",
            "|---|---|---|---|---|---|",
            *rows,
        ]
    )
    append_results(
        "The prefix cache: a chat's next turn to its first draft (bench/prefix.py)",
        table,
        f"bench-90m (random weights, byte-level tokenizer), canvas {model.config.canvas_length}, "
        f"{model.network.dtype}; median of {args.rounds} rounds. 'With': the turn before generated first, so the "
        "cache holds the conversation up to that turn's last opening; the new turn encodes the answer, the new "
        "question and its own opening. 'Alone': batch 1, timed from the request. 'Joining a batch': another "
        "conversation (512 tokens longer) runs in an open batch and the turn joins it after its first canvas, "
        "timed from that canvas's commit (which encodes that canvas too); the turn before joined the same way. "
        "Prefix cache of two entries, as the server's. 'A new conversation': its prompt a system turn of about the "
        "length and a question; 'with', another conversation that opens with the same system turn came first, "
        "which keeps that turn shared (`--system-cache`), so the new one encodes its question alone.",
        args.results,
    )


if __name__ == "__main__":
    main()
