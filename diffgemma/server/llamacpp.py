"""llama.cpp server's `POST /infill`, for the editor plugins that complete code through it (llama.vim,
llama.vscode): the text before the cursor, the middle begun (`prompt`) and the text after it, with other files as
context, in its request shape; the fill in its response shape (`content`, `stop_type`, `timings`, the fields
`response_fields` names), or streamed as its `data:` lines.

A diffusion fill is a gap of fixed size between prefix and suffix on one canvas, ending early where the model
writes its EOS. llama.cpp reads `n_predict` as a limit, so the gap takes at most what leaves the suffix (and the
EOS after it) on the canvas, or half the canvas for a longer suffix, whose end is then cut: the fill sees what
follows the cursor, which is what a fill in the middle is for. A prefix over the server's prompt limit loses its
beginning (the other files first, as they come first), as llama.cpp cuts it, and says so (`truncated`).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from .schema import Piece, SamplerExtras, StopField

# The seeds llama.cpp reads as "a random one": -1, and LLAMA_DEFAULT_SEED (2**32 - 1).
RANDOM_SEEDS = (-1, 2**32 - 1)


class ExtraChunk(BaseModel):
    """A piece of another file, as context: its name and its text."""

    model_config = ConfigDict(extra="ignore")
    filename: str = ""
    text: str = ""


class LlamaInfillRequest(SamplerExtras):
    input_prefix: str = ""
    input_suffix: str = ""
    input_extra: list[ExtraChunk] = Field(default_factory=list)
    prompt: str = ""  # the middle as typed so far (the current line up to the cursor): the fill goes on from it
    n_predict: int | None = None  # -1 (llama.cpp's "no limit") or unset: the fill routes' default
    stream: bool = False
    stop: StopField = None
    response_fields: list[str] | None = None

    @field_validator("seed")
    @classmethod
    def _random_seed(cls, seed: int | None) -> int | None:
        return None if seed in RANDOM_SEEDS else seed

    @field_validator("logit_bias", mode="before")
    @classmethod
    def _bias_pairs(cls, bias: Any) -> Any:
        """llama.cpp's `[[token, bias], ...]` (`false` for a bias: never that token) as OpenAI's map."""
        if not isinstance(bias, list):
            return bias
        if not all(isinstance(pair, list) and len(pair) == 2 for pair in bias):
            raise ValueError("logit_bias pairs are [token id, bias]")
        return {str(token): -100 if value is False else value for token, value in bias}

    def prefix(self) -> str:
        """What the model reads before the gap: each extra file (its name on a line, then its text, then a blank
        line), the text before the cursor, then the middle begun."""
        context = "".join(f"{chunk.filename}\n{chunk.text}\n\n" for chunk in self.input_extra)
        return context + self.input_prefix + self.prompt

    def limit(self) -> int | None:
        """`n_predict` as a fill's limit (`service.fill_limit`); -1 or unset: none of its own."""
        return None if self.n_predict is None or self.n_predict < 0 else self.n_predict


def fit_prompt(ids: list[int], opening: int, limit: int) -> tuple[list[int], bool]:
    """The prompt within `limit` tokens: its `opening` ids (the tokenizer's BOS) and as much of its end as fits;
    and whether anything was cut."""
    if len(ids) <= limit:
        return ids, False
    return ids[:opening] + ids[len(ids) - (limit - opening) :], True


def stop_type(finish: str | None, stop_sequence: str | None) -> str:
    """llama.cpp's name for how a fill ended: at a stop string ("word"), at its limit ("limit"), or at EOS."""
    return "word" if stop_sequence is not None else "limit" if finish == "length" else "eos"


def infill_response(
    content: str,
    finish: str,
    stop_sequence: str | None,
    prompt_tokens: int,
    predicted: int,
    seconds: float,
    cached: int = 0,
    *,
    model_name: str,
    fields: list[str] | None = None,
    truncated: bool = False,
) -> dict[str, Any]:
    """The fill in llama.cpp's response shape; with `fields`, only those, a nested one (`timings/prompt_n`)
    brought to the top under its path, as llama.cpp answers `response_fields` (a missing one left out)."""
    milliseconds = seconds * 1000
    response: dict[str, Any] = {
        "content": content,
        "stop": True,
        "stop_type": stop_type(finish, stop_sequence),
        "stopping_word": stop_sequence or "",
        "model": model_name,
        "tokens_predicted": predicted,
        "tokens_evaluated": prompt_tokens,
        "tokens_cached": cached,
        "truncated": truncated,
        "timings": {  # the whole fill's time, prompt included (the engine does not time them apart)
            "prompt_n": prompt_tokens - cached,
            "predicted_n": predicted,
            "predicted_ms": milliseconds,
            "predicted_per_token_ms": milliseconds / predicted if predicted else 0.0,
            "predicted_per_second": predicted / seconds if seconds > 0 else 0.0,
        },
    }
    if fields is None:
        return response
    picked = {}
    for path in fields:
        value: Any = response
        for key in path.split("/"):
            value = value.get(key) if isinstance(value, dict) else None
        if value is not None:
            picked[path] = value
    return picked


def stream_chunk(piece: Piece) -> dict[str, Any]:
    """One of llama.cpp's streamed lines: a piece of the fill, then the last, which says how it ended."""
    if piece.finish is None:
        return {"content": piece.content, "stop": False}
    return {
        "content": piece.content,
        "stop": True,
        "stop_type": stop_type(piece.finish, piece.stop_sequence),
        "stopping_word": piece.stop_sequence or "",
    }
