"""llama.cpp server's own routes (llama-server's native API, beside the OpenAI one it shares with the other
servers), for the tools written against it:

- `POST /infill`, for the editor plugins that complete code through it (llama.vim, llama.vscode): the text before
  the cursor, the middle begun (`prompt`) and the text after it, with other files as context;
- `POST /completion` (and `/completions`), a raw prompt's continuation (a text, token ids, or both mixed; several
  prompts give a list of results), for front ends and scripts that call llama-server directly;
- `GET /props`, what such clients read first: the context size, the default sampler settings, the chat template.

Answers come in its response shape (`content`, `stop_type`, `timings`, the fields `response_fields` names), or
streamed as its `data:` lines, the last with `stop: true` and, as llama-server's, the answer's counts and timings.
Its request fields are read as the other routes read theirs: `n_predict` a limit (-1 or unset: the route's
default), seed -1 a random one, `logit_bias` pairs or map (`false`: never that token; a text: each of its
tokens), `presence_penalty` and `frequency_penalty` as OpenAI's; the settings the sampler has no place for
(`repeat_penalty` over the last `repeat_last_n` tokens, Mirostat, DRY, grammars) are ignored, as llama.cpp ignores
fields it does not know; `n_probs` is refused (`/v1/completions`' `logprobs` gives them).

A diffusion fill is a gap of fixed size between prefix and suffix on one canvas, ending early where the model
writes its EOS. llama.cpp reads `n_predict` as a limit, so the gap takes at most what leaves the suffix (and the
EOS after it) on the canvas, or half the canvas for a longer suffix, whose end is then cut: the fill sees what
follows the cursor, which is what a fill in the middle is for. A prefix over the server's prompt limit loses its
beginning (the other files first, as they come first), as llama.cpp cuts it, and says so (`truncated`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .. import __version__
from ..api import DiffGemma
from ..config import SAMPLER_FIELDS, SamplerSettings
from ..reply import SettledText
from .batcher import Job
from .schema import APIError, Piece, SamplerExtras, StopField
from .service import Answer, Serving, check_token_ids, event_stream, raw_prompt, reply_text

# llama.cpp's routes (its own, and the token routes it shares with vLLM), whose bodies are read as JSON whatever
# content type they name, as llama.cpp reads them
LLAMACPP_POSTS = ("/infill", "/completion", "/completions", "/apply-template", "/tokenize", "/detokenize")
# The seeds llama.cpp reads as "a random one": -1, and LLAMA_DEFAULT_SEED (2**32 - 1).
RANDOM_SEEDS = (-1, 2**32 - 1)


class ExtraChunk(BaseModel):
    """A piece of another file, as context: its name and its text."""

    model_config = ConfigDict(extra="ignore")
    filename: str = ""
    text: str = ""


class LlamaRequest(SamplerExtras):
    """What llama.cpp's generating routes share."""

    n_predict: int | None = None  # -1 (llama.cpp's "no limit") or unset: the route's default
    stream: bool = False
    stop: StopField = None
    response_fields: list[str] | None = None
    return_tokens: bool = False  # the answer's token ids in `tokens`
    n_probs: int = Field(default=0, ge=0)  # (refused above 0: `/v1/completions` gives log-probabilities)

    @field_validator("seed")
    @classmethod
    def _random_seed(cls, seed: int | None) -> int | None:
        return None if seed in RANDOM_SEEDS else seed

    @model_validator(mode="before")
    @classmethod
    def _bias_pairs(cls, body: Any) -> Any:
        """llama.cpp's `logit_bias`, `[[token, bias], ...]` or `{token: bias}` (`false` for a bias: never that
        token), as OpenAI's map of ids, where a token given as a text (not an id) is every token of that text:
        those go to `logit_bias_texts`."""
        bias = body.get("logit_bias") if isinstance(body, dict) else None
        if isinstance(bias, dict):
            bias = [[int(key) if key.isdigit() else key, value] for key, value in bias.items()]
        if not isinstance(bias, list):
            return body
        if not all(isinstance(pair, list) and len(pair) == 2 and isinstance(pair[0], int | str) for pair in bias):
            raise ValueError("logit_bias pairs are [token id or text, bias]")
        ids, texts = {}, []
        for token, value in bias:
            value = -100 if value is False else value
            if isinstance(token, str):
                texts.append((token, value))
            else:
                ids[str(token)] = value
        return {**body, "logit_bias": ids, "logit_bias_texts": texts}

    def limit(self) -> int | None:
        """`n_predict` as a limit; -1 or unset: none of its own."""
        return None if self.n_predict is None or self.n_predict < 0 else self.n_predict

    def check_probabilities(self) -> None:
        if self.n_probs:
            message = "n_probs is not supported here: /v1/completions gives token log-probabilities (`logprobs`)"
            raise APIError(400, message, "invalid_request_error", "invalid_value", "n_probs")


class LlamaInfillRequest(LlamaRequest):
    input_prefix: str = ""
    input_suffix: str = ""
    input_extra: list[ExtraChunk] = Field(default_factory=list)
    prompt: str = ""  # the middle as typed so far (the current line up to the cursor): the fill goes on from it

    def prefix(self) -> str:
        """What the model reads before the gap: each extra file (its name on a line, then its text, then a blank
        line), the text before the cursor, then the middle begun."""
        context = "".join(f"{chunk.filename}\n{chunk.text}\n\n" for chunk in self.input_extra)
        return context + self.input_prefix + self.prompt


PromptPart = int | str


class LlamaCompletionRequest(LlamaRequest):
    # a text, token ids, or both mixed ([12, 34, "text", 56]); or a list of such prompts
    prompt: str | list[PromptPart | list[PromptPart]] = ""


def prompt_ids(prompt: str | list, encode: Callable[[str, bool], list[int]]) -> list[list[int]]:
    """llama.cpp's forms of a completion prompt -> each prompt's ids (`encode(text, bos)`: a text's, its BOS first
    where `bos`): a text, its BOS first; token ids as given; texts and ids mixed in one list, a BOS first where it
    starts with a text; or a list of prompts, each of those forms (two or more texts alone are two prompts)."""
    if isinstance(prompt, str):
        return [encode(prompt, True)]
    if not prompt:
        raise APIError(400, "prompt is an empty list", "invalid_request_error", "invalid_value", "prompt")
    several = any(isinstance(part, list) for part in prompt) or (
        len(prompt) > 1 and all(isinstance(part, str) for part in prompt)
    )
    if not several:
        return [_mixed(prompt, encode)]
    if any(isinstance(one, int) for one in prompt):
        message = "a list of prompts holds texts and lists (of token ids and texts), not token ids of its own"
        raise APIError(400, message, "invalid_request_error", "invalid_value", "prompt")
    return [encode(one, True) if isinstance(one, str) else _mixed(one, encode) for one in prompt]


def _mixed(parts: list[PromptPart], encode: Callable[[str, bool], list[int]]) -> list[int]:
    ids: list[int] = []
    for index, part in enumerate(parts):
        ids += encode(part, index == 0) if isinstance(part, str) else [part]
    return ids


def stop_type(finish: str | None, stop_sequence: str | None) -> str:
    """llama.cpp's name for how an answer ended: at a stop string ("word"), at its limit ("limit"), or at EOS."""
    return "word" if stop_sequence is not None else "limit" if finish == "length" else "eos"


@dataclass(frozen=True)
class Outcome:
    """What llama.cpp's response reports of an answer: its text, its token count (and ids, where known), how it
    ended, its time, and the prompt tokens the prefix cache held. The default: nothing was asked for."""

    content: str = ""
    predicted: int = 0
    ids: tuple[int, ...] = ()
    finish: str = "length"
    stop_sequence: str | None = None
    seconds: float = 0.0
    cached: int = 0

    @classmethod
    def of(cls, answer: Answer) -> Outcome:
        done, end = answer.done, answer.end
        ids = tuple(done.new_tokens)
        return cls(answer.content, len(ids), ids, end.finish, end.stop_sequence, done.wall_time, done.cached)


def llama_response(
    outcome: Outcome,
    prompt_tokens: int,
    *,
    model_name: str,
    fields: list[str] | None = None,
    truncated: bool = False,
    tokens: bool = False,
    more: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """An answer in llama.cpp's response shape (`tokens`: with its ids; `more`: other fields of the route's); with
    `fields`, only those, a nested one (`timings/prompt_n`) brought to the top under its path, as llama.cpp
    answers `response_fields` (a missing one left out)."""
    predicted, seconds = outcome.predicted, outcome.seconds
    milliseconds = seconds * 1000
    response: dict[str, Any] = {
        "content": outcome.content,
        "tokens": list(outcome.ids) if tokens else [],
        "stop": True,
        "stop_type": stop_type(outcome.finish, outcome.stop_sequence),
        "stopping_word": outcome.stop_sequence or "",
        "model": model_name,
        "tokens_predicted": predicted,
        "tokens_evaluated": prompt_tokens,
        "tokens_cached": outcome.cached,
        "truncated": truncated,
        "timings": {  # the whole answer's time, prompt included (the engine does not time them apart)
            "prompt_n": prompt_tokens - outcome.cached,
            "predicted_n": predicted,
            "predicted_ms": milliseconds,
            "predicted_per_token_ms": milliseconds / predicted if predicted else 0.0,
            "predicted_per_second": predicted / seconds if seconds > 0 else 0.0,
        },
        **(more or {}),
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


def stream_lines(prompt_tokens: int, **shape: Any) -> Callable[[Piece], list[dict[str, Any]]]:
    """llama.cpp's streamed lines of one answer: each settled piece (`stop: false`), then, once the answer has
    ended and been counted, one last line as llama-server sends it: `stop: true`, how it ended, its counts and
    timings (`llama_response`'s fields, `shape` its keywords)."""
    started = time.perf_counter()
    ending: dict[str, Any] = {}

    def lines(piece: Piece) -> list[dict[str, Any]]:
        if piece.usage is not None:  # (after the end)
            cached = piece.usage["prompt_tokens_details"]["cached_tokens"]
            seconds = time.perf_counter() - started
            outcome = Outcome("", piece.usage["completion_tokens"], (), seconds=seconds, cached=cached, **ending)
            return [llama_response(outcome, prompt_tokens, **shape)]
        if piece.finish is not None:
            ending.update(finish=piece.finish, stop_sequence=piece.stop_sequence)
            return []
        return [{"content": piece.content, "stop": False}] if piece.content else []

    return lines


def generation_settings(settings: SamplerSettings, context: int, limit: int, stop: StopField) -> dict[str, Any]:
    """The settings an answer is drawn with, as llama.cpp names what it has a name for (`n_ctx`, `n_predict`)."""
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    sampler = {name: getattr(settings, name) for name in SAMPLER_FIELDS}
    return {"n_ctx": context, "n_predict": limit, **sampler, "stop": stops}


def llamacpp_routes(model: DiffGemma, serving: Serving, context: int) -> APIRouter:
    """llama.cpp's routes over `serving` (`context`: the tokens a request may span, as `/props` gives it)."""
    router = APIRouter()
    tokenizer = model.tokenizer

    def encode(text: str, bos: bool) -> list[int]:
        return raw_prompt(tokenizer, text, bos)

    def stream(jobs: list[Job], replies: list[SettledText], prompt_tokens: int, shape: dict[str, Any]):
        """An answer streamed as llama.cpp's lines (`stream_lines`; `response_fields` are for whole answers)."""
        lines = stream_lines(prompt_tokens, **{**shape, "fields": None})
        return event_stream(serving.stream_jobs(jobs, replies, lines, False, prompt_tokens, [""], ""))

    @router.post("/infill")
    async def infill(body: LlamaInfillRequest, request: Request):
        """What editor plugins send for code completion."""
        body.check_probabilities()
        prompt, truncated, length = serving.plugin_fill(encode(body.prefix(), True), body.input_suffix, body.limit())
        shape = {"model_name": serving.served_name(body.model), "fields": body.response_fields, "truncated": truncated}
        if length == 0:  # (nothing asked for)
            return llama_response(Outcome(), len(prompt), **shape)
        reply = reply_text(model, chat=False, stop=body.stop)  # (its stop strings checked before a job is queued)
        job = serving.fill_job(prompt, body.input_suffix, length, body, warn=False)  # (a long suffix's end: by design)
        if body.stream:
            return stream([job], [reply], len(prompt), shape)
        answer = await serving.run_answer(job, reply, request, None)
        return llama_response(Outcome.of(answer), len(prompt), tokens=body.return_tokens, **shape)

    async def complete(body: LlamaCompletionRequest, request: Request):
        """A raw prompt's continuation (several prompts: a list of them), to EOS or `n_predict` tokens."""
        body.check_probabilities()
        prompts = prompt_ids(body.prompt, encode)
        for ids in prompts:
            check_token_ids(model, ids, "prompt")
        if body.stream and len(prompts) > 1:
            message = "stream one prompt at a time (a list of prompts is answered whole)"
            raise APIError(400, message, "invalid_request_error", "invalid_value", "stream")
        asked = body.limit()  # (over the server's limit: that limit, as llama.cpp stops at its context's end)
        limit = serving.admit(prompts, min(asked, serving.options.max_tokens) if asked else None, 1, chat=True)
        limit = 0 if asked == 0 else limit
        settings = model.sampler_defaults(serving.adapter_for(body.model)).replace(**serving.sampler_overrides(body))
        more = {"generation_settings": generation_settings(settings, context, limit, body.stop)}
        shape = {"model_name": serving.served_name(body.model), "fields": body.response_fields, "more": more}
        if limit == 0:  # (the prompt is read, nothing is written: llama.cpp's way to fill its cache)
            results = [llama_response(Outcome(), len(ids), **shape) for ids in prompts]
            return results[0] if len(prompts) == 1 else results
        replies = [reply_text(model, chat=False, stop=body.stop) for _ in prompts]  # (stop strings checked first)
        jobs = [serving.new_job(ids, limit, body, index, None) for index, ids in enumerate(prompts)]
        if body.stream:
            return stream(jobs, replies, len(prompts[0]), shape)
        runs = [serving.run_answer(job, reply, request, None) for job, reply in zip(jobs, replies, strict=True)]
        answers = await serving.run_answers(runs)
        results = [
            llama_response(Outcome.of(answer), len(ids), tokens=body.return_tokens, **shape)
            for answer, ids in zip(answers, prompts, strict=True)
        ]
        return results[0] if len(prompts) == 1 else results

    router.post("/completion")(complete)
    router.post("/completions")(complete)  # (llama-server's alias)

    @router.get("/props")
    async def props() -> dict[str, Any]:
        """The server's properties as llama-server gives them: the default settings (as `/completion` reports
        its own), the slots (rows a batch takes), the chat template, what the model reads."""
        settings = generation_settings(model.sampler_defaults(), context, -1, None)
        eos = model.settings.eos_token_id
        return {
            "default_generation_settings": {"n_ctx": context, "params": settings},
            "total_slots": serving.options.max_batch,
            "model_alias": serving.options.model_name,
            "model_path": str(model.folder or ""),
            "chat_template": tokenizer.chat_template or "",
            "modalities": {"vision": model.config.vision is not None, "audio": False},
            "bos_token": tokenizer.decode(encode("", True), skip_special_tokens=False),
            "eos_token": tokenizer.decode(list(eos[:1]), skip_special_tokens=False),
            "build_info": f"diffgemma {__version__}",
        }

    return router
