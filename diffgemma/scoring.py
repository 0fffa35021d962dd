"""Scoring text: each token's log-probability given the tokens before it, from the causal encoder.

The encoder is a causal language model with the tied head (the model trains it with a next-token loss beside
the diffusion loss), so it gives what evaluation harnesses and `logprobs` clients ask of a model: how likely
a text is, token by token. These are the encoder's next-token probabilities at temperature 1, not the
diffusion sampler's: a canvas's tokens are drawn together, each from the decoder's distribution at the step
it was accepted.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import is_int
from .errors import DiffGemmaError
from .model import PREFILL_CHUNK, DiffusionGemma, ImageInputs, chunk_ends

SCORE_LOGITS_BYTES = 256 * 2**20  # float32 logits held at a time (the 26B's vocabulary: 256 positions)
MAX_TOP = 20  # alternatives per position, as OpenAI's API allows


@dataclass
class TokenScores:
    """Per token of `ids`: its log-probability given the ones before (None for the first, which has no
    context), and the `top` likeliest tokens at its position as (id, log-probability), likeliest first."""

    ids: list[int]
    logprobs: list[float | None]
    top: list[list[tuple[int, float]]]

    @property
    def total(self) -> float:
        """The summed log-probability of every token after the first."""
        return sum(value for value in self.logprobs if value is not None)

    @property
    def perplexity(self) -> float:
        scored = len(self.ids) - 1
        return float(torch.tensor(-self.total / scored).exp()) if scored else float("nan")


def check_rows(network: DiffusionGemma, rows: list[list[int]], verb: str) -> None:
    """Rows of ids the causal encoder can read whole: each some tokens, all in the vocabulary, within the model's
    positions (`verb`: what is to be done with them, for the error)."""
    vocab, longest = network.config.vocab_size, network.config.max_position_embeddings
    for ids in rows:
        if not ids:
            raise DiffGemmaError(f"nothing to {verb}: no tokens")
        outside = [token for token in ids if not 0 <= token < vocab]
        if outside:
            raise DiffGemmaError(f"token id {outside[0]} is outside the vocabulary (0-{vocab - 1})")
        if len(ids) > longest:
            raise DiffGemmaError(f"{len(ids)} tokens to {verb}; the model reads at most {longest}")


@torch.no_grad()
def score_batch(
    network: DiffusionGemma, rows: list[list[int]], top: int = 0, pictures: list[list[torch.Tensor]] | None = None
) -> list[TokenScores]:
    """Run the causal encoder over each row of ids and score each token after the first from the head's
    distribution at the position before it, every row in one pass. Shorter rows are padded at their end, which
    a causal encoder never lets their tokens see, so each row scores as it would alone. The rows go through the
    encoder in chunks (`DiffusionGemma.encode`; an image's run never cut) and the head a slice of positions at a
    time, so memory stays that of a prompt chunk and SCORE_LOGITS_BYTES of logits. `pictures`: each row's
    pictures' soft tokens, for the runs of image ids it holds (`model.ImageInputs.in_prompts`)."""
    if not is_int(top) or not 0 <= top <= MAX_TOP:
        raise DiffGemmaError(f"top must be an integer between 0 and {MAX_TOP}, got {top!r}")
    check_rows(network, rows, "score")
    vocab = network.config.vocab_size
    width = max(len(ids) for ids in rows)
    sequence = torch.tensor([ids + [0] * (width - len(ids)) for ids in rows], device=network.device)
    images = None
    if pictures is not None and any(pictures):
        if network.config.vision is None or len(pictures) != len(rows):
            raise DiffGemmaError("pictures go with a checkpoint that has a vision tower, a list of them a row")
        images = ImageInputs.in_prompts(sequence, None, pictures, network.config.vision.image_token_id)
    cache = network.new_cache(len(rows), width)
    slice_positions = max(1, SCORE_LOGITS_BYTES // (4 * vocab * len(rows)))
    logprobs: list[list[float | None]] = [[None] for _ in rows]
    alternatives: list[list[list[tuple[int, float]]]] = [[[]] for _ in rows]
    start = 0
    for end in chunk_ends(width, images, PREFILL_CHUNK):
        part = images.columns(start, end) if images is not None else None
        hidden = network.encode(sequence[:, start:end], cache, images=part)
        targets = sequence[:, start + 1 : start + 1 + hidden.shape[1]]
        hidden = hidden[:, : targets.shape[1]]  # the last token predicts nothing here
        for first in range(0, targets.shape[1], slice_positions):
            logits = network.head(hidden[:, first : first + slice_positions])
            logits -= torch.logsumexp(logits, dim=-1, keepdim=True)
            picked = targets[:, first : first + slice_positions]
            values = logits.gather(2, picked[..., None])[..., 0].tolist()
            if top:  # (read back once for every row)
                best = logits.topk(top, dim=-1)
                best_ids, best_values = best.indices.tolist(), best.values.tolist()
            for row, ids in enumerate(rows):
                real = max(0, min(picked.shape[1], len(ids) - 1 - start - first))  # this row's scored positions
                logprobs[row].extend(values[row][:real])
                if not top:
                    alternatives[row].extend([] for _ in range(real))
                    continue
                pairs = zip(best_ids[row][:real], best_values[row][:real], strict=True)
                alternatives[row].extend(list(zip(i, v, strict=True)) for i, v in pairs)
        start = end
    return [TokenScores(list(ids), logprobs[row], alternatives[row]) for row, ids in enumerate(rows)]
