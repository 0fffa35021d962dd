"""Ollama's API, for the desktop apps, editor plugins and libraries that reach a local model only through it (its
Python and JavaScript clients, LangChain's ChatOllama, Continue, Open WebUI's Ollama connection): `/api/chat`,
`/api/generate` (a chat turn, a raw prompt, or with `suffix` a fill between prompt and suffix), `/api/embed` and
`/api/embeddings` (texts' vectors, `DiffGemma.embed`), and the routes clients ask what is served (`/api/tags`,
`/api/show`, `/api/ps`, `/api/version`).

A request's `options` are its sampler settings (`temperature`, `seed`, `top_k`, `top_p`, `min_p`, `num_predict`,
`stop`, and diffgemma's own: `max_denoising_steps`, ...); those that tune llama.cpp's loading (`num_ctx`, `num_gpu`,
...) mean nothing here and are ignored, as Ollama ignores options it does not know, and so are its penalties
(`PENALTIES`), with a line in the log. Answers stream by default, as Ollama's do: one JSON object a line, text as it
settles, the last one with `done: true`, why it ended and the counts. Any model name is answered with the model
served, as the OpenAI routes answer it; where the server serves LoRA adapters (`--lora-modules`), each is listed as
a model of its own, and a request names the one it asks for.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationError

from ..api import DiffGemma
from ..config import NEUTRAL_PENALTIES, SAMPLER_FIELDS, SamplerSettings
from ..images import PreparedImage
from ..reply import SettledText
from ..scoring import MAX_TOP
from ..structured import AnswerFormat
from .batcher import Job
from .schema import (
    APIError,
    Piece,
    SamplerExtras,
    StopField,
    asked_format,
    effort_thinks,
    stream_failure,
)
from .service import (
    Answer,
    Serving,
    ToolUse,
    check_token_ids,
    read_whole,
    reply_text,
    whole_events,
)

# Ollama's penalties: clients send its default `repeat_penalty` of 1.1 as a matter of course, which over the whole
# chat (the template's turn markers, the EOS among them, all "seen") would change every answer, so they are ignored
# with a line in the server's log, as Ollama's own engine ignored them (the OpenAI routes take OpenAI's and vLLM's)
PENALTIES = ("repeat_penalty", "presence_penalty", "frequency_penalty", "repeat_last_n", "penalize_newline")
NEUTRAL = {**NEUTRAL_PENALTIES, "repeat_penalty": NEUTRAL_PENALTIES["repetition_penalty"]}  # (Ollama's name)
log = logging.getLogger("diffgemma.server")
_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        log.warning(message)


VERSION = "0.12.0"  # the Ollama API version `/api/version` answers (clients check for a minimum)
NDJSON = "application/x-ndjson"


def stamp(moment: datetime | None = None) -> str:
    """A moment (now, unless given) as Ollama writes one."""
    return (moment or datetime.now(UTC)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def ndjson(payload: dict | list[dict]) -> str:
    """A payload (or each of a list) as a line of JSON; an error as Ollama streams one: `{"error": message}`."""
    lines = []
    for one in payload if isinstance(payload, list) else [payload]:
        error = stream_failure(one)
        if error is not None:
            one = {"error": error.get("message", "")}
        lines.append(json.dumps(one, ensure_ascii=False, separators=(",", ":")) + "\n")
    return "".join(lines)


def on_ollama_route(request: Request) -> bool:
    """Whether a request is to one of Ollama's routes (its errors are Ollama's shape)."""
    return request.url.path.startswith("/api/")


SERVED = "/api/chat, /api/generate, /api/embed, /api/embeddings, /api/tags, /api/show, /api/ps and /api/version"


def unknown_route(request: Request) -> str:
    """What a request to one of Ollama's routes that is not served here is told (its model management: this server
    serves the checkpoint it was started with, and the adapters it was given)."""
    where = f"{request.method} {request.url.path}"
    return f"{where} is not served here: diffgemma serves Ollama's {SERVED} (the models it started with, no others)"


def read_as_json(request: Request) -> None:
    """A request read as JSON whatever content type it names, as Ollama and llama.cpp read theirs: their
    documentation's examples post with `curl -d` and no header, which curl sends as form data."""
    headers = [(key, value) for key, value in request.scope["headers"] if key != b"content-type"]
    request.scope["headers"] = [*headers, (b"content-type", b"application/json")]


def bad(message: str, param: str) -> APIError:
    return APIError(400, message, "invalid_request_error", "invalid_value", param)


def image_parts(images: list[str], param: str) -> list[dict[str, Any]]:
    """Ollama's images (base64, no `data:` prefix) as image parts of a message's content."""
    parts = []
    for image in images:
        try:
            parts.append({"type": "image", "image": base64.b64decode(image, validate=True)})
        except (binascii.Error, ValueError):
            raise bad("an image is not base64 (Ollama sends each image's bytes as base64)", param) from None
    return parts


class OllamaMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant", "tool"]
    content: str | None = ""  # (null in a calling turn, as some clients send it)
    thinking: str | None = None
    images: list[str] | None = None
    tool_calls: list[dict[str, Any]] | None = None  # {"function": {"name", "arguments": {...}}}
    tool_name: str | None = None  # a tool's answer: the tool that gave it

    def for_template(self) -> dict[str, Any]:
        content: str | list[dict[str, Any]] = self.content or ""
        if self.images:  # (its pictures before its text, each where the template writes an image part)
            content = [*image_parts(self.images, "messages"), {"type": "text", "text": self.content or ""}]
        message: dict[str, Any] = {"role": self.role, "content": content}
        if self.thinking:
            message["reasoning_content"] = self.thinking
        if self.tool_calls:
            message["tool_calls"] = self.tool_calls
        if self.tool_name:
            message["name"] = self.tool_name
        return message


class OllamaRequest(BaseModel):
    """What `/api/chat` and `/api/generate` share."""

    model_config = ConfigDict(extra="ignore")
    model: str = ""
    options: dict[str, Any] | None = None
    stream: bool = True
    format: str | dict[str, Any] | None = None  # "json", or a JSON schema the answer must follow
    think: bool | str | None = None  # true, or an effort ("low", "medium", "high"): the model thinks first
    logprobs: bool = False  # each answer token's log-probability (`top_logprobs`: with its likeliest others)
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP)
    keep_alive: Any = None  # (the model stays loaded while the server runs; 0 with nothing to do: "unload")

    def unloads(self) -> bool:
        """Whether the request asks for the model to be unloaded (`keep_alive` 0: what `ollama stop` sends)."""
        return str(self.keep_alive).strip() in ("0", "0s", "0m", "0h", "0.0")

    def sampler(self) -> SamplerExtras:
        """The options as the sampler fields the other routes read (which check them: `Serving.new_job`)."""
        options = self.options or {}
        ignored = [name for name in PENALTIES if options.get(name) not in (None, NEUTRAL.get(name))]
        if ignored:
            _warn_once(f"options {', '.join(ignored)} ignored: Ollama's penalties are not applied here")
        try:
            fields = {k: v for k, v in options.items() if k not in PENALTIES and k != "model"}
            return SamplerExtras.model_validate({**fields, "model": self.model})
        except ValidationError as err:
            first = err.errors()[0]
            where = ".".join(str(part) for part in first["loc"])
            raise bad(f"options.{where}: {first['msg']}", "options") from None

    def limit(self, most: int) -> int | None:
        """`num_predict`: the answer's token limit, at most `most` (the server's; -1, -2 or unset: that one)."""
        limit = (self.options or {}).get("num_predict")
        if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool)):
            raise bad(f"options.num_predict must be an integer, got {limit!r}", "options")
        return min(limit, most) if limit is not None and limit > 0 else None

    def stop(self) -> StopField:
        stop = (self.options or {}).get("stop")
        strings = [stop] if isinstance(stop, str) else stop if isinstance(stop, list) else [None]
        if stop is not None and not all(isinstance(one, str) for one in strings):
            raise bad("options.stop must be a string or a list of strings", "options")
        return stop

    def thinking(self) -> bool:
        return self.think is True or (isinstance(self.think, str) and effort_thinks(self.think))

    def answer_form(self) -> dict[str, Any] | bool | None:
        """`format` as the JSON form the other routes read: "json" any JSON object, a schema its own."""
        if self.format in (None, ""):
            return None
        if self.format == "json":
            return True
        if isinstance(self.format, str):
            raise bad(f'format must be "json" or a JSON schema, got {self.format!r}', "format")
        return self.format


class OllamaChatRequest(OllamaRequest):
    messages: list[OllamaMessage] = Field(default_factory=list)
    tools: list[dict[str, Any]] | None = None


class OllamaGenerateRequest(OllamaRequest):
    prompt: str = ""
    suffix: str = ""  # the text after the gap: the answer fills between prompt and suffix
    system: str | None = None
    template: str | None = None
    raw: bool = False  # the prompt as the model reads it, without the chat template
    context: list[int] | None = None  # a previous answer's `context`: the conversation so far, as ids
    images: list[str] | None = None


class OllamaEmbedRequest(BaseModel):
    """`/api/embed`: a text or texts; `truncate` (the default) cuts each to the prompt limit where Ollama cuts
    it to the context, else a longer one is refused; `dimensions` keeps each vector's first so many."""

    model_config = ConfigDict(extra="ignore")
    model: str = ""
    input: str | list[str] = ""
    truncate: bool = True
    dimensions: int | None = Field(default=None, ge=1)


class OllamaShowRequest(BaseModel):
    """`/api/show`: the model to describe (`name` in Ollama's older clients)."""

    model_config = ConfigDict(extra="ignore")
    model: str = Field(default="", validation_alias=AliasChoices("model", "name"))


class OllamaEmbeddingsRequest(BaseModel):
    """`/api/embeddings`, Ollama's first form: one `prompt`, its vector as it comes (not scaled to unit length)."""

    model_config = ConfigDict(extra="ignore")
    model: str = ""
    prompt: str = ""


def without_oldest_turn(messages: list[dict[str, Any]]) -> list[dict[str, Any]] | None:
    """The conversation without its oldest message but the system's (and the tool answers that followed it, which
    would answer no call), or None where only the last message is left beside the system's."""
    kept = [index for index, message in enumerate(messages) if message["role"] != "system"]
    if len(kept) <= 1:
        return None
    first = kept[0]
    after = first + 1
    while after < kept[-1] and messages[after]["role"] == "tool":
        after += 1
    return messages[:first] + messages[after:]


def tool_calls(calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """OpenAI-shaped calls (arguments as JSON text) in Ollama's shape (arguments as an object)."""
    return [
        {
            "id": call["id"],
            "function": {
                "index": index,
                "name": call["function"]["name"],
                "arguments": json.loads(call["function"]["arguments"]),
            },
        }
        for index, call in enumerate(calls)
    ]


class Reply:
    """One answer in Ollama's shape, streamed (`chunk` of each piece the engine's stream hands on) or whole
    (`whole`): `/api/chat`'s `message` (`chat`), or `/api/generate`'s `response`, `thinking` and, at the end,
    `context` (the prompt's ids and the answer's, for a client to continue from). `turn`: the answer is read as
    a chat turn (its thinking apart, its end-of-turn dropped), as all are but raw prompts' and fills'."""

    def __init__(
        self, model_name: str, chat: bool, turn: bool, prompt: list[int], encode: Callable[[str], list[int]]
    ) -> None:
        self.model_name, self.chat, self.turn, self.prompt, self.encode = model_name, chat, turn, prompt, encode
        self.started = time.perf_counter()
        self.text: list[str] = []
        self.finish = "stop"
        self.logprobs: list[dict[str, Any]] | None = None  # the answer's, given with its last line

    def _line(self, content: str = "", thinking: str = "", calls: list[dict] | None = None) -> dict[str, Any]:
        line: dict[str, Any] = {"model": self.model_name, "created_at": stamp()}
        if self.chat:
            message: dict[str, Any] = {"role": "assistant", "content": content}
            if thinking:
                message["thinking"] = thinking
            if calls:
                message["tool_calls"] = tool_calls(calls)
            return {**line, "message": message, "done": False}
        line["response"] = content
        if thinking:
            line["thinking"] = thinking
        return {**line, "done": False}

    def _last(self, prompt_tokens: int, answer_tokens: int, line: dict[str, Any] | None = None) -> dict[str, Any]:
        """The last line (`line`'s text in it, for an answer sent whole): why it ended, the counts, the time."""
        nanoseconds = int((time.perf_counter() - self.started) * 1e9)
        last = {
            **(line or self._line()),
            "done": True,
            "done_reason": "length" if self.finish == "length" else "stop",
            # the whole answer's time, prompt included (the engine does not time them apart)
            "total_duration": nanoseconds,
            "load_duration": 0,
            "prompt_eval_count": prompt_tokens,
            "eval_count": answer_tokens,
            "eval_duration": nanoseconds,
        }
        if not self.chat:
            last["context"] = self.prompt + self.encode("".join(self.text))
        if self.logprobs is not None:
            last["logprobs"] = self.logprobs
        return last

    def chunk(self, piece: Piece) -> list[dict[str, Any]]:
        """A streamed piece's line (none for one with nothing to say); the usage piece makes the last."""
        if piece.usage is not None:
            return [self._last(piece.usage["prompt_tokens"], piece.usage["completion_tokens"])]
        if piece.finish is not None:
            self.finish, self.logprobs = piece.finish, piece.logprobs
        if piece.draft is not None or not (piece.content or piece.reasoning or piece.tool_calls):
            return []
        self.text.append(piece.content)
        return [self._line(piece.content, piece.reasoning, list(piece.tool_calls))]

    def whole(self, answer: Answer, prompt_tokens: int, logprobs: list[dict[str, Any]] | None) -> dict[str, Any]:
        """An answer in one object, as Ollama answers `stream: false`."""
        self.finish, self.text, self.logprobs = answer.end.finish, [answer.content], logprobs
        line = self._line(answer.content, answer.reasoning, answer.end.calls)
        return self._last(prompt_tokens, len(answer.done.new_tokens), line)

    def loaded(self, unload: bool = False) -> dict[str, Any]:
        """What Ollama answers a request with nothing to generate: clients send one to load a model, or with
        `keep_alive` 0 to unload it (answered as Ollama answers it; the model stays, serving other requests)."""
        return {**self._line(), "done": True, "done_reason": "unload" if unload else "load"}


def weight_bytes(model: DiffGemma) -> int:
    """The bytes the loaded weights take (parameters and buffers, each once: the tied head is the embedding). Not
    from a state dict, which would put int4 experts laid out for the CPU's kernel back in their stored layout."""
    tensors = {id(t): t for t in [*model.network.parameters(), *model.network.buffers()]}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _size_label(parameters: int) -> str:
    return f"{parameters / 1e9:.1f}B" if parameters >= 1e9 else f"{parameters / 1e6:.2f}M"


def model_entry(model: DiffGemma, name: str) -> dict[str, Any]:
    """The model as `/api/tags` lists it."""
    total, _ = model.config.parameter_counts()
    form = (model.quant.name if model.quant else str(model.dtype).removeprefix("torch.")).upper()
    config = json.dumps(model.config.raw, sort_keys=True)
    try:
        modified = stamp(datetime.fromtimestamp(Path(model.folder).stat().st_mtime, UTC))
    except (TypeError, OSError):  # (no folder, or one gone since the load)
        modified = stamp()
    return {
        "name": name,
        "model": name,
        "modified_at": modified,
        "size": weight_bytes(model),
        "digest": hashlib.sha256(f"{config}{form}".encode()).hexdigest(),
        "details": {
            "parent_model": "",
            "format": "safetensors",
            "family": "diffusion_gemma",
            "families": ["diffusion_gemma"],
            "parameter_size": _size_label(total),
            "quantization_level": form.replace("FLOAT", "F").replace("BFLOAT", "BF"),
        },
    }


def sampler_parameters(settings: SamplerSettings) -> str:
    """The denoising settings as `/api/show`'s `parameters` (a Modelfile's, one `name value` a line: what
    `ollama show --parameters` prints, and what a client may send back as `options`)."""
    return "\n".join(f"{name} {getattr(settings, name)}" for name in SAMPLER_FIELDS)


def model_card(model: DiffGemma, entry: dict[str, Any], context: int) -> dict[str, Any]:
    """The model as `/api/show` describes it: its details (`entry`, as listed), its shape (`model_info`, where
    clients read the context length) and what it can do (`capabilities`: chat and text, fills, tools and thinking
    where its chat template writes them, vision where it has a vision tower)."""
    config, template = model.config, model.tokenizer.chat_template or ""
    capabilities = ["completion", "insert"]
    capabilities += ["vision"] if config.vision is not None else []
    capabilities += ["tools"] if model.tokenizer.renders_tools else []
    capabilities += ["thinking"] if "enable_thinking" in template else []
    total, _ = config.parameter_counts()
    prefix = "diffusion_gemma"
    return {
        "modelfile": "",
        "parameters": "",
        "template": template,
        "details": entry["details"],
        "model_info": {
            "general.architecture": prefix,
            "general.parameter_count": total,
            f"{prefix}.context_length": context,
            f"{prefix}.embedding_length": config.hidden_size,
            f"{prefix}.block_count": config.num_hidden_layers,
            f"{prefix}.attention.head_count": config.num_attention_heads,
            f"{prefix}.expert_count": config.num_experts,
            f"{prefix}.expert_used_count": config.top_k_experts,
            f"{prefix}.canvas_length": config.canvas_length,
            f"{prefix}.vocab_size": config.vocab_size,
        },
        "capabilities": capabilities,
        "modified_at": entry["modified_at"],
    }


def ollama_routes(model: DiffGemma, serving: Serving, context: int) -> APIRouter:
    """Ollama's routes over `serving` (`context`: the tokens a request may span, as `/api/show` gives it)."""
    router = APIRouter()
    name, tokenizer = serving.options.model_name, model.tokenizer
    listed = model_entry(model, serving.options.model_name)  # (once: clients poll it)
    card = model_card(model, listed, context)
    opening = len(tokenizer.encode(""))  # the ids a prompt begins with (the BOS)

    def shape(body: OllamaRequest, chat: bool, turn: bool, prompt: list[int]) -> Reply:
        served = serving.served_name(body.model)
        return Reply(served, chat, turn, prompt, lambda text: tokenizer.encode(text, add_special_tokens=False))

    async def respond(
        body: OllamaRequest,
        request: Request,
        prompt: list[int],
        reply_shape: Reply,
        drawn: tuple[Job, SettledText],
        tools: ToolUse | None = None,
        answer_format: AnswerFormat | None = None,
        redraw: Callable[[int], tuple[Job, SettledText]] | None = None,
    ):
        """The `drawn` job's answer, streamed as it settles (one read whole first if it has a form) or whole; with
        `logprobs`, its tokens scored by the causal encoder (as the OpenAI routes score them), on the last line."""
        job, reply = drawn
        top = (body.top_logprobs or 0) if body.logprobs else None

        async def scored(reply: SettledText, tokens: list[int], eos: int | None) -> list[dict[str, Any]]:
            logprobs = await serving.reply_logprobs(
                prompt, reply, tokens, eos, top or 0, True, False, job.images, job.adapter
            )
            return logprobs["content"]

        if body.stream and not read_whole(answer_format, tools):
            scorer = (lambda _, tokens, eos: scored(reply, tokens, eos)) if top is not None else None
            stream = serving.stream_jobs(
                [job], [reply], reply_shape.chunk, False, len(prompt), [""], "", scorer, tools, encode=ndjson
            )
            return StreamingResponse(stream, media_type=NDJSON)
        answer = await serving.run_answer(job, reply, request, tools, answer_format, redraw, "format")
        done = answer.done
        logprobs = await scored(answer.reply, done.new_tokens, done.eos) if top is not None else None
        if body.stream:
            lines = whole_events(answer, reply_shape.chunk, len(prompt), logprobs)
            return StreamingResponse([ndjson(lines)], media_type=NDJSON)
        return reply_shape.whole(answer, len(prompt), logprobs)

    async def answer_prompt(
        body: OllamaRequest,
        request: Request,
        prompt: list[int],
        reply_shape: Reply,
        tools: ToolUse | None = None,
        answer_format: AnswerFormat | None = None,
        images: tuple[PreparedImage, ...] = (),
    ):
        sampler, stop = body.sampler(), body.stop()
        limit = serving.admit([prompt], body.limit(serving.options.max_tokens), 1, chat=reply_shape.turn)
        thinking = body.thinking() and reply_shape.turn  # (a raw prompt's reply is not read as a turn)
        budget = serving.thinking_budget(sampler, thinking, tools, effort=body.think)

        def redraw(attempt: int) -> tuple[Job, SettledText]:
            reply = reply_text(model, reply_shape.turn, stop, tools)  # (its stop strings checked before a job)
            return serving.new_job(prompt, limit, sampler, attempt, None, images, thinking_budget=budget), reply

        return await respond(body, request, prompt, reply_shape, redraw(0), tools, answer_format, redraw)

    @router.get("/api/version")
    async def version() -> dict[str, str]:
        return {"version": VERSION}

    def every_model() -> list[dict[str, Any]]:
        """The model, then each adapter (`--lora-modules`) as a model of its own, the base its parent."""
        adapters = [
            {**listed, "name": a, "model": a, "details": {**listed["details"], "parent_model": name}}
            for a in model.adapters
        ]
        return [listed, *adapters]

    @router.get("/api/tags")
    async def tags() -> dict[str, Any]:
        return {"models": every_model()}

    @router.get("/api/ps")
    async def running() -> dict[str, Any]:
        on_gpu = listed["size"] if model.device.type != "cpu" else 0
        return {
            "models": [{**entry, "expires_at": "2318-01-01T00:00:00Z", "size_vram": on_gpu} for entry in every_model()]
        }

    @router.post("/api/show")
    async def show(body: OllamaShowRequest | None = None) -> dict[str, Any]:
        asked = body.model if body is not None else None
        served = serving.served_name(asked)
        entry = next(entry for entry in every_model() if entry["name"] == served)
        parameters = sampler_parameters(model.sampler_defaults(serving.adapter_for(asked)))
        return {**card, "details": entry["details"], "parameters": parameters}

    def embed_rows(texts: list[str], truncate: bool) -> list[list[int]]:
        limit = serving.options.max_prompt_tokens
        rows = [tokenizer.encode(text) for text in texts]
        if not truncate and any(len(ids) > limit for ids in rows):
            raise bad(f"the input length exceeds the context length ({limit} tokens)", "input")
        return [ids[:limit] for ids in rows]  # (the end of a long text goes, as Ollama truncates)

    @router.post("/api/embed")
    async def embed(body: OllamaEmbedRequest) -> dict[str, Any]:
        started = time.perf_counter_ns()
        single = [body.input] if body.input else []  # (none: what a client sends to load a model)
        texts = single if isinstance(body.input, str) else body.input
        rows = embed_rows(texts, body.truncate)
        adapter = serving.adapter_for(body.model)
        vectors = (await serving.embed(rows, True, body.dimensions, "input", adapter)).tolist() if rows else []
        counts = {"total_duration": time.perf_counter_ns() - started, "load_duration": 0}
        served = serving.served_name(body.model)
        return {"model": served, "embeddings": vectors, **counts, "prompt_eval_count": sum(map(len, rows))}

    @router.post("/api/embeddings")
    async def embeddings(body: OllamaEmbeddingsRequest) -> dict[str, Any]:
        if not body.prompt:  # (what a client sends to load a model)
            return {"embedding": []}
        adapter = serving.adapter_for(body.model)
        vectors = await serving.embed(embed_rows([body.prompt], True), False, None, "prompt", adapter)
        return {"embedding": vectors[0].tolist()}

    @router.post("/api/chat")
    async def chat(body: OllamaChatRequest, request: Request):
        reply_shape = shape(body, True, True, [])
        if not body.messages:
            return reply_shape.loaded(body.unloads())
        answer_format = asked_format(body.answer_form(), "format")
        messages = [message.for_template() for message in body.messages]
        messages = answer_format.with_instruction(messages) if answer_format is not None else messages
        offered, tools = serving.plan_tools(body.tools, None)
        prompt, images = serving.chat_prompt(messages, body.thinking(), "messages", "", offered)
        while len(prompt) > serving.options.max_prompt_tokens and (shorter := without_oldest_turn(messages)):
            messages = shorter  # as Ollama fits a long chat to its context: its oldest turns go
            prompt, images = serving.chat_prompt(messages, body.thinking(), "messages", "", offered)
        return await answer_prompt(body, request, prompt, reply_shape, tools, answer_format, images)

    @router.post("/api/generate")
    async def generate(body: OllamaGenerateRequest, request: Request):
        if body.images and (body.raw or body.suffix):
            raise bad("images go into the chat template's prompt: a raw prompt or a fill takes none", "images")
        if body.template is not None:
            message = "template (a Go template) is not supported: send raw with the prompt as the model is to read it"
            raise bad(message, "template")
        if body.context:
            check_token_ids(model, body.context, "context")
            vision = model.config.vision
            if vision is not None and vision.image_token_id in body.context:
                message = "context holds a picture, which a later request cannot send again: continue with /api/chat"
                raise bad(message, "context")
        if not body.prompt and not body.suffix and not body.context:
            return shape(body, False, not body.raw, []).loaded(body.unloads())
        images: tuple[PreparedImage, ...] = ()
        if body.suffix or body.raw:
            prompt = tokenizer.encode(body.prompt)
        else:
            messages = [{"role": "system", "content": body.system}] if body.system else []
            asked = OllamaMessage(role="user", content=body.prompt, images=body.images)
            messages.append(asked.for_template())
            prompt, images = serving.chat_prompt(messages, body.thinking(), "prompt")
        if body.context:  # the conversation so far, then the prompt without its opening (the BOS)
            prompt = body.context + prompt[opening:]
        if not body.suffix:
            answer_format = asked_format(body.answer_form(), "format")
            reply_shape = shape(body, False, not body.raw, prompt)
            return await answer_prompt(body, request, prompt, reply_shape, None, answer_format, images)
        if body.format:
            raise bad("format shapes an answer, not a fill between a prompt and a suffix", "format")
        # a prefix over the prompt limit loses its beginning, as `/infill` cuts what editor plugins send
        prompt, _, length = serving.plugin_fill(prompt, body.suffix, body.limit(model.config.canvas_length))
        reply_shape = shape(body, False, False, prompt)
        reply = reply_text(model, chat=False, stop=body.stop())
        job = serving.fill_job(prompt, body.suffix, length, body.sampler(), warn=False)
        return await respond(body, request, prompt, reply_shape, (job, reply))

    return router
