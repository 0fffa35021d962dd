"""Anthropic's Messages API (`POST /v1/messages`), the text subset, for clients that speak it (agents and coding
tools): its request read into chat messages and tools, its message object, and its stream of typed events.

A reply's content blocks: the thinking (a `thinking` block, when `thinking` is enabled and the model thought),
the answer (a `text` block), and a `tool_use` block for each call it made to the `tools` offered. Streamed,
each block is started when its first text settles and stopped when the next begins or the reply ends (calls
come whole at the end); `message_delta` carries the stop reason and the output tokens, `message_stop` ends it.
The calls' answers come back as `tool_result` blocks in the next user message.
"""

from __future__ import annotations

import json
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from .schema import APIError, Piece, SamplerExtras, content_text, sse, stream_failure

STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use"}


class Turn(BaseModel):
    """One message: its text, or its content blocks."""

    model_config = ConfigDict(extra="ignore")
    role: Literal["user", "assistant"]
    content: str | list[dict[str, Any]]


class Conversation(SamplerExtras):
    """A conversation as the Messages API sends it: what `/v1/messages/count_tokens` counts."""

    messages: list[Turn] = Field(min_length=1)
    system: str | list[dict[str, Any]] | None = None
    tools: list[dict[str, Any]] | None = None  # {"name", "description", "input_schema"}
    tool_choice: dict[str, Any] | None = None  # {"type": "auto" | "any" | "tool" | "none", "name"}
    thinking: dict[str, Any] | None = None  # {"type": "enabled", "budget_tokens": ...} turns thinking on
    output_config: dict[str, Any] | None = None  # {"format": {"type": "json_schema", "schema": ...}}: JSON answers
    output_format: dict[str, Any] | None = None  # the same format, as the structured-outputs beta sent it
    mcp_servers: list[dict[str, Any]] | None = None  # Anthropic's remote MCP tools (a beta): refused, not ignored


class MessagesRequest(Conversation):
    max_tokens: int = Field(gt=0)  # required, as Anthropic's API has it
    stop_sequences: list[str] | None = None
    stream: bool = False


def _refuse(message: str, param: str) -> APIError:
    return APIError(400, message, "invalid_request_error", "invalid_value", param)


def request_conversation(body: Conversation) -> tuple[list[dict[str, Any]], bool]:
    """The request as chat messages (the system prompt first; a user message's `tool_result` blocks as tool
    messages before its text; an assistant's `tool_use` blocks as its tool calls, its `thinking` as its
    reasoning), and whether to think."""
    messages: list[dict[str, Any]] = []
    if body.system:
        messages.append({"role": "system", "content": content_text(body.system, "system")})
    for message in body.messages:
        role, content = message.role, message.content
        blocks = [{"type": "text", "text": content}] if isinstance(content, str) else content
        parts, reasoning, calls = [], [], []  # (parts: the text and image parts, in order)
        for block in blocks:
            kind = block.get("type")
            if kind == "text":
                parts.append({"type": "text", "text": str(block.get("text", ""))})
            elif kind == "document" and role == "user":
                parts.append({"type": "text", "text": document_text(block)})
            elif kind == "image" and role == "user":
                parts.append({"type": "image", "image": image_source(block)})
            elif kind == "tool_result" and role == "user":
                answer = content_text(block.get("content"), "messages")
                messages.append({"role": "tool", "tool_call_id": block.get("tool_use_id"), "content": answer})
            elif kind == "tool_use" and role == "assistant":
                function = {"name": block.get("name"), "arguments": block.get("input") or {}}
                calls.append({"id": block.get("id"), "type": "function", "function": function})
            elif kind == "thinking" and role == "assistant":
                reasoning.append(str(block.get("thinking", "")))
            elif kind != "redacted_thinking" or role != "assistant":  # (that one is sealed: nothing to read)
                raise _refuse(f"{role} content blocks of type {kind!r} are not supported", "messages")
        # a user message of tool results alone is its tool messages, with no empty user turn after them
        if parts or calls or reasoning or not messages or messages[-1]["role"] != "tool":
            pictured = any(part["type"] == "image" for part in parts)
            text = parts if pictured else "".join(part["text"] for part in parts)
            turn: dict[str, Any] = {"role": role, "content": text}
            if calls:
                turn["tool_calls"] = calls
            if reasoning:
                turn["reasoning_content"] = "\n".join(reasoning)
            messages.append(turn)
    return messages, thinking_enabled(body)


def thinking_enabled(body: Conversation) -> bool:
    """Whether a conversation turns thinking on (`thinking: {"type": "enabled", "budget_tokens": ...}`)."""
    return (body.thinking or {}).get("type") == "enabled"


def block_source(block: dict[str, Any]) -> dict[str, Any]:
    """An image or document block's `source` (an object; anything else reads as one of no type, refused)."""
    source = block.get("source")
    return source if isinstance(source, dict) else {}


def image_source(block: dict[str, Any]) -> str:
    """An `image` block's picture (a base64 source) as a `data:` URL; other sources (a URL, a file id) are refused:
    the server fetches nothing."""
    source = block_source(block)
    if source.get("type") == "base64" and isinstance(source.get("data"), str):
        return f"data:{source.get('media_type') or 'image/png'};base64,{source['data']}"
    raise _refuse(f"image blocks of source type {source.get('type')!r} are not supported: base64 only", "messages")


def document_text(block: dict[str, Any]) -> str:
    """A `document` block of text (a plain-text source, or one of text blocks) as the text the model reads: its
    title and context, if given, then the document. A PDF or a URL (the model reads no files) is refused."""
    source = block_source(block)
    if source.get("type") == "text":
        body = str(source.get("data", ""))
    elif source.get("type") == "content" and isinstance(source.get("content"), list | str):
        body = content_text(source["content"], "messages")
    else:
        raise _refuse(f"document blocks of source type {source.get('type')!r} are not supported: text only", "messages")
    heading = [str(block[key]) for key in ("title", "context") if block.get(key)]
    return "\n\n".join([*heading, body]) + "\n\n"


def messages_format(body: Conversation) -> tuple[dict[str, Any] | None, str]:
    """The JSON format a conversation asks its answer in (None: free text), and the field it came in."""
    if body.output_format is not None:
        return body.output_format, "output_format"
    return (body.output_config or {}).get("format"), "output_config.format"


def messages_tools(body: Conversation) -> tuple[list[dict[str, Any]] | None, str, bool]:
    """(the tools in chat's shape, `tool_choice` as `toolcalls.tool_plan` takes it, whether several calls may
    come). Anthropic's own server tools (a `type` of theirs) are refused."""
    if body.mcp_servers:
        message = "mcp_servers are not supported: the server reaches no MCP servers; send custom tools"
        raise _refuse(message, "mcp_servers")
    kinds = sorted({str(tool.get("type")) for tool in body.tools or [] if tool.get("type") not in (None, "custom")})
    if kinds:
        raise _refuse(f"tools of type {', '.join(kinds)} are not supported: only custom tools", "tools")
    tools = [
        {
            "type": "function",
            "function": {
                "name": tool.get("name"),
                "description": tool.get("description", ""),
                "parameters": tool.get("input_schema", {}),
            },
        }
        for tool in body.tools or []
    ] or None
    choice = body.tool_choice or {"type": "auto"}
    kind = choice.get("type")
    names = {"auto": "auto", "any": "required", "none": "none", "tool": choice.get("name")}
    if not isinstance(kind, str) or kind not in names or not isinstance(names[kind], str):
        raise _refuse(
            "tool_choice must be {'type': 'auto' | 'any' | 'none'} or {'type': 'tool', 'name': ...}", "tool_choice"
        )
    return tools, names[kind], not choice.get("disable_parallel_tool_use", False)


# Anthropic's error types by status (`anthropic_error`); any other status is an `api_error`
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    422: "invalid_request_error",
    429: "rate_limit_error",
    503: "overloaded_error",
    529: "overloaded_error",
}


def on_messages_route(path: str) -> bool:
    """Whether a request is to Anthropic's Messages routes (their errors are Anthropic's shape)."""
    return path.startswith("/v1/messages")


def anthropic_error(body: dict[str, Any], status: int) -> dict[str, Any]:
    """An error (`error_body`'s shape) as Anthropic's API gives it: `{"type": "error", "error": {"type", "message"}}`,
    the type its status's."""
    return {
        "type": "error",
        "error": {"type": ERROR_TYPES.get(status, "api_error"), "message": body["error"]["message"]},
    }


def messages_sse(payload: dict[str, Any] | list[dict[str, Any]]) -> str:
    """Server-sent events as a Messages stream sends them: a failure mid-stream as its `error` event (Anthropic's
    clients pass over an event with no name, so an error sent as OpenAI's would end the stream unexplained)."""
    if stream_failure(payload) is not None:
        payload = anthropic_error(payload, 500)
    return sse(payload)


class MessageBuilder:
    """One reply's identity, its content blocks, and the events that stream them."""

    def __init__(self, model_name: str, input_tokens: int) -> None:
        self.id = f"msg_{uuid.uuid4().hex[:24]}"
        self.model_name, self.input_tokens = model_name, input_tokens
        self.cached = 0  # the prompt tokens the prefix cache held, known once the usage comes
        self.blocks: list[dict[str, Any]] = []
        self.open: int | None = None  # the index of the block being streamed
        self.stop_reason, self.stop_sequence = "end_turn", None

    def chunk(self, piece: Piece) -> list[dict[str, Any]]:
        """The events for what the server's stream of a reply hands on: the start, settled text, the tool calls,
        the finish (held until the usage comes), the usage (the end). Drafts and log-probabilities are not
        sent."""
        if piece.role:
            return [{"type": "message_start", "message": self.message(0)}]
        if piece.tool_calls:
            return self.tool_uses(list(piece.tool_calls))
        if piece.finish is not None:
            self.finish(piece.finish, piece.stop_sequence)
            return []
        if piece.usage is not None:
            self.cached = piece.usage["prompt_tokens_details"]["cached_tokens"]
            delta = {"stop_reason": self.stop_reason, "stop_sequence": self.stop_sequence}
            usage = self.usage(piece.usage["completion_tokens"])
            return [*self._stop(), {"type": "message_delta", "delta": delta, "usage": usage}, {"type": "message_stop"}]
        return [] if piece.draft is not None else self.text(piece.content, piece.reasoning)

    def finish(self, finish: str, stop_sequence: str | None = None) -> None:
        self.stop_reason = "stop_sequence" if stop_sequence is not None else STOP_REASONS.get(finish, "end_turn")
        self.stop_sequence = stop_sequence

    def text(self, content: str = "", reasoning: str = "") -> list[dict[str, Any]]:
        """Events for newly settled text: thinking first (its block started the first time), then the answer."""
        events = []
        for kind, field, delta, piece in (
            ("thinking", "thinking", "thinking_delta", reasoning),
            ("text", "text", "text_delta", content),
        ):
            if not piece:
                continue
            if self.open is None or self.blocks[self.open]["type"] != kind:
                start = {"type": kind, field: "", **({"signature": ""} if kind == "thinking" else {})}
                events += self._start(start)
            self.blocks[self.open][field] += piece
            events.append({"type": "content_block_delta", "index": self.open, "delta": {"type": delta, field: piece}})
        return events

    def tool_uses(self, calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Events for a reply's tool calls (chat's shape), after its text: a `tool_use` block each, its input
        in one delta."""
        events = []
        for call in calls:
            arguments = call["function"]["arguments"]
            block = {"type": "tool_use", "id": f"toolu_{call['id'].removeprefix('call_')}"}
            events += self._start({**block, "name": call["function"]["name"], "input": {}})
            self.blocks[self.open]["input"] = json.loads(arguments)
            delta = {"type": "input_json_delta", "partial_json": arguments}
            events.append({"type": "content_block_delta", "index": self.open, "delta": delta})
            events += self._stop()
        return events

    def message(self, output_tokens: int, done: bool = False) -> dict[str, Any]:
        """The message object: its blocks when `done`, none at its start (as `message_start` carries it)."""
        return {
            "id": self.id,
            "type": "message",
            "role": "assistant",
            "model": self.model_name,
            "content": self.blocks if done else [],
            "stop_reason": self.stop_reason if done else None,
            "stop_sequence": self.stop_sequence if done else None,
            "usage": self.usage(output_tokens),
        }

    def usage(self, output_tokens: int) -> dict[str, int]:
        """Anthropic's usage: the prompt tokens read from the prefix cache apart from the rest (`input_tokens`;
        clients add the two, and `count_tokens` gives their sum). A stream's `message_start` comes before the
        cache is asked, so every prompt token is in its `input_tokens`; the closing `message_delta` gives every
        count again (as Anthropic's: totals, which clients take in place of the start's)."""
        return {
            "input_tokens": self.input_tokens - self.cached,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": self.cached,
            "output_tokens": output_tokens,
        }

    def _start(self, block: dict[str, Any]) -> list[dict[str, Any]]:
        events = self._stop()
        self.blocks.append(dict(block))
        self.open = len(self.blocks) - 1
        return [*events, {"type": "content_block_start", "index": self.open, "content_block": block}]

    def _stop(self) -> list[dict[str, Any]]:
        if self.open is None:
            return []
        index, self.open = self.open, None
        return [{"type": "content_block_stop", "index": index}]
