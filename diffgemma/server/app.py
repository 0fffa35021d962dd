"""An OpenAI-compatible server (FastAPI): chat and text completions, responses, streaming, infill, the playground;
Anthropic's messages, vLLM's tokenize, llama.cpp's infill and Ollama's API (`ollama`) beside them. Tool calls come
back apart from the text (`toolcalls`).

Each route reads its API's request into prompts and settings and hands them to `Serving` (`service`), which runs
them on the engine and returns or streams what they give; the route puts that in its API's shape.
"""

from __future__ import annotations

import base64
import secrets
import struct
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..api import DiffGemma
from ..errors import DiffGemmaError
from ..reply import SettledText
from .batcher import Batcher, Job
from .llamacpp import LLAMACPP_POSTS, llamacpp_routes
from .messages import (
    Conversation,
    MessageBuilder,
    MessagesRequest,
    anthropic_error,
    messages_sse,
    on_messages_route,
    thinking_enabled,
)
from .metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from .ollama import ollama_routes, on_ollama_route, read_as_json, unknown_route
from .responses import (
    ResponseBuilder,
    ResponsesRequest,
    ResponseStore,
    input_items,
    request_messages,
    request_tools,
)
from .schema import (
    AdapterRequest,
    APIError,
    ChatRequest,
    CompletionRequest,
    DetokenizeRequest,
    EmbeddingRequest,
    InfillRequest,
    PromptField,
    TokenizeRequest,
    chat_format,
    error_body,
)
from .service import (
    ServerOptions,
    Serving,
    check_token_ids,
    engine_failure,
    event_stream,
    infill_length,
    read_whole,
    reply_text,
    sse,
    thinking_asked,
    whole_events,
)
from .tgi import on_tgi_route, tgi_error, tgi_routes

STATIC = Path(__file__).with_name("static")


def completion_prompts(
    model: DiffGemma, prompt: PromptField, param: str = "prompt"
) -> tuple[list[list[int]], list[str]]:
    """OpenAI's forms of a completion prompt (or of an embeddings input: `param`) -> (each prompt's ids, each
    prompt's text). Token ids are taken as given (no BOS added), and must be in the vocabulary."""
    tokenizer = model.tokenizer
    if isinstance(prompt, str):
        return [tokenizer.encode(prompt)], [prompt]
    if not prompt:
        raise APIError(400, f"{param} is an empty list", "invalid_request_error", "invalid_value", param)
    if all(isinstance(one, str) for one in prompt):
        return [tokenizer.encode(one) for one in prompt], list(prompt)
    lists = [prompt] if all(isinstance(one, int) for one in prompt) else prompt
    for ids in lists:
        check_token_ids(model, ids, param)
    return [list(ids) for ids in lists], [tokenizer.decode(ids) for ids in lists]


def float32_base64(vector: list[float]) -> str:
    """A vector as OpenAI's base64 embeddings: its float32 values' little-endian bytes."""
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")


def route_label(app: FastAPI, request: Request) -> str:
    """A request's route for the metrics: the template it matched, its path where it names a route but was
    refused before routing (a wrong key), else "other" (a scanner's paths make no series of their own)."""
    route = request.scope.get("route")
    if route is not None:
        return route.path
    path = request.url.path
    return path if any(getattr(known, "path", None) == path for known in app.routes) else "other"


def create_app(model: DiffGemma, options: ServerOptions | None = None, batcher: Batcher | None = None) -> FastAPI:
    options = options or ServerOptions()
    if model.tokenizer is None:
        raise DiffGemmaError("the server needs a checkpoint with a tokenizer (tokenizer.json)")
    batcher = batcher or Batcher(model, options.max_batch, options.max_runs, options.join_first)

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        if not batcher.running:
            batcher.start()
        yield
        batcher.stop()

    app = FastAPI(title="diffgemma", version="0.1.0", lifespan=lifespan)
    app.state.batcher = batcher
    serving = Serving(model, options, batcher)
    metrics = batcher.metrics
    metrics.watch(lambda: serving.active, batcher.waiting, batcher.batches_running)

    def error(request: Request, body: dict, status: int) -> JSONResponse:
        """An error in its API's shape: OpenAI's, Ollama's on its routes (`{"error": message}`), Anthropic's on
        the Messages routes, TGI's on its generating routes."""
        if on_ollama_route(request):
            body = {"error": body["error"]["message"]}
        elif on_messages_route(request.url.path):
            body = anthropic_error(body, status)
        elif on_tgi_route(request):
            body = tgi_error(body)
        return JSONResponse(body, status_code=status)

    @app.exception_handler(APIError)
    async def api_error(request: Request, err: APIError) -> JSONResponse:
        return error(request, error_body(err.message, err.kind, err.code, err.param), err.status)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, err: RequestValidationError) -> JSONResponse:
        first = err.errors()[0] if err.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        message = f"{where}: {first.get('msg', 'invalid request')}" if where else first.get("msg", "invalid request")
        if first.get("type") == "json_invalid":  # (its place is a character of the body, not a field)
            why = (first.get("ctx") or {}).get("error", "not JSON")
            where, message = None, f"the request body is not valid JSON: {why} at character {where}"
        status = 400 if on_ollama_route(request) else 422  # (Ollama answers a 400)
        return error(request, error_body(message, "invalid_request_error", "invalid_value", where), status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        unknown = err.status_code in (404, 405) and on_ollama_route(request)
        message = unknown_route(request) if unknown else str(err.detail)
        return error(request, error_body(message, "invalid_request_error"), err.status_code)

    @app.exception_handler(Exception)
    async def unexpected_error(request: Request, err: Exception) -> JSONResponse:
        """What no route turned into an API error (a scoring pass out of memory, say), in the API's shape."""
        return await api_error(request, engine_failure(err))

    @app.middleware("http")
    async def guard(request: Request, call_next):
        if options.api_key and request.url.path != "/health":
            header = request.headers.get("authorization", "")
            # a Bearer token (OpenAI's clients), `x-api-key` (Anthropic's), or `?api_key=`
            given = header[7:] if header.lower().startswith("bearer ") else request.headers.get("x-api-key", "")
            given = given or request.query_params.get("api_key", "")
            if not secrets.compare_digest(given.encode(), options.api_key.encode()):
                body = error_body("missing or wrong API key", "invalid_request_error", "invalid_api_key")
                return error(request, body, 401)
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > options.max_body_bytes:
            body = error_body(f"request body over {options.max_body_bytes} bytes", "invalid_request_error")
            return error(request, body, 413)
        return await call_next(request)

    @app.middleware("http")
    async def native_bodies(request: Request, call_next):
        if on_ollama_route(request) or request.url.path in LLAMACPP_POSTS:
            read_as_json(request)
        return await call_next(request)

    @app.middleware("http")
    async def count(request: Request, call_next):
        """Every answer in the metrics, by route (its template, so ids in paths make no new series) and status;
        added after the key check, so outside it: refusals count too."""
        response = await call_next(request)
        metrics.request(route_label(app, request), response.status_code)
        return response

    if options.allowed_origins:  # added last, so outermost: a browser's preflight is answered before the key check
        app.add_middleware(
            CORSMiddleware, allow_origins=list(options.allowed_origins), allow_methods=["*"], allow_headers=["*"]
        )

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok" if batcher.running else "stopped", "model": options.model_name}

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.exposition(), media_type=METRICS_CONTENT_TYPE)

    # vLLM's: the tokens a request may span, prompt and answer (clients size their context by it)
    context = min(options.max_prompt_tokens + options.max_tokens, model.config.max_position_embeddings)

    def listed(name: str) -> dict[str, Any]:
        """A served model in OpenAI's fields and Anthropic's both (`type`, `display_name`, `created_at`), for
        either's clients; an adapter (`--lora-modules`) with vLLM's `parent`, the base model."""
        entry = {"id": name, "object": "model", "created": 0, "owned_by": "diffgemma", "type": "model"}
        entry |= {"display_name": name, "created_at": "1970-01-01T00:00:00Z", "max_model_len": context}
        return entry | {"root": name, "parent": None if name == options.model_name else options.model_name}

    @app.get("/v1/models")
    async def models() -> dict:
        names = [options.model_name, *model.adapters]
        data = [listed(name) for name in names]
        return {"object": "list", "data": data, "has_more": False, "first_id": names[0], "last_id": names[-1]}

    @app.get("/v1/models/{name:path}")
    async def one_model(name: str) -> dict:
        if name != options.model_name and name not in model.adapters:
            raise serving.not_served(name)
        return listed(name)

    @app.get("/")
    async def playground() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request):
        if body.functions is not None or body.function_call is not None:  # (its answers have another shape)
            message = "functions and function_call, OpenAI's deprecated form of tools, are not supported: send tools"
            raise APIError(400, message, "invalid_request_error", "invalid_value", "functions")
        if body.audio is not None or any(kind != "text" for kind in body.modalities or ()):
            message = "only text answers: modalities other than text (audio) are not supported"
            raise APIError(400, message, "invalid_request_error", "invalid_value", "modalities")
        if body.web_search_options is not None:
            message = "web search is not supported: the model answers from its prompt alone"
            raise APIError(400, message, "invalid_request_error", "invalid_value", "web_search_options")
        answer_format = chat_format(body)
        messages = [message.for_template() for message in body.messages]
        messages = answer_format.with_instruction(messages) if answer_format is not None else messages
        thinking = thinking_asked(body)
        offered, tools = serving.plan_tools(body.tools, body.tool_choice, body.parallel_tool_calls)
        lead = tools.lead if tools else []
        prefill = ""
        if body.continue_final_message and lead:
            message = "continue_final_message begins the answer, so it cannot be asked with a tool_choice that does"
            raise APIError(400, message, "invalid_request_error", "invalid_value", "tool_choice")
        if body.continue_final_message and answer_format is not None:
            message = "continue_final_message gives the answer's start, so it cannot be read whole in its form"
            raise APIError(400, message, "invalid_request_error", "invalid_value", "response_format")
        if body.continue_final_message:  # the last message is the answer begun: the model goes on from it
            if messages[-1]["role"] != "assistant":
                message = "continue_final_message needs a last message from the assistant: the answer begun"
                raise APIError(400, message, "invalid_request_error", "invalid_value", "messages")
            if len(messages) == 1:
                message = "continue_final_message needs the conversation before the answer begun"
                raise APIError(400, message, "invalid_request_error", "invalid_value", "messages")
            messages, prefill = messages[:-1], messages[-1]["content"]
        routed = body.reasoning or {}  # (OpenRouter's: its budget and effort, where the request gives them)
        effort = body.reasoning_effort or routed.get("effort")
        budget = serving.thinking_budget(
            body, thinking, tools, routed.get("max_tokens"), bool(prefill), effort, "reasoning.max_tokens"
        )
        prompt, images = serving.chat_prompt(messages, thinking, "messages", prefill, offered)
        return await serving.complete(
            body,
            request,
            [prompt + lead],
            chat=True,
            tools=tools,
            answer_format=answer_format,
            images=images,
            thinking_budget=budget,
        )

    stored = ResponseStore()

    @app.post("/v1/responses")
    async def responses(body: ResponsesRequest, request: Request):
        items = input_items(body, stored)
        messages, thinking, answer_format = request_messages(body, items)
        offered, tools = serving.plan_tools(request_tools(body), body.tool_choice, body.parallel_tool_calls)
        budget = serving.thinking_budget(body, thinking, tools, effort=(body.reasoning or {}).get("effort"))
        prompt, images = serving.chat_prompt(messages, thinking, "input", "", offered)
        prompt += tools.lead if tools else []
        limit = serving.admit([prompt], body.max_output_tokens, 1, chat=True, param="max_output_tokens")

        def redraw(attempt: int) -> tuple[Job, SettledText]:
            job = serving.new_job(prompt, limit, body, attempt, None, images, thinking_budget=budget)
            return job, reply_text(model, True, None, tools)

        job, reply = redraw(0)
        keep = (lambda response: stored.keep(response, items)) if body.store else None
        built = ResponseBuilder(serving.served_name(body.model), limit, body, keep)
        top = (body.top_logprobs or 0) if "message.output_text.logprobs" in (body.include or ()) else None

        async def answer_logprobs(_: int, tokens: list[int], eos: int | None) -> dict[str, Any]:
            return await serving.reply_logprobs(prompt, reply, tokens, eos, top or 0, True, False, images, job.adapter)

        scorer = answer_logprobs if top is not None else None
        if body.stream and not read_whole(answer_format, tools):
            stream = serving.stream_jobs(
                [job], [reply], built.chunk, False, len(prompt), [""], "", scorer, tools, encode=built.sse
            )
            return event_stream(stream)
        answer = await serving.run_answer(job, reply, request, tools, answer_format, redraw, "text.format")
        logprobs = await scorer(0, answer.done.new_tokens, answer.done.eos) if scorer is not None else None
        events = whole_events(answer, built.chunk, len(prompt), logprobs)
        return event_stream([sse(events)]) if body.stream else events[-1]["response"]

    @app.get("/v1/responses/{response_id}")
    async def stored_response(response_id: str) -> dict[str, Any]:
        return stored.response(response_id)

    @app.delete("/v1/responses/{response_id}")
    async def forget_response(response_id: str) -> dict[str, Any]:
        stored.forget(response_id)
        return {"id": response_id, "object": "response", "deleted": True}

    @app.post("/v1/messages/count_tokens")
    async def count_message_tokens(body: Conversation) -> dict:
        """Anthropic's: the tokens a conversation's prompt takes (clients size their context by it)."""
        return {"input_tokens": len(serving.messages_prompt(body)[0])}

    @app.post("/v1/messages")
    async def messages(body: MessagesRequest, request: Request):
        prompt, images, tools, answer_format, param = serving.messages_prompt(body)
        # Anthropic's clients always send max_tokens, often far above a local server's limit (32,000 is common):
        # the answer runs to the server's limit at most, and says "max_tokens" if cut there
        limit = serving.admit([prompt], min(body.max_tokens, options.max_tokens), 1, chat=True)
        asked = (body.thinking or {}).get("budget_tokens")
        budget = serving.thinking_budget(body, thinking_enabled(body), tools, asked)

        def redraw(attempt: int) -> tuple[Job, SettledText]:
            reply = reply_text(model, True, body.stop_sequences, tools)  # (its stop strings checked before a job)
            return serving.new_job(prompt, limit, body, attempt, None, images, thinking_budget=budget), reply

        job, reply = redraw(0)
        built = MessageBuilder(serving.served_name(body.model), len(prompt))
        if body.stream and not read_whole(answer_format, tools):
            return event_stream(
                serving.stream_jobs(
                    [job], [reply], built.chunk, False, len(prompt), [""], "", None, tools, encode=messages_sse
                )
            )
        answer = await serving.run_answer(job, reply, request, tools, answer_format, redraw, param)
        events = whole_events(answer, built.chunk, len(prompt))
        return event_stream([sse(events)]) if body.stream else built.message(len(answer.done.new_tokens), done=True)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        if body.best_of is not None and body.best_of != body.n:
            message = f"best_of {body.best_of} is not supported: the choices are not ranked; send n alone"
            raise APIError(400, message, "invalid_request_error", "invalid_value", "best_of")
        prompts, texts = completion_prompts(model, body.prompt)
        if body.max_tokens == 0:
            return await serving.score_prompts(body, prompts, texts)
        if body.suffix:  # OpenAI's insertion: the gap between prompt and suffix, filled on one canvas
            return await serving.insert(body, request, prompts, texts)
        return await serving.complete(body, request, prompts, chat=False, echoes=texts if body.echo else None)

    @app.post("/v1/embeddings")
    async def embeddings(body: EmbeddingRequest) -> dict:
        """Each input's vector (`DiffGemma.embed`): the mean of the causal encoder's final states, unit length."""
        if body.input == "" or (isinstance(body.input, list) and "" in body.input):
            message = "input: an empty text has nothing to embed"
            raise APIError(400, message, "invalid_request_error", "invalid_value", "input")
        rows, _ = completion_prompts(model, body.input, "input")
        serving.check_prompt_limit(rows, "input", "an input")
        adapter = serving.adapter_for(body.model)
        vectors = (await serving.embed(rows, True, body.dimensions, "input", adapter)).tolist()
        encode = float32_base64 if body.encoding_format == "base64" else list
        data = [{"object": "embedding", "index": i, "embedding": encode(v)} for i, v in enumerate(vectors)]
        used = sum(len(ids) for ids in rows)
        usage = {"prompt_tokens": used, "total_tokens": used}
        return {"object": "list", "data": data, "model": serving.served_name(body.model), "usage": usage}

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(body: AdapterRequest) -> PlainTextResponse:
        await serving.load_adapter(body.lora_name, body.lora_path)
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(body: AdapterRequest) -> PlainTextResponse:
        await serving.unload_adapter(body.lora_name)
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")

    def chat_ids(body: TokenizeRequest) -> list[int]:
        """A chat's ids, its messages and tools through the chat template, as chat completions read them."""
        offered, _ = serving.plan_tools(body.tools, None)
        conversation = [message.for_template() for message in body.messages or []]
        return serving.chat_prompt(conversation, thinking_asked(body), "messages", "", offered)[0]

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> dict:
        """vLLM's: the ids a prompt is read as (a text, or messages through the chat template with their tools,
        as chat completions read them), for clients that count tokens; llama.cpp's too (`content`, `add_special`,
        `with_pieces`)."""
        if (body.prompt is None) == (body.messages is None):
            message = "give either a text `prompt` or chat `messages`"
            raise APIError(400, message, "invalid_request_error", "invalid_value", "prompt")
        if body.messages is not None:
            ids = chat_ids(body)
        else:
            ids = model.tokenizer.encode(body.prompt or "", add_special_tokens=body.add_special_tokens)
        counted: dict = {"count": len(ids), "max_model_len": model.config.max_position_embeddings, "tokens": ids}
        shown = body.return_token_strs or body.with_pieces
        pieces = [model.tokenizer.decode([token], skip_special_tokens=False) for token in ids] if shown else []
        if body.return_token_strs:
            counted["token_strs"] = pieces
        if body.with_pieces:
            counted["tokens"] = [{"id": token, "piece": piece} for token, piece in zip(ids, pieces, strict=True)]
        return counted

    @app.post("/apply-template")
    async def apply_template(body: TokenizeRequest) -> dict:
        """llama.cpp's: a chat's `messages` (with their `tools`) as the prompt text the chat template makes of
        them, the answer's turn opened, for a client to edit and send to `/completion`."""
        if not body.messages:
            raise APIError(400, "give the chat's `messages`", "invalid_request_error", "invalid_value", "messages")
        return {"prompt": model.tokenizer.decode(chat_ids(body), skip_special_tokens=False)}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> dict:
        """vLLM's: token ids as text, special tokens kept (what `/tokenize` read); as llama.cpp's too (`content`)."""
        if body.tokens:  # (none: no text)
            check_token_ids(model, body.tokens, "tokens")
        text = model.tokenizer.decode(body.tokens, skip_special_tokens=False)
        return {"prompt": text, "content": text}

    @app.post("/v1/infill")
    async def infill(body: InfillRequest, request: Request):
        length = infill_length(model, body.max_tokens, body.original)
        prompt = model.tokenizer.encode(body.prefix)
        job = serving.fill_job(prompt, body.suffix, length, body)
        reply = reply_text(model, chat=False)
        done, _ = await serving.run_job(job, request, reply)
        fill = reply.parts(done.new_tokens)[0]
        text = body.prefix + fill + body.suffix
        return {"object": "infill", "model": serving.served_name(body.model), "text": text, "fill": fill}

    app.include_router(llamacpp_routes(model, serving, context))
    app.include_router(tgi_routes(model, serving, context))
    app.include_router(ollama_routes(model, serving, context))
    return app
