"""What the server's routes share: a request's choices admitted against the server's limits, queued on the
engine as jobs (`batcher`), then waited for or streamed, read as answers, and scored.

Streaming sends text before a canvas ends: the engine fixes each canvas's settled prefix as it goes, and
the server sends whatever newly settled, never taking anything back. The thinking channel goes out as
`reasoning` and `reasoning_content` (vLLM's name now, and DeepSeek's, which many clients still read). With
`"drafts": true` a client also gets every denoising step's canvas. `stop` strings end the answer (never the
thinking) as soon as one settles; a stream holds back text that may begin one. `logprobs` score a finished
choice's tokens with the causal encoder (`DiffGemma.score`), on the engine's thread between steps. An answer
asked for in a form (`response_format`: JSON; vLLM's structured outputs) is read against it and drawn again
if it does not read (`structured`).
"""

from __future__ import annotations

import asyncio
import math
import secrets
import time
import uuid
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from functools import partial
from typing import Any

import torch
from fastapi import Request
from fastapi.responses import StreamingResponse

from ..api import PREDICTION_WITH_THINKING, DiffGemma
from ..config import SAMPLER_FIELDS
from ..embedding import check_dimensions, passes
from ..errors import DiffGemmaError
from ..generate import ThinkingBudget
from ..images import PreparedImage, split_images
from ..reply import SettledText
from ..resources import first_line, out_of_memory
from ..scoring import TokenScores
from ..structured import DEFAULT_TRIES, AnswerFormat
from ..tokenizer import THINKING_CLOSE, Tokenizer
from ..toolcalls import FORCED_CALL, ToolCall, check_tools, forced_call_fault, tool_plan
from .batcher import Batcher, EngineStopped, Job, RowDone, RowDraft
from .logprobs import chat_logprobs, completion_logprobs
from .messages import (
    Conversation,
    messages_format,
    messages_tools,
    request_conversation,
)
from .schema import (
    EFFORT_BUDGETS,
    APIError,
    ChatRequest,
    CompletionRequest,
    Piece,
    SamplerExtras,
    StopField,
    TokenizeRequest,
    ToolChoiceField,
    asked_format,
    effort_thinks,
    error_body,
    sse,
    stop_strings,
    tool_choice_name,
)

MAX_EMBED_INPUTS = 2048  # texts one embeddings request may give, as OpenAI allows
BAN = -100  # OpenAI's `logit_bias` that bans a token; its biases run from this to -BAN
DONE = "data: [DONE]\n\n"  # the last event of a chat or completions stream

ChoiceEnd = tuple[list[int], str, int | None]  # a choice's final tokens, its finish reason, the EOS after them


@dataclass(frozen=True)
class ServerOptions:
    """The server's settings (`serve`'s options): the name it serves the model under, the key it asks for, and
    its limits on prompts, answers, bodies, rows in flight, rows a batch and batches at once."""

    model_name: str = "diffgemma"
    api_key: str | None = None
    max_prompt_tokens: int = 8192
    max_tokens: int = 4096
    max_body_bytes: int = 1_000_000
    max_concurrent: int = 16
    max_batch: int = 8
    max_runs: int = 2  # batches denoised at once, taking steps in turn (`Batcher`)
    join_first: bool | None = None  # a request joins a running batch before starting one (None: off the CPU)
    allowed_origins: tuple[str, ...] = ()  # web pages elsewhere that may call the API (CORS); "*" for any
    format_tries: int = DEFAULT_TRIES  # draws of an answer of a form (JSON, ...) before a 422 says none read
    allow_adapter_loading: bool = False  # LoRA adapters loaded and unloaded by request (vLLM's routes for it)
    thinking_budget: int | None = None  # the most tokens of thought where a request asks no budget (None: none)


@dataclass(frozen=True)
class ToolUse:
    """A chat request's tools as its replies read them: the ids a reply was made to begin with (a call's
    opening, for a `tool_choice` that asks for one: the call is forced), whether more than one call may come
    back, and the tools offered."""

    lead: list[int]
    parallel: bool = True
    offered: tuple[dict[str, Any], ...] = ()  # the tools, OpenAI's shape: a forced call's arguments must fit them

    @property
    def forced(self) -> bool:
        """Whether the reply must call a tool (`tool_choice` "required" or a tool's name: it begins the call)."""
        return bool(self.lead)

    def kept(self, calls: Sequence[ToolCall]) -> tuple[ToolCall, ...]:
        """The calls a reply gives back: the first alone, unless parallel calls were allowed."""
        return tuple(calls if self.parallel else calls[:1])


def call_forced(tools: ToolUse | None) -> bool:
    """Whether a request's reply must call a tool (`ToolUse.forced`; no tools: it need not)."""
    return tools is not None and tools.forced


def reply_text(model: DiffGemma, chat: bool, stop: StopField = None, tools: ToolUse | None = None) -> SettledText:
    """A choice's text as it settles (`DiffGemma.settled_text`), with the request's stop strings, its tool calls
    apart when it offered tools."""
    return model.settled_text(chat, stop_strings(stop), tools is not None, tools.lead if tools else ())


@dataclass(frozen=True)
class Ending:
    """How a finished choice ended, as every API's shape reports it: its finish reason ("tool_calls" when it made
    calls, unless its token limit cut it), the stop string that ended it, and its tool calls in OpenAI's shape,
    each with a new id (the first alone, unless parallel calls were allowed), and as they were read."""

    finish: str
    stop_sequence: str | None
    calls: list[dict[str, Any]]
    read: tuple[ToolCall, ...] = ()


def choice_ending(reply: SettledText, tokens: list[int], finish: str, tools: ToolUse | None) -> Ending:
    """The Ending of a choice whose final `tokens` finished for `finish` ("stop" or "length")."""
    read = tools.kept(reply.tool_calls(tokens)) if tools is not None else ()
    calls = [
        {
            "id": f"call_{uuid.uuid4().hex[:24]}",
            "type": "function",
            "function": {"name": call.name, "arguments": call.arguments_json},
        }
        for call in read
    ]
    return Ending("tool_calls" if calls and finish == "stop" else finish, reply.stop_found(tokens), calls, read)


@dataclass(frozen=True)
class Answer:
    """A finished choice: its result, the reader of its text, its text (a JSON answer's without a code fence
    around it), and how it ended."""

    done: RowDone
    reply: SettledText
    content: str
    reasoning: str
    end: Ending

    def pieces(self, index: int, logprobs: dict | None = None) -> list[Piece]:
        """The choice as the pieces a stream hands on, all at once (a reply read whole before it is sent)."""
        whole = [Piece(index, role=True), Piece(index, content=self.content, reasoning=self.reasoning)]
        if self.end.calls:
            whole.append(Piece(index, tool_calls=self.end.calls))
        end = Piece(index, finish=self.end.finish, stop_sequence=self.end.stop_sequence, logprobs=logprobs)
        return [*whole, end]


def whole_events(
    answer: Answer, chunk: Callable[[Piece], list], prompt_tokens: int, logprobs: dict | None = None
) -> list[dict[str, Any]]:
    """A Responses or Messages reply answered whole, as the events its builder's `chunk` makes of its pieces
    (the builder then holds the whole reply)."""
    tokens, cached = answer.done.new_tokens, answer.done.cached
    usage = Piece(usage=_answers_usage(prompt_tokens, [tokens], cached, None, answer.reply.tokenizer))
    return [event for piece in [*answer.pieces(0, logprobs), usage] for event in chunk(piece)]


def read_whole(answer_format: AnswerFormat | None, tools: ToolUse | None) -> bool:
    """Whether a choice is read whole before it is sent (a stream then gets it as one piece): an answer of a
    form, or a call that must be made, may have to be drawn again (`Serving.run_answer`)."""
    return answer_format is not None or call_forced(tools)


def format_fault(
    answer_format: AnswerFormat | None, content: str, end: Ending, tools: ToolUse | None = None
) -> str | None:
    """Why a finished choice's answer (`content`) does not have the form asked for (None: it has, or none was
    asked for). A choice cut at its token limit is left as it is ("length", as OpenAI's), as is one that calls
    tools. One that had to call a tool (`tools.forced`) must have made calls that fit their tools instead."""
    if end.finish == "length":
        return None
    if call_forced(tools):
        return forced_call_fault(end.read, tools.offered, content)
    if answer_format is None or end.calls:
        return None
    try:
        answer_format.read(content)
    except DiffGemmaError as err:
        return str(err)
    return None


def infill_length(model: DiffGemma, max_tokens: int | None, original: str | None = None) -> int:
    """The positions a fill takes: `max_tokens`, else as many as the `original` text had, else 32 (or the
    canvas, if shorter)."""
    canvas = model.config.canvas_length
    length = max_tokens
    if length is None:
        original_ids = model.tokenizer.encode(original or "", add_special_tokens=False)
        length = max(1, len(original_ids)) if original else min(32, canvas)
    if length > canvas:
        given = "max_tokens" if max_tokens is not None else f"the original text's {length} tokens"
        message = f"a fill is at most one canvas ({canvas} tokens); {given} would take more"
        raise APIError(400, message, "invalid_request_error", "invalid_value", "max_tokens")
    return length


def fill_limit(asked: int | None, default: int, canvas: int, suffix_tokens: int) -> int:
    """The gap of a fill whose length is a limit (llama.cpp's `n_predict`, Ollama's `num_predict`): `asked` (None:
    `default`), at most what leaves the suffix and its EOS on the canvas, or half of it for a longer suffix (whose
    end is then cut: editor plugins send many lines after the cursor, and the fill sees those nearest)."""
    return min(default if asked is None else asked, canvas - min(suffix_tokens + 1, canvas // 2))


def raw_prompt(tokenizer: Tokenizer, text: str, bos: bool = True) -> list[int]:
    """A raw prompt's ids, its BOS first where `bos`, unless the text begins with it (a chat rendered as text:
    llama.cpp's `/apply-template`), where it would be read twice."""
    opening, ids = tokenizer.encode(""), tokenizer.encode(text, add_special_tokens=False)
    return opening + ids if bos and ids[: len(opening)] != opening else ids


def fit_prompt(ids: list[int], opening: int, limit: int) -> tuple[list[int], bool]:
    """The prompt within `limit` tokens: its `opening` ids (the tokenizer's BOS) and as much of its end as fits;
    and whether anything was cut."""
    if len(ids) <= limit:
        return ids, False
    return ids[:opening] + ids[len(ids) - (limit - opening) :], True


def check_token_ids(model: DiffGemma, ids: list[int], param: str) -> None:
    """A request's token ids: at least one, each in the vocabulary (400 naming the first outside it)."""
    vocabulary = model.config.vocab_size
    outside = [token for token in ids if not 0 <= token < vocabulary]
    if not ids or outside:
        what = f"token id {outside[0]} is outside the vocabulary (0-{vocabulary - 1})" if ids else "empty"
        raise APIError(400, f"{param}: {what}", "invalid_request_error", "invalid_value", param)


def thinking_asked(body: ChatRequest | TokenizeRequest) -> bool:
    """Whether a chat request turns thinking on (our field, the template's argument as vLLM takes it, OpenAI's
    reasoning effort, or OpenRouter's `reasoning`: enabled, an effort that thinks, or a budget)."""
    asked = getattr(body, "enable_thinking", False) or effort_thinks(getattr(body, "reasoning_effort", None))
    routed = getattr(body, "reasoning", None) or {}
    if routed.get("enabled") is not False:
        asked = asked or routed.get("enabled") is True or routed.get("max_tokens") is not None
        asked = asked or ("effort" in routed and effort_thinks(routed["effort"]))
    return bool(asked or (body.chat_template_kwargs or {}).get("enable_thinking"))


def reasoning_shown(body: ChatRequest) -> bool:
    """Whether a chat request's answers carry their thinking (OpenRouter's `reasoning.exclude` and
    `include_reasoning: false` keep it out; usage still counts it)."""
    return body.include_reasoning and not (body.reasoning or {}).get("exclude")


class Serving:
    """The engine's side of the routes: the model, the server's limits, the batcher, and the rows (choices) in
    flight, which `admit` counts against `max_concurrent`."""

    def __init__(self, model: DiffGemma, options: ServerOptions, batcher: Batcher) -> None:
        self.model = model
        self.options = options
        self.batcher = batcher
        self.active = 0
        self._last_settings: tuple[weakref.ref, tuple] | None = None  # (`_job_settings`)

    def adapter_for(self, name: str | None) -> str | None:
        """The LoRA adapter a request's `model` names (`serve --lora-modules`): None for the base model, by its
        name or none; where the server serves no adapters (and loads none by request), any name is the base
        model's, as clients send whatever they were set up with. Otherwise a name it does not serve is a 404,
        where answering with another model would pass unseen."""
        adapters = self.model.adapters
        if not name or not (adapters or self.options.allow_adapter_loading):
            return None
        name = name.removesuffix(":latest")  # (the tag Ollama's clients add)
        if name in adapters:
            return name
        if name == self.options.model_name:
            return None
        raise self.not_served(name)

    def not_served(self, name: str) -> APIError:
        """The 404 for a model name this server does not serve, naming those it does."""
        served = ", ".join(repr(served) for served in (self.options.model_name, *self.model.adapters))
        message = f"no model {name!r}; this server serves {served}"
        return APIError(404, message, "invalid_request_error", "model_not_found", "model")

    async def load_adapter(self, name: str, folder: str | None) -> None:
        """vLLM's `/v1/load_lora_adapter`: adapter `folder` served from now on as model `name`, read on the
        engine's thread between steps."""
        self._check_adapter_loading()
        if not folder:
            message = "lora_path: the adapter's folder is required"
            raise APIError(400, message, "invalid_request_error", "invalid_value", "lora_path")
        if name == self.options.model_name or name in self.model.adapters:
            message = f"a model named {name!r} is served already"
            raise APIError(400, message, "invalid_request_error", "invalid_value", "lora_name")
        try:
            await self._on_engine(lambda: self.model.add_adapter(name, folder))
        except DiffGemmaError as err:
            raise APIError(400, str(err), "invalid_request_error", "invalid_value", "lora_path") from None

    async def unload_adapter(self, name: str) -> None:
        """vLLM's `/v1/unload_lora_adapter`: adapter `name` served no more (refused while requests for it run)."""
        self._check_adapter_loading()
        self.adapter_for(name)  # (404 for a name not served)
        if name not in self.model.adapters:
            message = f"{name!r} is the base model, not an adapter"
            raise APIError(400, message, "invalid_request_error", "invalid_value", "lora_name")

        def unload() -> None:
            if self.batcher.uses_adapter(name):
                message = f"requests for {name!r} are under way: unload it once they end"
                raise APIError(409, message, "invalid_request_error", "adapter_in_use", "lora_name")
            self.model.remove_adapter(name)

        await self._on_engine(unload)

    def _check_adapter_loading(self) -> None:
        if not self.options.allow_adapter_loading:
            message = "loading and unloading adapters is off: start the server with --allow-adapter-loading"
            raise APIError(403, message, "permission_error", "adapter_loading_off")

    def served_name(self, name: str | None) -> str:
        """The model an answer names: the adapter's name where the request asked for one, else the base's."""
        return self.adapter_for(name) or self.options.model_name

    def check_prompt_limit(self, prompts: list[list[int]], param: str, what: str = "prompt") -> None:
        """Each prompt (`what` the request calls it) within --max-prompt-tokens (400 naming `param` if not)."""
        longest, limit = max(len(prompt) for prompt in prompts), self.options.max_prompt_tokens
        if longest > limit:
            message = f"{what} is {longest} tokens; the limit is {limit}"
            raise APIError(400, message, "invalid_request_error", "context_length_exceeded", param)

    def truncated(self, prompts: list[list[int]], body: SamplerExtras, whole: bool) -> list[list[int]]:
        """vLLM's `truncate_prompt_tokens`: each prompt's last k tokens, its BOS kept (-1: the server's prompt
        limit); refused where a prompt must stay `whole` (its pictures, or an echo of it)."""
        keep = body.truncate_prompt_tokens
        if keep is None:
            return prompts
        if whole or keep == 0:
            why = "a prompt with pictures or echoed stays whole" if whole else "it keeps at least one token"
            message = f"truncate_prompt_tokens {keep} cannot be taken here: {why}"
            raise APIError(400, message, "invalid_request_error", "invalid_value", "truncate_prompt_tokens")
        opening = len(self.model.tokenizer.encode(""))  # (the BOS, kept)
        limit = self.options.max_prompt_tokens if keep == -1 else keep
        return [fit_prompt(prompt, opening, max(limit, opening + 1))[0] for prompt in prompts]

    def admit(
        self, prompts: list[list[int]], max_tokens: int | None, n: int, chat: bool = False, param: str = "max_tokens"
    ) -> int:
        """The request's token limit, once its prompts (each `n` choices, rows of one batch) are within limits.
        Without one, a chat answer may run to the server's limit (to EOS, as OpenAI's chat runs to the
        context), where the checkpoint's max_new_tokens (the reference's 256, one canvas) would cut most
        answers; a text completion keeps the checkpoint's. `param`: what the request calls its limit."""
        options = self.options
        if not 1 <= n <= options.max_batch:  # a request's choices are denoised together, in one batch
            raise APIError(
                400, f"n must be between 1 and {options.max_batch}", "invalid_request_error", "invalid_value", "n"
            )
        if len(prompts) * n > options.max_batch:
            raise APIError(
                400,
                f"{len(prompts)} prompts of {n} choices each are {len(prompts) * n} rows; at most {options.max_batch}",
                "invalid_request_error",
                "invalid_value",
                "prompt",
            )
        self.check_prompt_limit(prompts, "messages")
        limit = max_tokens or (
            options.max_tokens if chat else min(self.model.settings.max_new_tokens, options.max_tokens)
        )
        if limit > options.max_tokens:
            message = f"{param} {limit} is over the limit {options.max_tokens}"
            raise APIError(400, message, "invalid_request_error", "invalid_value", param)
        if self.active + len(prompts) * n > options.max_concurrent:  # each choice is a row of a batch
            raise APIError(429, "too many concurrent requests; try again shortly", "rate_limit_error", "rate_limited")
        if not self.batcher.running:
            raise APIError(503, "the generation engine is not running", "server_error", "unavailable")
        return limit

    def sampler_overrides(self, body: SamplerExtras) -> dict[str, Any]:
        """The request's sampler fields (over the settings of the model or adapter it asks for), checked."""
        overrides = {name: getattr(body, name) for name in SAMPLER_FIELDS if getattr(body, name) is not None}
        if overrides.get("top_k") == -1:
            overrides["top_k"] = 0
        try:
            self.model.sampler_defaults(self.adapter_for(body.model)).replace(**overrides)
        except DiffGemmaError as err:
            raise APIError(400, str(err), "invalid_request_error", "invalid_value") from None
        return overrides

    def token_biases(self, body: SamplerExtras) -> tuple[tuple[int, ...], dict[int, float] | None]:
        """OpenAI's `logit_bias` as the ids a row never draws (a bias of -100 or less: a ban, exactly) and the
        biases added to the others' logits (up to 100, as OpenAI's range; more is read as 100, as vLLM reads
        it); llama.cpp's texts (`logit_bias_texts`) give theirs to each of their tokens. vLLM's `ignore_eos` bans
        the EOS ids, its `allowed_token_ids` every other id; its `bad_words` are refused."""
        vocab, eos = self.model.config.vocab_size, self.model.settings.eos_token_id
        if body.bad_words:
            message = "bad_words is not supported here (stop strings are: `stop`; bans are: logit_bias -100)"
            raise APIError(400, message, "invalid_request_error", "invalid_value", "bad_words")
        banned = list(eos) if body.ignore_eos else []
        if body.allowed_token_ids is not None:
            allowed = set(body.allowed_token_ids)
            if not allowed or not all(0 <= token < vocab for token in allowed):
                message = f"allowed_token_ids must name some token ids, each from 0 to {vocab - 1}"
                raise APIError(400, message, "invalid_request_error", "invalid_value", "allowed_token_ids")
            banned += [token for token in range(vocab) if token not in allowed]
        biases = {}
        asked = list((body.logit_bias or {}).items())
        for text, bias in body.logit_bias_texts:
            asked += [(str(token), bias) for token in self.model.tokenizer.encode(text, add_special_tokens=False)]
        for key, bias in asked:
            if not key.isdigit() or int(key) >= vocab:
                message = f"logit_bias: {key!r} is not a token id (0-{vocab - 1})"
                raise APIError(400, message, "invalid_request_error", "invalid_value", "logit_bias")
            if not math.isfinite(bias):
                message = f"logit_bias: {key!r} has {bias}; a bias is a number from -100 to 100"
                raise APIError(400, message, "invalid_request_error", "invalid_value", "logit_bias")
            if bias <= BAN:
                banned.append(int(key))
            elif bias:
                biases[int(key)] = min(bias, -BAN)
        return tuple(banned), biases or None

    def stop_ids(self, body: SamplerExtras) -> dict[int, bool]:
        """vLLM's `stop_token_ids` (but the model's EOS ids, which end an answer anyway): each id that ends an
        answer where it settles, and whether it stays in the answer (as vLLM keeps it: unless it is special, a
        token with no text)."""
        vocab, eos = self.model.config.vocab_size, self.model.settings.eos_token_id
        asked = [token for token in body.stop_token_ids or () if token not in eos]
        if not all(0 <= token < vocab for token in asked):
            message = f"stop_token_ids must be token ids from 0 to {vocab - 1}"
            raise APIError(400, message, "invalid_request_error", "invalid_value", "stop_token_ids")
        return {token: self.model.tokenizer.decode([token]) != "" for token in asked}

    def plugin_fill(self, prompt: list[int], suffix: str, asked: int | None) -> tuple[list[int], bool, int]:
        """An editor plugin's fill (llama.cpp's /infill, Ollama's generate with a suffix): (its prompt, whose
        beginning goes where it is over the prompt limit, as llama.cpp cuts it; whether it went; the gap, `asked`
        as a limit: `fill_limit`)."""
        model = self.model
        opening = len(model.tokenizer.encode(""))  # (the BOS, kept)
        prompt, truncated = fit_prompt(prompt, opening, self.options.max_prompt_tokens)
        suffix_tokens = len(model.tokenizer.encode(suffix, add_special_tokens=False))
        length = fill_limit(asked, infill_length(model, None), model.config.canvas_length, suffix_tokens)
        return prompt, truncated, length

    def fill_job(self, prompt: list[int], suffix: str, length: int, body: SamplerExtras, warn: bool = True) -> Job:
        """A fill's job: `length` free positions after `prompt`, then `suffix` held in place on the same canvas
        (`DiffGemma.infill_inputs`; `warn`: say when the suffix's end does not fit)."""
        clamp = self.model.infill_inputs("", suffix, length, warn)[1]
        return self.new_job(prompt, self.admit([prompt], length, 1), body, 0, clamp)

    def prediction_ids(self, body: ChatRequest | CompletionRequest, limit: int) -> list[int] | None:
        """OpenAI's `prediction` as the ids the canvases start from, within the answer's limit; refused with
        thinking, which comes before the answer the prediction lines up with."""
        if body.prediction is None:
            return None
        if isinstance(body, ChatRequest) and thinking_asked(body):
            raise APIError(400, PREDICTION_WITH_THINKING, "invalid_request_error", "invalid_value", "prediction")
        return self.model.prediction_ids(body.prediction.text())[:limit]

    def new_job(
        self,
        prompt: list[int],
        limit: int,
        body: SamplerExtras,
        choice: int,
        clamp: list[int] | None,
        images: tuple[PreparedImage, ...] = (),
        prediction: list[int] | None = None,
        thinking_budget: ThinkingBudget | None = None,
    ) -> Job:
        """A job for one choice, queued (`images`: the prompt's, from `chat_prompt`; `prediction`: the ids its
        canvases start from; `thinking_budget`: `Serving.thinking_budget`'s)."""
        # temperature 0 without a seed: seeded 0, so the same request gets the same answer (as clients expect)
        base = body.seed if body.seed is not None else 0 if body.temperature == 0 else None
        seed = base + choice if base is not None else secrets.randbits(62)
        loop = asyncio.get_running_loop()
        sampler, (banned, biases), stop_ids, adapter = self._job_settings(body)
        job = Job(
            prompt,
            limit,
            seed,
            sampler,
            loop,
            clamp,
            banned,
            images,
            prediction,
            adapter,
            thinking_budget,
            logit_bias=biases,
            min_tokens=body.min_tokens,
            stop_ids=stop_ids,
        )
        try:
            self.batcher.submit(job)
        except EngineStopped as err:
            raise APIError(503, str(err), "server_error", "unavailable") from None
        return job

    def _job_settings(self, body: SamplerExtras) -> tuple:
        """A request's sampler overrides, bans and biases, stop ids and adapter, worked out once for its jobs (its
        n choices, its retries: each a job of the same body), the last request's kept while its body lives (an
        `allowed_token_ids` ban list is most of the vocabulary)."""
        if self._last_settings is None or self._last_settings[0]() is not body:
            worked_out = (self.sampler_overrides(body), self.token_biases(body), self.stop_ids(body))
            self._last_settings = (weakref.ref(body), (*worked_out, self.adapter_for(body.model)))
        return self._last_settings[1]

    def ending(
        self, reply: SettledText, event: RowDraft | RowDone, job: Job
    ) -> tuple[list[int], str, int | None] | None:
        """How a choice ends, given its latest event (`_ending`); once it does, its tokens go into the metrics."""
        ending = _ending(reply, event, job)
        if ending is not None:
            self.batcher.metrics.answered(len(ending[0]), ending[1])
        return ending

    async def run_job(self, job: Job, request: Request, reply: SettledText) -> tuple[RowDone, str]:
        """Wait for a job's result and its finish reason (`_ending`: it ends as soon as its end settles, a stop
        string, say); if the client goes away first, or the wait itself is cancelled (another choice of the
        request failed), the job is cancelled: no job outlives its waiter."""
        self.active += 1
        steps: dict[int, int] = {}  # per canvas, the steps seen so far
        started = time.perf_counter()
        try:
            while True:
                try:
                    event = await asyncio.wait_for(job.events.get(), timeout=0.25)
                except TimeoutError:
                    if await request.is_disconnected():
                        raise APIError(499, "client closed the request", "invalid_request_error") from None
                    continue
                if isinstance(event, Exception):
                    raise engine_failure(event)
                ending = self.ending(reply, event, job)
                if isinstance(event, RowDone):
                    return replace(event, new_tokens=ending[0], eos=ending[2]), ending[1]
                steps[event.canvas_index] = event.step
                if ending is not None:  # (settled: the row may go on with its canvas or its batch)
                    tokens, finish, eos = ending
                    done = RowDone(tokens, list(steps.values()), time.perf_counter() - started, eos, event.cached)
                    return done, finish
        finally:
            job.cancelled.set()  # (after its end, harmless: its row is done, or ends with its canvas)
            self.active -= 1

    async def run_answers(self, runs: list[Awaitable[Answer]]) -> list[Answer]:
        """A request's choices (`run_answer` each), together; when one fails (or the request goes away), the others
        stop too."""
        waits = [asyncio.ensure_future(run) for run in runs]
        try:
            return list(await asyncio.gather(*waits))
        except BaseException:
            for wait in waits:
                wait.cancel()
            raise

    async def run_answer(
        self,
        job: Job,
        reply: SettledText,
        request: Request,
        tools: ToolUse | None,
        answer_format: AnswerFormat | None = None,
        again: Callable[[int], tuple[Job, SettledText]] | None = None,
        param: str = "response_format",
    ) -> Answer:
        """`run_job`'s choice as an Answer; for an answer of a form (`answer_format`: JSON, ...) or a forced tool
        call a fresh draw after each that does not read (`again(k)`: the k-th redraw's job, seeded apart, and its
        reply), at most `format_tries` draws in all, then a 422 that says why the last did not read (`param`: the
        request's format field)."""
        for attempt in range(1, self.options.format_tries + 1):
            done, finish = await self.run_job(job, request, reply)
            content, reasoning = reply.parts(done.new_tokens)
            end = choice_ending(reply, done.new_tokens, finish, tools)
            fault = format_fault(answer_format, content, end, tools)
            if fault is None:
                content = answer_format.text(content) if answer_format is not None else content
                return Answer(done, reply, content, reasoning, end)
            if again is None or attempt == self.options.format_tries:
                break
            job, reply = again(attempt)
        if call_forced(tools):
            what, param = FORCED_CALL, "tool_choice"
        else:
            what = answer_format.what
        message = f"no {what} in {self.options.format_tries} draws; the last: {fault}"
        raise APIError(422, message, "model_error", "answer_unreadable", param)

    def stream_jobs(self, jobs: list[Job], *args: Any, **kwargs: Any) -> AsyncIterator[str]:
        """`_stream_jobs`'s stream of the jobs' events. Its own cleanup cancels the jobs when it ends; a stream
        dropped before it started (its client gone before the first byte) never runs it, so its jobs are
        cancelled when the stream is collected too."""
        stream = self._stream_jobs(jobs, *args, **kwargs)
        weakref.finalize(stream, _cancel, list(jobs))
        return stream

    async def _stream_jobs(
        self,
        jobs: list[Job],
        replies: list[SettledText],
        chunk,
        drafts: bool,
        usage: int | None,
        echoes: list[str],
        done: str = DONE,
        logprobs: Callable[[int, list[int], int | None], Awaitable[dict | list]] | None = None,
        tools: ToolUse | None = None,
        encode: Callable[[dict | list[dict]], str] | None = None,
    ) -> AsyncIterator[str]:
        """One stream for a request's choices (a job each, its `echoes` text first), their events as they come,
        then (`usage`: the prompt tokens, to count) usage, then `done` (the Responses API sends no [DONE]); each
        chunk as `encode` frames it (server-sent events unless given: Ollama's are lines of JSON).
        `logprobs` (choice, its tokens, the EOS that ended it) gives a choice's log-probabilities, sent with its
        last chunk; a choice's tool calls (`tools`: it offered some) come whole, before its last chunk."""
        self.active += len(jobs)
        merged: asyncio.Queue = asyncio.Queue()
        encode = encode or sse

        async def forward(index: int, job: Job) -> None:
            while True:
                await merged.put((index, await job.events.get()))

        forwarders = [asyncio.create_task(forward(index, job)) for index, job in enumerate(jobs)]
        try:
            for index, echo in enumerate(echoes):
                yield encode(chunk(Piece(index, role=True, content=echo)))
            streaming, finals, cached = set(range(len(jobs))), [], 0
            while streaming:
                index, event = await merged.get()
                job, reply = jobs[index], replies[index]
                if index not in streaming:
                    continue
                if isinstance(event, Exception):
                    yield encode(error_body(f"generation failed: {event}", "server_error"))
                    break
                cached = max(cached, event.cached)
                tokens = _visible(event, job) if isinstance(event, RowDraft) else event.new_tokens
                ending = self.ending(reply, event, job)
                if isinstance(event, RowDraft) and drafts:
                    yield encode(chunk(Piece(index, draft=_draft_payload(event, self.model))))
                content, reasoning = reply.deltas(tokens if ending is None else ending[0], final=ending is not None)
                if content or reasoning:
                    yield encode(chunk(Piece(index, content=content, reasoning=reasoning)))
                if ending is not None:
                    end = choice_ending(reply, ending[0], ending[1], tools)
                    if end.calls:
                        yield encode(chunk(Piece(index, tool_calls=end.calls)))
                    last: dict[str, Any] = {"finish": end.finish, "stop_sequence": end.stop_sequence}
                    if logprobs is not None:
                        last["logprobs"] = await logprobs(index, ending[0], ending[2])
                    yield encode(chunk(Piece(index, **last)))
                    finals.append(ending[0])
                    streaming.discard(index)
                    job.cancelled.set()  # (it ended as it settled: its row goes no further than this canvas)
            else:
                if usage is not None:
                    counts = _answers_usage(usage, finals, cached, jobs[0].prediction, self.model.tokenizer)
                    yield encode(chunk(Piece(usage=counts)))
            yield done
        finally:
            for forwarder in forwarders:
                forwarder.cancel()
            _cancel(jobs)  # a client that went away frees its slots, and its rows stop receiving work
            self.active -= len(jobs)

    async def complete(
        self,
        body: ChatRequest | CompletionRequest,
        request: Request,
        prompts: list[list[int]],
        chat: bool,
        echoes: list[str] | None = None,
        clamp: list[int] | None = None,
        tools: ToolUse | None = None,
        answer_format: AnswerFormat | None = None,
        images: tuple[PreparedImage, ...] = (),
        thinking_budget: ThinkingBudget | None = None,
    ):
        """Admit, queue, then stream the jobs (`n` a prompt, choice k * n + i prompt k's i-th, seeded seed + its
        index) or wait for them: what both completion routes share. `echoes`: each prompt's text, to come first;
        `clamp`: ids held in place on the first canvas (a fill: its `max_tokens` free positions, the suffix);
        `tools`: the chat offered tools, so its choices' calls come back as `tool_calls`; `answer_format`: the
        chat asked for a form, JSON, say (`run_answer`: a choice is read whole, then sent, as one piece if
        streamed); `images`: a chat prompt's (`chat_prompt`); `thinking_budget`: each choice's most tokens of
        thought. OpenAI's `prediction` starts every choice's canvas from its text; usage then says how many of its
        tokens the answers kept in place."""
        prompts = self.truncated(prompts, body, bool(images or echoes))
        newer = getattr(body, "max_completion_tokens", None)  # (OpenAI's chat: the newer name, where given)
        named = "max_completion_tokens" if newer else "max_tokens"
        limit = self.admit(prompts, newer or body.max_tokens, body.n, chat, param=named)
        prediction = self.prediction_ids(body, limit)
        top = self.requested_logprobs(body)  # (what it refuses, it refuses before a job is queued)
        rows = [prompt for prompt in prompts for _ in range(body.n)]
        leading = [echoes[index // body.n] if echoes else "" for index in range(len(rows))]

        def redraw(index: int, attempt: int) -> tuple[Job, SettledText]:
            """Choice `index`'s job (its `attempt`-th draw, seeded apart from every other draw) and its reply (made
            first: its stop strings are checked before a job is queued)."""
            reply = reply_text(self.model, chat, body.stop, tools)
            seed_index = index + attempt * len(rows)
            job = self.new_job(rows[index], limit, body, seed_index, clamp, images, prediction, thinking_budget)
            return job, reply

        drawn = [redraw(index, 0) for index in range(len(rows))]
        jobs, replies = [job for job, _ in drawn], [reply for _, reply in drawn]
        identity = _identity("chatcmpl" if chat else "cmpl")
        prompt_tokens = sum(len(prompt) for prompt in prompts)
        shown = reasoning_shown(body) if isinstance(body, ChatRequest) else True
        chunk = _chunk_maker(identity, self.served_name(body.model), chat, shown)

        async def choice_logprobs(index: int, tokens: list[int], eos: int | None) -> dict[str, Any]:
            echo = bool(leading[index])
            adapter = jobs[index].adapter
            return await self.reply_logprobs(rows[index], replies[index], tokens, eos, top, chat, echo, images, adapter)

        scorer = choice_logprobs if top is not None else None
        usage_chunk = prompt_tokens if _include_usage(body) else None
        if body.stream and not read_whole(answer_format, tools):
            stream = self.stream_jobs(
                jobs, replies, chunk, body.drafts, usage_chunk, leading, logprobs=scorer, tools=tools
            )
            return event_stream(stream)
        answers = await self.run_answers(
            [
                self.run_answer(job, reply, request, tools, answer_format, partial(redraw, index))
                for index, (job, reply) in enumerate(zip(jobs, replies, strict=True))
            ]
        )
        every_logprobs: list[dict[str, Any] | None] = [None] * len(answers)
        if top is not None:  # every choice scored in one pass
            scored = [
                (rows[i], a.reply, a.done.new_tokens, a.done.eos, bool(leading[i])) for i, a in enumerate(answers)
            ]
            every_logprobs = list(await self.choices_logprobs(scored, top, chat, images, jobs[0].adapter))
        choices, pieces = [], []
        for index, (answer, logprobs) in enumerate(zip(answers, every_logprobs, strict=True)):
            end, content = answer.end, answer.content
            pieces += answer.pieces(index, logprobs)
            choice: dict[str, Any] = {"index": index, "finish_reason": end.finish}
            if end.stop_sequence is not None:  # (vLLM's field: the stop string that ended it)
                choice["stop_reason"] = end.stop_sequence
            if logprobs is not None:
                choice["logprobs"] = logprobs
            if not chat:
                choices.append({**choice, "text": leading[index] + content})
                continue
            message: dict[str, Any] = {"role": "assistant", "content": content}
            if answer.reasoning and shown:
                # under both names clients read it by: vLLM's `reasoning` now, DeepSeek's `reasoning_content` before
                message.update(reasoning=answer.reasoning, reasoning_content=answer.reasoning)
            if end.calls:  # (OpenAI's content is null when a reply is its calls alone)
                message.update(content=content or None, tool_calls=end.calls)
            choices.append({**choice, "message": message})
        cached = max(answer.done.cached for answer in answers)  # (its prompts counted once, so the most any held)
        finals = [answer.done.new_tokens for answer in answers]
        usage = _answers_usage(prompt_tokens, finals, cached, prediction, self.model.tokenizer)
        if body.stream:  # (a JSON answer: each choice read whole, then sent whole)
            last = [Piece(usage=usage)] if usage_chunk is not None else []
            return event_stream([sse(chunk(piece)) for piece in [*pieces, *last]] + [DONE])
        served = self.served_name(body.model)
        response: dict[str, Any] = {**identity, "model": served, "usage": usage, "choices": choices}
        if not chat:
            return {**response, "object": "text_completion"}
        steps = [answer.done.steps for answer in answers]  # per choice, per canvas
        return {**response, "object": "chat.completion", "diffgemma": {"steps": steps[0], "choices_steps": steps}}

    def requested_logprobs(self, body: ChatRequest | CompletionRequest) -> int | None:
        """The alternatives a token a request asks for with its log-probabilities (None: no log-probabilities)."""
        if not isinstance(body, ChatRequest):
            return body.logprobs
        if body.top_logprobs is not None and not body.logprobs:  # chat asks by a flag, the alternatives apart
            message = "top_logprobs needs logprobs: true"
            raise APIError(400, message, "invalid_request_error", "invalid_value", "top_logprobs")
        return (body.top_logprobs or 0) if body.logprobs else None

    async def reply_logprobs(
        self,
        prompt: list[int],
        reply: SettledText,
        tokens: list[int],
        eos: int | None,
        top: int,
        chat: bool,
        echo: bool,
        images: tuple[PreparedImage, ...] = (),
        adapter: str | None = None,
    ) -> dict[str, Any]:
        """A choice's `logprobs` (`choices_logprobs` of one)."""
        return (await self.choices_logprobs([(prompt, reply, tokens, eos, echo)], top, chat, images, adapter))[0]

    async def choices_logprobs(
        self,
        choices: list[tuple[list[int], SettledText, list[int], int | None, bool]],
        top: int,
        chat: bool,
        images: tuple[PreparedImage, ...] = (),
        adapter: str | None = None,
    ) -> list[dict[str, Any]]:
        """Choices' `logprobs` (each its prompt, reply, tokens, the EOS that ended it, and whether it echoes),
        scored in one pass: each prompt and its tokens (a text completion's EOS too, if one ended it), in the
        chat shape (the answer's tokens: those after the thinking, when it thought) or the completion shape
        (`echo`: the prompt's tokens listed too). `images`: the pictures of their (one) prompt; `adapter`: the
        LoRA adapter that wrote them."""
        kept = []
        for _, reply, tokens, eos, _ in choices:
            kept.append([*reply.kept(tokens), *([eos] if not chat and eos is not None else [])])
        rows = [choice[0] + ids for choice, ids in zip(choices, kept, strict=True)]
        scored = await self.score(rows, top, images, adapter)
        shaped = []
        for (prompt, _, _, _, echo), ids, scores in zip(choices, kept, scored, strict=True):
            if chat:
                thought_end = self.model.tokenizer.token_id(THINKING_CLOSE)
                answer = max((i + 1 for i, token in enumerate(ids) if token == thought_end), default=0)
                shaped.append(chat_logprobs(self.model.tokenizer, scores, len(prompt) + answer))
            else:
                shaped.append(completion_logprobs(self.model.tokenizer, scores, 0 if echo else len(prompt)))
        return shaped

    async def score(
        self, rows: list[list[int]], top: int, images: tuple[PreparedImage, ...] = (), adapter: str | None = None
    ) -> list[TokenScores]:
        """`DiffGemma.score` of rows of ids in one pass, on the engine's thread between steps (`images`: the
        pictures every row's prompt holds), with `adapter` in place."""
        model = self.model

        def work() -> list[TokenScores]:
            return model.score(rows, top, [model.image_features(images)] * len(rows) if images else None)

        return await self._on_engine(work, adapter)

    async def embed(
        self, rows: list[list[int]], normalize: bool, dimensions: int | None, param: str, adapter: str | None = None
    ) -> torch.Tensor:
        """`DiffGemma.embed` of rows of ids (each within the prompt limit): [rows, dimensions], in their order. A
        pass of similar lengths at a time (`embedding.passes`) on the engine's thread, so the denoising under way
        goes on between passes rather than wait for a long list; with `adapter` in place."""
        if len(rows) > MAX_EMBED_INPUTS:
            message = f"{len(rows)} inputs; at most {MAX_EMBED_INPUTS} a request"
            raise APIError(400, message, "invalid_request_error", "invalid_value", param)
        try:
            check_dimensions(dimensions, self.model.config.hidden_size)
        except DiffGemmaError as err:
            raise APIError(400, str(err), "invalid_request_error", "invalid_value", "dimensions") from None
        vectors = torch.empty(len(rows), dimensions or self.model.config.hidden_size)
        for group in passes([len(ids) for ids in rows]):
            part = [rows[index] for index in group]
            vectors[group] = await self._on_engine(
                lambda part=part: self.model.embed(part, normalize, dimensions), adapter
            )
        return vectors

    async def _on_engine(self, work: Callable[[], Any], adapter: str | None = None) -> Any:
        """`work()` on the engine's thread between steps, with `adapter` in place (503 once the engine has
        stopped)."""
        try:
            return await self.batcher.run(work, adapter)
        except EngineStopped as err:
            raise APIError(503, str(err), "server_error", "unavailable") from None

    def chat_prompt(
        self, messages: list[dict[str, Any]], thinking: bool, param: str, prefill: str = "", tools: list | None = None
    ) -> tuple[list[int], tuple[PreparedImage, ...]]:
        """Messages (and the tools offered) through the chat template, then the answer's `prefill`: (the prompt's
        ids, each image part's run of image ids in its place; the images, read and cut into patches, whose soft
        tokens the engine makes when the job's row joins a batch). What it refuses is the request's error
        (`param`: its field). A special token's text in a message is read as text, as OpenAI's API reads it: a
        client's user cannot forge the template's turn markers."""
        messages, images = split_images(messages)
        try:
            ids = self.model.tokenizer.encode_chat(messages, thinking, prefill, sanitize=True, tools=tools)
            if not images:
                return ids, ()
            ids, prepared = self.model.image_prompt(ids, images)
        except DiffGemmaError as err:
            raise APIError(400, str(err), "invalid_request_error", "invalid_value", param) from None
        return ids, tuple(prepared)

    def thinking_budget(
        self,
        body: SamplerExtras,
        thinking: bool,
        tools: ToolUse | None,
        tokens: Any = None,
        prefill: bool = False,
        effort: Any = None,
        field: str = "thinking.budget_tokens",
    ) -> ThinkingBudget | None:
        """The most tokens of thought a request's reply may write (`DiffGemma.thinking_budget`): vLLM's
        `thinking_token_budget`, or `tokens` (the request's `field`: Anthropic's `thinking.budget_tokens`,
        OpenRouter's `reasoning.max_tokens`), else what OpenAI's reasoning `effort` buys (`EFFORT_BUDGETS`), else
        the server's (`serve --thinking-budget`); None where there is none or the reply does not think. A reply
        begun where its thought would go (a forced tool call, or an answer begun: `prefill`) refuses a budget
        asked for (400), as Anthropic's API does, and takes no other."""
        if body.thinking_token_budget is not None:
            tokens, field = body.thinking_token_budget, "thinking_token_budget"
        begun = "tool_choice" if call_forced(tools) else "continue_final_message" if prefill else None
        if tokens is None and begun is None:
            tokens = EFFORT_BUDGETS.get(effort) if isinstance(effort, str) else None
            tokens = self.options.thinking_budget if tokens is None else tokens
        if tokens is None or not thinking:
            return None
        if begun is not None:
            message = f"{begun} begins the reply where its thought would go: no thinking budget with it"
            raise APIError(400, message, "invalid_request_error", "invalid_value", begun)
        try:
            return self.model.thinking_budget(tokens)
        except DiffGemmaError as err:
            raise APIError(400, str(err), "invalid_request_error", "invalid_value", field) from None

    def plan_tools(
        self, tools: list[dict[str, Any]] | None, choice: ToolChoiceField, parallel: bool = True
    ) -> tuple[list | None, ToolUse | None]:
        """A request's `tools` and `tool_choice` -> (the tools its prompt offers, how its replies read calls);
        (None, None) when it offers none."""
        try:
            check_tools(tools or [])
        except DiffGemmaError as err:
            raise APIError(400, str(err), "invalid_request_error", "invalid_value", "tools") from None
        try:
            offered, lead = tool_plan(tools, tool_choice_name(choice))
        except DiffGemmaError as err:
            raise APIError(400, str(err), "invalid_request_error", "invalid_value", "tool_choice") from None
        if offered is None:
            return None, None
        if not self.model.tokenizer.renders_tools:
            message = "this model's chat template does not write tools, so none can be offered"
            raise APIError(400, message, "invalid_request_error", "invalid_value", "tools")
        lead_ids = self.model.tokenizer.encode(lead, add_special_tokens=False) if lead else []
        return offered, ToolUse(lead_ids, parallel, tuple(offered))

    def messages_prompt(
        self, body: Conversation
    ) -> tuple[list[int], tuple[PreparedImage, ...], ToolUse | None, AnswerFormat | None, str]:
        """A Messages API conversation's prompt ids (its reply made to begin a call if its tool_choice asks) and
        images, its tools, and the JSON answer's form if it asks for one (told in the system turn), with the field
        it came in."""
        conversation, thinking = request_conversation(body)
        spec, param = messages_format(body)
        answer_format = asked_format(spec, param)
        conversation = answer_format.with_instruction(conversation) if answer_format is not None else conversation
        offered, tools = self.plan_tools(*messages_tools(body))
        prompt, images = self.chat_prompt(conversation, thinking, "messages", "", offered)
        return prompt + (tools.lead if tools else []), images, tools, answer_format, param

    async def score_prompts(self, body: CompletionRequest, prompts: list[list[int]], texts: list[str]):
        """Completions with `max_tokens` 0 and `echo`: nothing generated, each prompt given back scored (with
        `logprobs`), as evaluation harnesses ask for a text's likelihood."""
        if not body.echo or body.suffix:
            message = "max_tokens 0 generates nothing: it is for scoring a prompt, with echo and without a suffix"
            raise APIError(400, message, "invalid_request_error", "invalid_value", "max_tokens")
        self.admit(prompts, None, body.n)
        top = self.requested_logprobs(body)
        adapter = self.adapter_for(body.model)
        scored = await self.score(prompts, top, (), adapter) if top is not None else None  # every prompt in one pass
        choices = []
        for index in range(len(prompts) * body.n):
            choice = {"index": index, "text": texts[index // body.n], "finish_reason": "length"}
            if scored is not None:
                choice["logprobs"] = completion_logprobs(self.model.tokenizer, scored[index // body.n], 0)
            choices.append(choice)
        usage = _usage(sum(len(prompt) for prompt in prompts), 0)
        identity = _identity("cmpl")
        if body.stream:  # a chunk a choice, as whole
            chunk = _chunk_maker(identity, self.served_name(body.model), chat=False)
            last = [chunk(Piece(usage=usage))] if _include_usage(body) else []
            events = [
                chunk(Piece(c["index"], content=c["text"], finish=c["finish_reason"], logprobs=c.get("logprobs")))
                for c in choices
            ]
            return event_stream([sse(event) for event in [*events, *last]] + [DONE])
        response = {**identity, "object": "text_completion", "model": self.served_name(body.model), "usage": usage}
        return {**response, "choices": choices}

    async def insert(self, body: CompletionRequest, request: Request, prompts: list[list[int]], texts: list[str]):
        """Completions with a `suffix`: each choice fills `max_tokens` positions (at most a canvas; 32 if not
        given) between its prompt and the suffix, held in place after them on the same canvas. The fills are
        completions like any other (batched with other requests, streamed as they settle, `stop`, `echo`)."""
        length = infill_length(self.model, body.max_tokens)
        body = body.model_copy(update={"max_tokens": length})
        clamp = self.model.infill_inputs("", body.suffix, length)[1]
        return await self.complete(body, request, prompts, chat=False, echoes=texts if body.echo else None, clamp=clamp)


def _identity(prefix: str) -> dict[str, Any]:
    return {"id": f"{prefix}-{uuid.uuid4().hex[:24]}", "created": int(time.time())}


def _include_usage(body: ChatRequest | CompletionRequest) -> bool:
    """Whether a stream ends with a usage chunk: only when asked for, as OpenAI sends it."""
    return body.stream_options is not None and body.stream_options.include_usage


def _cancel(jobs: list[Job]) -> None:
    """The jobs' rows end with the canvas they are in, and they receive no more events."""
    for job in jobs:
        job.cancelled.set()


def event_stream(chunks: AsyncIterator[str] | list[str]) -> StreamingResponse:
    return StreamingResponse(chunks, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def _visible(event: RowDraft, job: Job) -> list[int]:
    """A row's tokens that are final: earlier canvases and this one's settled prefix, within the job's limit."""
    return (event.committed + event.ids[: event.settled])[: job.max_new_tokens]


def _usage(prompt_tokens: int, completion: int, cached: int = 0) -> dict[str, Any]:
    """OpenAI's usage: `cached`, the prompt tokens the prefix cache held (`prompt_tokens_details`, as vLLM's)."""
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": prompt_tokens + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    }


def _answers_usage(
    prompt_tokens: int, answers: list[list[int]], cached: int, prediction: list[int] | None, tokenizer: Tokenizer
) -> dict[str, Any]:
    """`_usage` of a request's answers (their tokens), with OpenAI's `completion_tokens_details` where they have
    something to say: the tokens the answers thought (`reasoning_tokens`, their thinking channels, markers
    included), and where a prediction was given, its tokens the answers kept in place (accepted) and the rest
    (rejected), summed over the answers."""
    usage = _usage(prompt_tokens, sum(len(tokens) for tokens in answers), cached)
    details = {}
    reasoning = sum(tokenizer.thought_length(tokens) for tokens in answers)
    if reasoning:
        details["reasoning_tokens"] = reasoning
    if prediction is not None:
        kept = sum(sum(a == b for a, b in zip(prediction, tokens, strict=False)) for tokens in answers)
        details["accepted_prediction_tokens"] = kept
        details["rejected_prediction_tokens"] = len(prediction) * len(answers) - kept
    if details:
        usage["completion_tokens_details"] = details
    return usage


def _ending(reply: SettledText, event: RowDraft | RowDone, job: Job) -> ChoiceEnd | None:
    """How a choice ends, given its latest event: (its final tokens, its finish reason, the EOS right after them
    if one ended it), or None while it goes on. A stop string in its answer, or one of its stop ids, ends it
    there (the first of them); else its row's end does, at its token limit or before. Settled tokens never
    change, so they end it before its canvas does (or its batch: a row that ended waits for the others): an EOS
    among them, or as many as its limit."""
    if isinstance(event, RowDone):
        through = _stopped(reply, event.new_tokens, job)
        final = event.new_tokens if through is None else through
        finish = "stop" if through is not None or len(final) < job.max_new_tokens else "length"
        return final, finish, event.eos if final == event.new_tokens else None
    tokens = _visible(event, job)
    through = _stopped(reply, tokens, job)
    if through is not None:
        return through, "stop", None
    eos_at = next((index for index, token in enumerate(tokens) if token in reply.eos), None)
    if eos_at is not None:
        return tokens[:eos_at], "stop", tokens[eos_at]
    return (tokens, "length", None) if len(tokens) >= job.max_new_tokens else None


def _stopped(reply: SettledText, tokens: list[int], job: Job) -> list[int] | None:
    """`tokens` through the first stop string (`SettledText.through_stop`) or stop id (`Job.stop_ids`: the id
    kept, or not) among them, whichever comes first; None where neither has come."""
    ends = [] if (through := reply.through_stop(tokens)) is None else [through]
    at = next((index for index, token in enumerate(tokens) if token in job.stop_ids), None)
    if at is not None:
        ends.append(tokens[: at + job.stop_ids[tokens[at]]])
    return min(ends, key=len, default=None)


def _draft_payload(event: RowDraft, model: DiffGemma) -> dict[str, Any]:
    tokenizer = model.tokenizer
    return {
        "canvas": event.canvas_index,
        "step": event.step,
        "tokens": [tokenizer.decode([t], skip_special_tokens=False) for t in event.ids],
        "accepted": event.accepted,
        "entropy": [round(e, 4) for e in event.entropy],
        "settled": event.settled,
        "before": tokenizer.decode(event.committed),
        "text": tokenizer.decode(event.committed + event.ids),
    }


def engine_failure(err: Exception) -> APIError:
    """A failure of the model's work as the API's error: out of memory is the batch's, not the server's (503: its
    memory is back once it is dropped, and a retry, or a smaller request, may fit); anything else a 500."""
    if out_of_memory(err):
        message = f"out of memory ({first_line(err)}); fewer or shorter requests fit"
        return APIError(503, message, "server_error", "out_of_memory")
    if isinstance(err, EngineStopped):
        return APIError(503, str(err), "server_error", "unavailable")
    return APIError(500, f"generation failed: {type(err).__name__}: {first_line(err)}", "server_error")


def _chunk_maker(identity: dict, model_name: str, chat: bool, reasoning: bool = True):
    """Stream chunks of one response: chat deltas (their thinking unless `reasoning` is False) or completion
    text; usage and draft chunks carry no choices."""
    base = {**identity, "object": "chat.completion.chunk" if chat else "text_completion", "model": model_name}

    def chunk(piece: Piece) -> dict:
        if piece.usage is not None:
            return {**base, "choices": [], "usage": piece.usage}
        if piece.draft is not None:
            return {**base, "choices": [], "draft": {**piece.draft, "index": piece.index}}
        choice: dict[str, Any] = {"index": piece.index, "finish_reason": piece.finish}
        if piece.stop_sequence is not None:
            choice["stop_reason"] = piece.stop_sequence
        if piece.logprobs is not None:
            choice["logprobs"] = piece.logprobs
        if not chat:
            return {**base, "choices": [{**choice, "text": piece.content}]}
        delta: dict[str, Any] = {"role": "assistant", "content": ""} if piece.role else {}
        if piece.content:
            delta["content"] = piece.content
        if piece.reasoning and reasoning:
            delta.update(reasoning=piece.reasoning, reasoning_content=piece.reasoning)
        if piece.tool_calls:
            delta["tool_calls"] = [{"index": position, **call} for position, call in enumerate(piece.tool_calls)]
        return {**base, "choices": [{**choice, "delta": delta}]}

    return chunk
