"""OpenAI's Responses API (`POST /v1/responses`), the text subset: its request read into chat messages, its
response object, and its stream of typed events.

A reply's output items: the thinking (a `reasoning` item, when thinking is on and the model thought), the
answer (a `message` with one `output_text` part; none when the model only called tools), and a
`function_call` item for each call it made to the `tools` offered. Streamed, each item is opened when its
first text settles and closed when the next begins or the reply ends (calls come whole at the end);
`response.completed` (or `response.incomplete`, at `max_output_tokens`) carries the whole response with its
usage; a failure mid-stream is an `error` event, then `response.failed` with the response as it stood. The calls'
answers come back as `function_call_output` input items. Responses are kept (`ResponseStore`, in memory) for a
later request to go on from (`previous_response_id`) and to be read back.
"""

from __future__ import annotations

import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from pydantic import Field

from ..scoring import MAX_TOP
from ..structured import AnswerFormat
from .schema import (
    APIError,
    Piece,
    SamplerExtras,
    ToolChoiceField,
    asked_format,
    content_parts,
    content_text,
    effort_thinks,
    sse,
    stream_failure,
)

TEXT_PARTS = ("input_text", "output_text", "text")


class ResponsesRequest(SamplerExtras):
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    max_output_tokens: int | None = Field(default=None, gt=0)
    stream: bool = False
    reasoning: dict[str, Any] | None = None  # {"effort": ...}: any effort but "none" / "minimal" turns thinking on
    text: dict[str, Any] | None = None  # {"format": {"type": "text"}} alone
    include: list[str] | None = None  # "message.output_text.logprobs": the answer's (`scoring`)
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP)
    tools: list[dict[str, Any]] | None = None  # {"type": "function", "name", "description", "parameters"}
    tool_choice: ToolChoiceField = None  # "auto" (default), "none", "required" or {"type": "function", "name"}
    parallel_tool_calls: bool = True
    previous_response_id: str | None = None  # a stored response to go on from (its conversation, then `input`)
    store: bool = True  # keep this response for `previous_response_id` and GET /v1/responses/{id}
    # OpenAI's Conversations API: none here, so it is refused (not ignored, which would answer as if nothing came
    # before)
    conversation: str | dict[str, Any] | None = None
    prompt: dict[str, Any] | None = None  # a prompt template kept on OpenAI's side, by id: refused likewise


class ResponseStore:
    """The last `size` responses (in memory: a restart forgets them), each with the conversation it ended, as
    input items, for a request that goes on from it (`previous_response_id`) and for GET /v1/responses/{id}."""

    def __init__(self, size: int = 1000) -> None:
        self.size = size
        self.kept: OrderedDict[str, tuple[dict[str, Any], list[dict[str, Any]]]] = OrderedDict()

    def keep(self, response: dict[str, Any], before: list[dict[str, Any]]) -> None:
        """`response`, its conversation the items `before` it and its output."""
        self.kept[response["id"]] = (response, [*before, *response["output"]])
        while len(self.kept) > self.size:
            self.kept.popitem(last=False)

    def _entry(self, response_id: str, param: str | None) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        if response_id not in self.kept:
            message = f"no response {response_id!r} is stored here (the last {self.size} are, until a restart)"
            raise APIError(404, message, "invalid_request_error", "not_found", param)
        return self.kept[response_id]

    def response(self, response_id: str) -> dict[str, Any]:
        return self._entry(response_id, None)[0]

    def conversation(self, response_id: str) -> list[dict[str, Any]]:
        """The input items of the conversation `response_id` ended (its own output last)."""
        return self._entry(response_id, "previous_response_id")[1]

    def forget(self, response_id: str) -> None:
        self._entry(response_id, None)
        del self.kept[response_id]


def input_items(body: ResponsesRequest, store: ResponseStore) -> list[dict[str, Any]]:
    """The request's conversation as input items: a stored response's (`previous_response_id`), then `input`."""
    if body.conversation is not None:
        message = "conversation: OpenAI's Conversations API is not served here; use previous_response_id or input"
        raise APIError(400, message, "invalid_request_error", "invalid_value", "conversation")
    if body.prompt is not None:
        message = "prompt: templates kept on OpenAI's side are not served here; send instructions and input"
        raise APIError(400, message, "invalid_request_error", "invalid_value", "prompt")
    before = store.conversation(body.previous_response_id) if body.previous_response_id else []
    return [*before, *([{"role": "user", "content": body.input}] if isinstance(body.input, str) else body.input)]


def request_tools(body: ResponsesRequest) -> list[dict[str, Any]] | None:
    """The Responses API's function tools (their fields flat) in chat's shape (under `function`); tools of other
    types (OpenAI's hosted ones) are refused."""
    if not body.tools:
        return None
    kinds = sorted({str(tool.get("type")) for tool in body.tools if tool.get("type") != "function"})
    if kinds:
        message = f"tools of type {', '.join(kinds)} are not supported: only functions (type 'function')"
        raise APIError(400, message, "invalid_request_error", "invalid_value", "tools")
    fields = ("name", "description", "parameters")
    return [{"type": "function", "function": {f: tool[f] for f in fields if f in tool}} for tool in body.tools]


def request_messages(
    body: ResponsesRequest, items: list[dict[str, Any]]
) -> tuple[list[dict[str, Any]], bool, AnswerFormat | None]:
    """The request's conversation (`items`, `input_items`) as chat messages (this request's instructions first, as
    a system message: a stored response's are not carried over, as OpenAI's are not), whether to think, and the
    JSON answer's form if `text.format` asks for one (its instruction then in the system message)."""
    answer_format = asked_format((body.text or {}).get("format"), "text.format")
    messages: list[dict[str, Any]] = [{"role": "system", "content": body.instructions}] if body.instructions else []
    for item in items:
        kind = item.get("type", "message")
        role = item.get("role")
        if kind == "function_call":  # a call the model made: on the assistant's message before it, or a new one
            call = {"name": item.get("name"), "arguments": item.get("arguments", "{}")}
            if not messages or messages[-1]["role"] != "assistant":
                messages.append({"role": "assistant", "content": ""})
            messages[-1].setdefault("tool_calls", []).append({"id": item.get("call_id"), "function": call})
            continue
        if kind == "function_call_output":
            output = content_text(item.get("output"), "input", TEXT_PARTS)
            messages.append({"role": "tool", "tool_call_id": item.get("call_id"), "content": output})
            continue
        if kind == "reasoning":  # an earlier reply's thinking, sent back with its output: its message's reasoning
            parts = item.get("content") or item.get("summary") or []
            thought = "".join(str(part.get("text", "")) for part in parts if isinstance(part, dict))
            messages.append({"role": "assistant", "content": "", "reasoning_content": thought})
            continue
        if kind != "message" or role not in ("system", "developer", "user", "assistant"):
            what = f"input items of type {kind!r}" if kind != "message" else f"a message with role {role!r}"
            raise APIError(400, f"{what} are not supported", "invalid_request_error", "invalid_value", "input")
        text = content_parts(item.get("content"), "input", TEXT_PARTS)
        thought_only = messages and messages[-1]["role"] == "assistant" and not messages[-1]["content"]
        if role == "assistant" and thought_only and "tool_calls" not in messages[-1]:
            messages[-1]["content"] = text  # the answer after its thinking: one message
            continue
        messages.append({"role": role, "content": text})
    effort = (body.reasoning or {}).get("effort")
    messages = answer_format.with_instruction(messages) if answer_format is not None else messages
    return messages, effort_thinks(effort), answer_format


def _identifier(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:24]}"


class ResponseBuilder:
    """One response's identity, its output items, and the events that stream them."""

    def __init__(
        self,
        model_name: str,
        max_output_tokens: int,
        request: ResponsesRequest | None = None,
        on_done: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        self.id, self.created = _identifier("resp"), int(time.time())
        self.on_done = on_done  # given the whole response once it has its usage (the store keeps it)
        request = request or ResponsesRequest(input="")
        self.tools, self.tool_choice = request.tools or [], request.tool_choice or "auto"
        self.parallel_tool_calls = request.parallel_tool_calls
        self.calls: list[dict[str, Any]] = []  # `function_call` items
        self.model_name, self.max_output_tokens = model_name, max_output_tokens
        self.reasoning_id, self.message_id = _identifier("rs"), _identifier("msg")
        self.reasoning, self.content = "", ""
        self.open: str | None = None  # the item being streamed: "reasoning" or "message"
        self.items: list[str] = []  # the items opened so far, in output order
        self.sequence = 0
        self.finish = "stop"
        self.logprobs: list[dict[str, Any]] = []  # the answer's tokens' (chat `logprobs.content` entries), if asked

    def chunk(self, piece: Piece) -> list:
        """The events for what the server's stream of a reply hands on: the opening, settled text, the tool
        calls, the finish (held until the usage comes, with the answer's log-probabilities if asked for), the
        usage (the closing). Drafts are not sent."""
        if piece.role:
            return self.opening()
        if piece.tool_calls:
            return self.function_calls(list(piece.tool_calls))
        if piece.usage is not None:
            return self.closing(self.finish, piece.usage)
        if piece.finish is not None:
            self.finish = piece.finish
            self.logprobs = piece.logprobs["content"] if piece.logprobs else []
            return []
        return [] if piece.draft is not None else self.text(piece.content, piece.reasoning)

    def usage(self, counts: dict[str, Any]) -> dict[str, Any]:
        """The chat usage's counts in the Responses API's names (the thought's tokens, its markers in, as chat
        completions count them)."""
        return {
            "input_tokens": counts["prompt_tokens"],
            "input_tokens_details": {
                "cached_tokens": counts["prompt_tokens_details"]["cached_tokens"],
                "cache_write_tokens": 0,
            },
            "output_tokens": counts["completion_tokens"],
            "output_tokens_details": {
                "reasoning_tokens": counts.get("completion_tokens_details", {}).get("reasoning_tokens", 0)
            },
            "total_tokens": counts["total_tokens"],
        }

    def response(
        self, status: str, usage: dict[str, Any] | None = None, error: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """The response object as it stands (`status`: in_progress, completed, incomplete, or failed with its
        `error`)."""
        output = []
        if self.reasoning:
            output.append(self._item("reasoning", "completed"))
        if "message" in self.items or (status != "in_progress" and not self.calls):
            output.append(self._item("message", "incomplete" if status == "failed" else status))
        output += self.calls
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created,
            "status": status,
            "error": error,
            "model": self.model_name,
            "output": output,
            "max_output_tokens": self.max_output_tokens,
            "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
            "parallel_tool_calls": self.parallel_tool_calls,
            "tool_choice": self.tool_choice,
            "tools": self.tools,
            "usage": usage,
        }

    def _item(self, kind: str, status: str) -> dict[str, Any]:
        if kind == "reasoning":
            content = [{"type": "reasoning_text", "text": self.reasoning}]
            return {"type": "reasoning", "id": self.reasoning_id, "summary": [], "content": content, "status": status}
        part = {"type": "output_text", "text": self.content, "annotations": [], "logprobs": self.logprobs}
        return {"type": "message", "id": self.message_id, "role": "assistant", "status": status, "content": [part]}

    def _event(self, kind: str, **fields: Any) -> dict[str, Any]:
        return self._event_named(f"response.{kind}", **fields)

    def _event_named(self, name: str, **fields: Any) -> dict[str, Any]:
        self.sequence += 1
        return {"type": name, "sequence_number": self.sequence - 1, **fields}

    def opening(self) -> list[dict[str, Any]]:
        return [self._event(kind, response=self.response("in_progress")) for kind in ("created", "in_progress")]

    def text(self, content: str = "", reasoning: str = "") -> list[dict[str, Any]]:
        """Events for newly settled text: thinking first (its item opened the first time), then the answer."""
        events = []
        if reasoning:
            events += self._switch_to("reasoning")
            self.reasoning += reasoning
            events.append(self._delta("reasoning_text", self.reasoning_id, reasoning))
        if content:
            events += self._switch_to("message")
            self.content += content
            events.append(self._delta("output_text", self.message_id, content))
        return events

    def closing(self, finish: str, counts: dict[str, int]) -> list[dict[str, Any]]:
        """The open items closed (the answer's opened if nothing came), then the whole response with its usage
        (`counts`: the chat usage's)."""
        status = "incomplete" if finish == "length" else "completed"
        answered = "message" in self.items or self.calls  # (a reply of calls alone has no message)
        events = (self._switch_to("message") if not answered else []) + self._close()
        whole = self.response(status, self.usage(counts))
        if self.on_done is not None:
            self.on_done(whole)
        return [*events, self._event(status, response=whole)]

    def sse(self, payload: dict[str, Any] | list[dict[str, Any]]) -> str:
        """Server-sent events as a Responses stream sends them: a failure mid-stream (`schema.error_body`'s shape)
        as an `error` event, then `response.failed` (OpenAI's clients and the Vercel AI SDK read these; chat's
        error shape is no event of this API), the failed response kept as the others are."""
        error = stream_failure(payload)
        if error is not None:
            code, message = error.get("code") or "server_error", error["message"]
            failed = self.response("failed", error={"code": code, "message": message})
            if self.on_done is not None:  # (kept as it failed: GET /v1/responses/{id} says so)
                self.on_done(failed)
            payload = [
                self._event_named("error", code=code, message=message, param=None),
                self._event("failed", response=failed),
            ]
        return sse(payload)

    def function_calls(self, calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Events for a reply's tool calls (chat's shape, each with its id), after its text: a `function_call`
        item each, its arguments in one delta."""
        events = self._close()
        for call in calls:
            item = {
                "type": "function_call",
                "id": _identifier("fc"),
                "call_id": call["id"],
                "name": call["function"]["name"],
                "arguments": call["function"]["arguments"],
                "status": "completed",
            }
            index = len(self.items)
            self.items.append("function_call")
            self.calls.append(item)
            where = {"item_id": item["id"], "output_index": index}
            added = {**item, "arguments": "", "status": "in_progress"}
            events.append(self._event("output_item.added", output_index=index, item=added))
            events.append(self._event("function_call_arguments.delta", **where, delta=item["arguments"]))
            events.append(self._event("function_call_arguments.done", **where, arguments=item["arguments"]))
            events.append(self._event("output_item.done", output_index=index, item=item))
        return events

    def _switch_to(self, kind: str) -> list[dict[str, Any]]:
        if self.open == kind:
            return []
        events = self._close()
        self.open = kind
        self.items.append(kind)
        index, item = len(self.items) - 1, self._item(kind, "in_progress")
        part = item["content"][0]  # (empty: nothing of this item has come yet)
        events.append(self._event("output_item.added", output_index=index, item={**item, "content": []}))
        where = {"item_id": item["id"], "output_index": index, "content_index": 0}
        events.append(self._event("content_part.added", **where, part=part))
        return events

    def _close(self) -> list[dict[str, Any]]:
        if self.open is None:
            return []
        kind, index = self.open, len(self.items) - 1
        item = self._item(kind, "completed")
        part, text = item["content"][0], item["content"][0]["text"]
        done = "reasoning_text.done" if kind == "reasoning" else "output_text.done"
        common = {"item_id": item["id"], "output_index": index, "content_index": 0}
        events = [self._event(done, **common, text=text, **({"logprobs": self.logprobs} if kind == "message" else {}))]
        events.append(self._event("content_part.done", **common, part=part))
        events.append(self._event("output_item.done", output_index=index, item=item))
        self.open = None
        return events

    def _delta(self, kind: str, item_id: str, delta: str) -> dict[str, Any]:
        index = len(self.items) - 1
        extra = {"logprobs": []} if kind == "output_text" else {}
        return self._event(f"{kind}.delta", item_id=item_id, output_index=index, content_index=0, delta=delta, **extra)
