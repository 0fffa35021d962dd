"""OpenAI's `logprobs` shapes for scored tokens (`DiffGemma.score`): the completions API's and the chat API's."""

from __future__ import annotations

from typing import Any

from ..scoring import TokenScores
from ..tokenizer import Tokenizer


def completion_logprobs(tokenizer: Tokenizer, scored: TokenScores, first: int) -> dict[str, Any]:
    """The completions API's `logprobs` for the tokens from `first` on: each token, its log-probability (None for a
    text's first token), its alternatives with the token itself among them, and where its text starts in the
    choice's text."""
    tokens, values, alternatives, offsets, offset = [], [], [], [], 0
    for token, value, top in zip(scored.ids[first:], scored.logprobs[first:], scored.top[first:], strict=True):
        piece = tokenizer.decode([token], skip_special_tokens=False)
        tokens.append(piece)
        values.append(value)
        if value is None:
            alternatives.append(None)
        else:
            pieces = {tokenizer.decode([other], skip_special_tokens=False): v for other, v in top}
            alternatives.append({**pieces, piece: value})
        offsets.append(offset)
        offset += len(tokenizer.decode([token]))
    return {"tokens": tokens, "token_logprobs": values, "top_logprobs": alternatives, "text_offset": offsets}


def chat_logprobs(tokenizer: Tokenizer, scored: TokenScores, first: int) -> dict[str, Any]:
    """The chat API's `logprobs` for the answer's tokens (from `first` on): each with its bytes and alternatives."""

    def entry(token: int, value: float) -> dict[str, Any]:
        piece = tokenizer.decode([token], skip_special_tokens=False)
        return {"token": piece, "logprob": value, "bytes": list(piece.encode())}

    content = [
        {**entry(token, value), "top_logprobs": [entry(other, v) for other, v in top]}
        for token, value, top in zip(scored.ids[first:], scored.logprobs[first:], scored.top[first:], strict=True)
    ]
    return {"content": content, "refusal": None}
