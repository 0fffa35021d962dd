"""Hugging Face's Text Generation Inference API (TGI), for the clients written against it: `huggingface_hub`'s
`InferenceClient.text_generation` (which posts to the server's root), LangChain's `HuggingFaceEndpoint`, editor
plugins of the llm-ls family. `POST /generate` (the answer whole), `POST /generate_stream` (server-sent events),
`POST /` (either, by the body's `stream`; whole, a list of one answer, as TGI answers there), `GET /info`.

A request is `{"inputs": TEXT, "parameters": {...}}`, a raw prompt (no chat template: `/v1/chat/completions`
renders chats; a prompt that begins with the BOS gets no second one). Its parameters are read as the other routes
read theirs: `max_new_tokens` a limit (unset: to EOS, within the server's limit), `stop` strings, `seed`, `top_k`,
`top_p`, `return_full_text` (the prompt before the answer), `details` (how it ended, its token count, its seed),
`truncate` (the prompt's last tokens, its BOS kept), `adapter_id` (a LoRA adapter the server serves). TGI's
`do_sample: false`, its default, is greedy decoding, the same answer every time: here the same seed every time
(0, or the request's), as the OpenAI routes read `temperature: 0`; the temperature itself is the sampler's
schedule, not the request's. A streamed event carries a settled piece of the answer, which is one token or several
(a canvas settles many at once), so its `token.id` is -1 and its `logprob` null; the last event has the whole
`generated_text` and, asked for, its `details`. `repetition_penalty` and `frequency_penalty` are the sampler's
(`sampling.penalize`). The settings the sampler has no place for are refused where they would change an answer
(`best_of`, `grammar`, `watermark`, `top_n_tokens`), and `typical_p` is ignored (LangChain sends 0.95 by
default). Errors come in TGI's shape, `{"error": ..., "error_type": ...}`.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from .. import __version__
from ..api import DiffGemma
from ..reply import SettledText
from .batcher import Job
from .schema import APIError, Piece, SamplerExtras, sse, stream_failure
from .service import Answer, Serving, event_stream, raw_prompt, reply_text

GENERATE_PATHS = ("/", "/generate", "/generate_stream")
# How an answer ended, as TGI names it (by the finish reason the other routes use, a stop string apart)
FINISH_REASONS = {"length": "length", "stop": "eos_token"}


def on_tgi_route(request: Request) -> bool:
    """Whether a request is to TGI's generating routes (its errors are TGI's shape)."""
    return request.method == "POST" and request.url.path in GENERATE_PATHS


def tgi_error(body: dict[str, Any]) -> dict[str, Any]:
    """An error body of the other routes (OpenAI's shape) in TGI's."""
    error = body["error"]
    kind = "validation" if error.get("type") == "invalid_request_error" else "generation"
    return {"error": error["message"], "error_type": kind}


class TgiParameters(BaseModel):
    model_config = ConfigDict(extra="ignore")
    max_new_tokens: int | None = Field(default=None, ge=1)
    stop: list[str] = Field(default_factory=list)
    seed: int | None = Field(default=None, ge=0)
    do_sample: bool = False
    temperature: float | None = Field(default=None, gt=0)  # (TGI's sampling temperature: no place here)
    top_k: int | None = Field(default=None, gt=0)
    top_p: float | None = Field(default=None, gt=0, le=1)
    typical_p: float | None = None  # (ignored: the sampler has no such cut)
    repetition_penalty: float | None = None
    frequency_penalty: float | None = None
    return_full_text: bool = False
    details: bool = False
    decoder_input_details: bool = False  # (the prompt's tokens: none listed)
    truncate: int | None = Field(default=None, ge=1)
    adapter_id: str | None = None
    best_of: int | None = None
    grammar: dict[str, Any] | None = None
    watermark: bool = False
    top_n_tokens: int | None = None

    def sampler(self) -> SamplerExtras:
        """As the sampler fields the other routes read (which check them: `Serving.new_job`)."""
        for name, refused in (
            ("best_of", self.best_of not in (None, 1)),
            ("grammar", self.grammar is not None),
            ("watermark", self.watermark),
            ("top_n_tokens", bool(self.top_n_tokens)),
        ):
            if refused:
                message = f"parameters.{name} is not supported (the OpenAI routes take response_format and logprobs)"
                raise APIError(400, message, "invalid_request_error", "invalid_value", name)
        return SamplerExtras(
            model=self.adapter_id,
            seed=self.seed,
            temperature=None if self.do_sample else 0,  # (greedy: the same answer every time)
            top_k=self.top_k,
            top_p=self.top_p,
            repetition_penalty=self.repetition_penalty,
            frequency_penalty=self.frequency_penalty,
            truncate_prompt_tokens=self.truncate,  # (vLLM's name for the same cut: `Serving.truncated`)
        )


class TgiRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    inputs: str
    parameters: TgiParameters = Field(default_factory=TgiParameters)
    stream: bool = False


def tgi_details(finish: str, stop_sequence: str | None, tokens: int, seed: int | None) -> dict[str, Any]:
    """An answer's `details` as TGI reports them: how it ended, its token count, the seed it was drawn with (None
    for a greedy request, as TGI gives it); no per-token list (the prompt's or the answer's)."""
    reason = "stop_sequence" if stop_sequence is not None else FINISH_REASONS.get(finish, finish)
    return {"finish_reason": reason, "generated_tokens": tokens, "seed": seed, "prefill": [], "tokens": []}


def tgi_routes(model: DiffGemma, serving: Serving, context: int) -> APIRouter:
    """TGI's routes over `serving` (`context`: the tokens a request may span, as `/info` gives it)."""
    router = APIRouter()
    tokenizer = model.tokenizer

    def start(body: TgiRequest) -> tuple[Job, SettledText, int, TgiParameters]:
        """The request's job (queued), its reply's reader, its prompt's length, and its parameters."""
        asked = body.parameters
        sampler = asked.sampler()
        prompt = serving.truncated([raw_prompt(tokenizer, body.inputs)], sampler, whole=False)[0]
        limit = serving.admit([prompt], asked.max_new_tokens, 1, chat=True, param="max_new_tokens")
        reply = reply_text(model, chat=False, stop=asked.stop or None)  # (its stop strings checked first)
        job = serving.new_job(prompt, limit, sampler, 0, None)
        return job, reply, len(prompt), asked

    def seed_of(asked: TgiParameters, job_seed: int) -> int | None:
        return job_seed if asked.do_sample or asked.seed is not None else None

    def whole(body: TgiRequest, answer: Answer, job_seed: int) -> dict[str, Any]:
        asked, end = body.parameters, answer.end
        result: dict[str, Any] = {"generated_text": (body.inputs if asked.return_full_text else "") + answer.content}
        if asked.details:
            tokens = len(answer.done.new_tokens)
            result["details"] = tgi_details(end.finish, end.stop_sequence, tokens, seed_of(asked, job_seed))
        return result

    def stream(body: TgiRequest, started: tuple[Job, SettledText, int, TgiParameters]) -> StreamingResponse:
        """The answer as TGI's events: a settled piece each, then the last (the whole text, its details)."""
        job, reply, prompt_tokens, asked = started
        state: dict[str, Any] = {"index": 0, "text": "", "finish": None, "stop": None}

        def event(text: str, last: bool = False, details: dict | None = None) -> dict[str, Any]:
            state["index"] += 1
            whole_text = (body.inputs if asked.return_full_text else "") + state["text"] if last else None
            token = {"id": -1, "text": text, "logprob": None, "special": False}
            return {"index": state["index"], "token": token, "generated_text": whole_text, "details": details}

        def chunk(piece: Piece) -> list[dict[str, Any]]:
            if piece.usage is not None:  # after the answer's end: the last event, with the counts
                tokens = piece.usage["completion_tokens"]
                said = tgi_details(state["finish"], state["stop"], tokens, seed_of(asked, job.seed))
                return [event("", last=True, details=said if asked.details else None)]
            if piece.finish is not None:
                state["finish"], state["stop"] = piece.finish, piece.stop_sequence
                return []
            if not piece.content:
                return []
            state["text"] += piece.content
            return [event(piece.content)]

        def encode(payload: dict | list) -> str:
            return sse(tgi_error(payload) if stream_failure(payload) is not None else payload)

        chunks = serving.stream_jobs([job], [reply], chunk, False, prompt_tokens, [""], "", encode=encode)
        return event_stream(chunks)

    async def generate(body: TgiRequest, request: Request, listed: bool = False):
        started = start(body)
        if body.stream:
            return stream(body, started)
        job, reply, _, _ = started
        answer = await serving.run_answer(job, reply, request, None)
        result = whole(body, answer, job.seed)
        return [result] if listed else result

    @router.post("/generate")
    async def generate_whole(body: TgiRequest, request: Request):
        return await generate(body.model_copy(update={"stream": False}), request)

    @router.post("/generate_stream")
    async def generate_stream(body: TgiRequest, request: Request):
        return await generate(body.model_copy(update={"stream": True}), request)

    @router.post("/")
    async def compat(body: TgiRequest, request: Request):
        """TGI's root: streamed or not by `stream`; whole, a list of one answer."""
        return await generate(body, request, listed=True)

    @router.get("/info")
    async def info() -> dict[str, Any]:
        return {
            "model_id": serving.options.model_name,
            "model_sha": None,
            "model_dtype": str(model.dtype),
            "model_device_type": model.device.type,
            "model_pipeline_tag": "text-generation",
            "max_concurrent_requests": serving.options.max_concurrent,
            "max_best_of": 1,
            "max_stop_sequences": None,
            "max_input_tokens": serving.options.max_prompt_tokens,
            "max_total_tokens": context,
            "max_client_batch_size": 1,
            "router": "diffgemma",
            "version": __version__,
        }

    return router
