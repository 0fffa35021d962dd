"""The server's request bodies (OpenAI's fields and diffgemma's own), its OpenAI-shaped errors, and the pieces a
reply's stream hands the shape it goes out in."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, model_validator

from ..errors import DiffGemmaError
from ..scoring import MAX_TOP  # alternatives a position that logprobs may ask for, as OpenAI allows
from ..structured import AnswerFormat, json_format, vllm_format

MAX_STOP_STRINGS = 16
VLLM_FORMAT_FIELDS = ("structured_outputs", "guided_json", "guided_regex", "guided_choice", "guided_grammar")


def effort_thinks(effort: str | None) -> bool:
    """Whether OpenAI's reasoning effort (chat's `reasoning_effort`, the Responses API's `reasoning.effort`) asks
    for thinking: the model thinks or not, so any effort but none or minimal turns it on."""
    return effort not in (None, "none", "minimal")


# The thought an effort buys, as Google's OpenAI-compatible endpoint reads OpenAI's efforts for Gemini's thinking
# budgets (`Serving.thinking_budget`); another effort that thinks has no budget
EFFORT_BUDGETS = {"low": 1024, "medium": 8192, "high": 24576}


class APIError(Exception):
    def __init__(self, status: int, message: str, kind: str, code: str | None = None, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.code, self.param = status, message, kind, code, param


@dataclass(frozen=True)
class Piece:
    """One thing a reply's stream hands on, for the API's shape to turn into its chunks or events: the opening
    (`role`), settled text, a draft, tool calls, the finish (with the stop string that made it, and the
    log-probabilities), or the usage (the end)."""

    index: int = 0  # the choice
    role: bool = False
    content: str = ""
    reasoning: str = ""
    finish: str | None = None
    usage: dict[str, int] | None = None
    draft: dict[str, Any] | None = None
    logprobs: dict[str, Any] | None = None
    tool_calls: list[dict[str, Any]] | tuple = ()
    stop_sequence: str | None = None


def error_body(message: str, kind: str, code: str | None = None, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def stream_failure(payload: object) -> dict[str, Any] | None:
    """The error a stream's payload reports, where it is a failure mid-stream in `error_body`'s shape (what
    `Serving.stream_jobs` sends), for each API's encoder to frame its own way; None for any other payload."""
    error = payload.get("error") if isinstance(payload, dict) else None
    return error if isinstance(error, dict) else None


def sse(payload: dict | list[dict]) -> str:
    """One server-sent event, or one for each payload of a list (none for an empty one). A typed payload (the
    Responses API's events, Anthropic's) names its type on an `event:` line too, as their servers send them."""
    events = []
    for one in payload if isinstance(payload, list) else [payload]:
        name = f"event: {one['type']}\n" if isinstance(one.get("type"), str) else ""
        events.append(f"{name}data: {json.dumps(one, ensure_ascii=False)}\n\n")
    return "".join(events)


class SamplerExtras(BaseModel):
    """diffgemma's own request fields, beside OpenAI's. A field sent as null takes its default, as OpenAI reads
    null (clients and agent SDKs send `"n": null`, `"parallel_tool_calls": null` for what they leave unset)."""

    model_config = ConfigDict(extra="ignore")

    @model_validator(mode="before")
    @classmethod
    def _nulls_unset(cls, body: Any) -> Any:
        return {key: value for key, value in body.items() if value is not None} if isinstance(body, dict) else body

    model: str | None = None  # the base model's name or a LoRA adapter's (`serve --lora-modules`)
    seed: int | None = None
    # OpenAI's: not the sampler's temperature (its schedule is), but 0 asks for the same answer every time
    temperature: float | None = Field(default=None, ge=0, le=2)
    drafts: bool = False
    max_denoising_steps: int | None = Field(default=None, gt=0, le=1024)
    entropy_bound: float | None = Field(default=None, gt=0)
    t_max: float | None = Field(default=None, ge=0)
    t_min: float | None = Field(default=None, ge=0)
    stability_threshold: int | None = Field(default=None, ge=0)
    confidence_threshold: float | None = Field(default=None, gt=0)
    # OpenAI's and Anthropic's top_p; vLLM's and Anthropic's top_k (-1 and 0 are off, as vLLM reads them);
    # vLLM's min_p
    top_p: float | None = Field(default=None, ge=0, le=1)
    top_k: int | None = Field(default=None, ge=-1)
    min_p: float | None = Field(default=None, ge=0, le=1)
    # OpenAI's and vLLM's penalties for what is written already (`sampling.penalize`)
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    repetition_penalty: float | None = None
    logit_bias: dict[str, float] | None = None  # OpenAI's: -100 bans a token, others are added (`token_biases`)
    # (llama.cpp's: texts whose every token takes the bias; its routes read them out of `logit_bias`)
    logit_bias_texts: list[tuple[str, float]] = Field(default_factory=list)
    ignore_eos: bool = False  # vLLM's: the EOS ids banned, so an answer runs to its limit (benchmark clients)
    min_tokens: int = Field(default=0, ge=0)  # vLLM's: no EOS before this many tokens
    allowed_token_ids: list[int] | None = None  # vLLM's: the only ids an answer draws
    stop_token_ids: list[int] | None = None  # vLLM's: ids that end an answer (`Serving.stop_ids`)
    truncate_prompt_tokens: int | None = Field(default=None, ge=-1)  # vLLM's: a prompt's last k tokens (-1: limit)
    bad_words: list[str] | None = None  # vLLM's, with no place here: refused unless empty (`Serving.token_biases`)
    thinking_token_budget: int | None = Field(default=None, ge=0)  # vLLM's: the most tokens of thought (thinking on)


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict[str, Any]] | None = ""
    tool_calls: list[dict[str, Any]] | None = None  # an assistant's calls: {"id", "function": {"name", "arguments"}}
    tool_call_id: str | None = None  # a tool's answer: the call it answers
    name: str | None = None
    reasoning_content: str | None = None  # an assistant's thinking, sent back (vLLM's field; `reasoning` too)
    reasoning: str | None = None

    def for_template(self) -> dict[str, Any]:
        """The message as the chat template reads it: its text, and its tool and thinking fields where it has
        them."""
        message: dict[str, Any] = {"role": self.role, "content": content_parts(self.content, "messages")}
        for field in ("tool_calls", "tool_call_id", "name", "reasoning_content", "reasoning"):
            if getattr(self, field) is not None:
                message[field] = getattr(self, field)
        return message


class StreamOptions(BaseModel):
    include_usage: bool = False  # as OpenAI: a last chunk with usage and no choices only when asked for


StopField = str | list[str] | None
# OpenAI's completions take a text, texts, token ids, or lists of token ids
PromptField = str | list[str] | list[int] | list[list[int]]


ToolChoiceField = Literal["auto", "none", "required"] | dict[str, Any] | None


class Prediction(BaseModel):
    """OpenAI's predicted output: the answer expected, mostly (a file an edit will give back changed), a text or
    text parts. The canvas starts from it (`DiffGemma.generate`'s `prediction`)."""

    model_config = ConfigDict(extra="ignore")
    type: Literal["content"] = "content"
    content: str | list[dict[str, Any]]

    def text(self) -> str:
        return content_text(self.content, "prediction.content")


class ChatRequest(SamplerExtras):
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, gt=0)
    max_completion_tokens: int | None = Field(default=None, gt=0)
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    stop: StopField = None
    enable_thinking: bool = False
    chat_template_kwargs: dict[str, Any] | None = None
    reasoning_effort: str | None = None  # OpenAI's: any effort but "none" / "minimal" turns thinking on
    # OpenRouter's, as its clients send it: {"effort", "max_tokens" (the thought's budget), "enabled", "exclude"
    # (thinking kept out of the answer)}; `include_reasoning` false keeps it out too (its older switch)
    reasoning: dict[str, Any] | None = None
    include_reasoning: bool = True
    logprobs: bool = False  # each answer token's log-probability, from the causal encoder (`scoring`)
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP)
    response_format: dict[str, Any] | None = None  # text, json_object or json_schema (`asked_format`)
    # vLLM's structured outputs (`chat_format`): {"json" | "regex" | "choice" | "json_object" | "grammar"}, and
    # the older fields each of one
    structured_outputs: dict[str, Any] | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    continue_final_message: bool = False  # the last (assistant) message is the answer begun: its prefill
    tools: list[dict[str, Any]] | None = None  # functions the model may call: `tool_calls` in the answer
    tool_choice: ToolChoiceField = None  # "auto" (default), "none", "required" or {"function": {"name": ...}}
    parallel_tool_calls: bool = True  # (the model decides how many calls it makes)
    functions: list[dict[str, Any]] | None = None  # OpenAI's deprecated form of tools: refused, not ignored
    function_call: str | dict[str, Any] | None = None
    # OpenAI's spoken answers and hosted web search: refused, not ignored (the model writes text, offline)
    modalities: list[str] | None = None
    audio: dict[str, Any] | None = None
    web_search_options: dict[str, Any] | None = None
    prediction: Prediction | None = None


class CompletionRequest(SamplerExtras):
    prompt: PromptField
    suffix: str | None = None  # text after the completion: the gap between is filled (infill)
    best_of: int | None = None  # OpenAI's: only as many as `n` (the choices are not ranked): others refused
    echo: bool = False  # the prompt's text before each choice's
    max_tokens: int | None = Field(default=None, ge=0)  # 0 with echo: the prompt scored, nothing generated
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    stop: StopField = None
    logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP)  # alternatives a token; its own always
    prediction: Prediction | None = None  # (OpenAI's chat field, taken here too: the completion expected)


class InfillRequest(SamplerExtras):
    prefix: str = ""
    suffix: str = ""
    max_tokens: int | None = Field(default=None, gt=0)
    original: str | None = None  # the text being replaced: without max_tokens, the fill gets its length


class EmbeddingRequest(BaseModel):
    """OpenAI's `/v1/embeddings`: a text, texts, or token ids (one list or several); `dimensions` keeps each
    vector's first so many (scaled to unit length again); `encoding_format` base64 (what OpenAI's Python client
    asks for): the float32 values' little-endian bytes."""

    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    input: PromptField
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(default=None, ge=1)
    user: str | None = None


class AdapterRequest(BaseModel):
    """vLLM's body for loading (`lora_path`) or unloading a LoRA adapter while the server runs."""

    model_config = ConfigDict(extra="ignore")
    lora_name: str = Field(min_length=1)
    lora_path: str | None = None


class TokenizeRequest(BaseModel):
    """vLLM's `/tokenize`: a text prompt, or chat messages (with their tools) as chat completions render them;
    llama.cpp's, whose text comes as `content`."""

    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    prompt: str | None = Field(default=None, validation_alias=AliasChoices("prompt", "content"))
    messages: list[Message] | None = None
    # a text prompt's BOS (a chat prompt's come from its template); llama.cpp's `add_special` too
    add_special_tokens: bool = Field(default=True, validation_alias=AliasChoices("add_special_tokens", "add_special"))
    chat_template_kwargs: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    return_token_strs: bool = False
    with_pieces: bool = False  # llama.cpp's: each token as {id, piece} (its text)


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    tokens: list[int]


def check_content(content: Any, param: str) -> None:
    """A content field holds a text, nothing, or a list of parts (objects); anything else is the request's error
    (the Responses API's and Anthropic's items come unchecked by a schema)."""
    if content is None or isinstance(content, str):
        return
    if not isinstance(content, list) or not all(isinstance(part, dict) for part in content):
        message = f"a content must be a text or a list of content parts (objects), got {content!r:.60}"
        raise APIError(400, message, "invalid_request_error", "invalid_value", param)


def content_text(
    content: str | list[dict[str, Any]] | None, param: str, text_parts: tuple[str, ...] = ("text",)
) -> str:
    """A message's content as text: a string, or the text of its parts (`text_parts` name their types). Parts
    of other types (images, audio, files) are refused, not dropped unseen (`param`: the request's field)."""
    check_content(content, param)
    if not isinstance(content, list):
        return content or ""
    others = sorted({str(part.get("type")) for part in content if part.get("type") not in text_parts})
    if others:
        raise APIError(
            400,
            f"content parts of type {', '.join(others)} are not supported here: text only",
            "invalid_request_error",
            "invalid_value",
            param,
        )
    return "".join(str(part.get("text", "")) for part in content)


IMAGE_PARTS = ("image_url", "input_image")


def served_image(url: str, param: str) -> str:
    """A request's picture: a `data:` URL only. A server opens no file a client names (its own files are not the
    client's to read) and fetches nothing from the web."""
    if not url.startswith("data:"):
        message = "an image must come as a data: URL (data:image/png;base64,...): the server reads no files or URLs"
        raise APIError(400, message, "invalid_request_error", "invalid_value", param)
    return url  # OpenAI chat's {"image_url": {"url"}}, the Responses API's {"image_url"}


def content_parts(
    content: str | list[dict[str, Any]] | None, param: str, text_parts: tuple[str, ...] = ("text",)
) -> str | list[dict[str, Any]]:
    """A message's content as the chat template reads it: its text (`content_text`), or where it holds images,
    its text and image parts in order (`{"type": "image", "image": URL}`, read by `DiffGemma.image_prompt`)."""
    check_content(content, param)
    if not isinstance(content, list) or not any(part.get("type") in IMAGE_PARTS for part in content):
        return content_text(content, param, text_parts)
    parts: list[dict[str, Any]] = []
    for part in content:
        if part.get("type") not in IMAGE_PARTS:
            parts.append({"type": "text", "text": content_text([part], param, text_parts)})
            continue
        url = part.get("image_url")
        url = url.get("url") if isinstance(url, dict) else url
        if not isinstance(url, str) or not url:
            raise APIError(400, "an image part has no image_url", "invalid_request_error", "invalid_value", param)
        parts.append({"type": "image", "image": served_image(url, param)})
    return parts


def tool_choice_name(choice: ToolChoiceField) -> str:
    """OpenAI's `tool_choice` as `toolcalls.tool_plan` takes it: "auto", "none", "required", or a tool's name
    (chat names it as {"type": "function", "function": {"name": ...}}, the Responses API as {..., "name": ...})."""
    if choice is None or isinstance(choice, str):
        return choice or "auto"
    function = choice.get("function") or {}
    name = function.get("name", choice.get("name")) if isinstance(function, dict) else None
    if choice.get("type") != "function" or not isinstance(name, str):
        message = "tool_choice must be 'auto', 'none', 'required' or {'type': 'function', 'function': {'name': ...}}"
        raise APIError(400, message, "invalid_request_error", "invalid_value", "tool_choice")
    return name


def asked_format(spec: dict[str, Any] | None, param: str) -> AnswerFormat | None:
    """A request's `response_format` (the Responses API's `text.format`): None for free text, else the JSON
    answer's form; one that is not a format (or holds no valid schema) is the request's error."""
    try:
        return json_format(spec, param)
    except DiffGemmaError as err:
        raise APIError(400, str(err), "invalid_request_error", "invalid_value", param) from None


def chat_format(body: ChatRequest) -> AnswerFormat | None:
    """The form a chat completion's answer must have: its `response_format`, or vLLM's structured outputs
    (`structured_outputs`, `guided_json`, `guided_regex`, `guided_choice`), not both."""
    json_asked = asked_format(body.response_format, "response_format")
    fields = body.model_dump(include=set(VLLM_FORMAT_FIELDS), exclude_none=True)
    try:
        vllm_asked = vllm_format(fields, "structured_outputs")
    except DiffGemmaError as err:
        raise APIError(400, str(err), "invalid_request_error", "invalid_value", "structured_outputs") from None
    if json_asked is not None and vllm_asked is not None:
        message = "give response_format or vLLM's structured outputs, not both"
        raise APIError(400, message, "invalid_request_error", "invalid_value", "structured_outputs")
    return json_asked or vllm_asked


def stop_strings(stop: StopField) -> list[str]:
    """A request's `stop` as a list (clients send "" and [] for none), at most MAX_STOP_STRINGS of them."""
    stops = [text for text in ([stop] if isinstance(stop, str) else stop or []) if text]
    if len(stops) > MAX_STOP_STRINGS:
        raise APIError(
            400, f"at most {MAX_STOP_STRINGS} stop strings", "invalid_request_error", "invalid_value", "stop"
        )
    return stops
