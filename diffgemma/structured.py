"""JSON answers: a chat reply asked to be JSON (OpenAI's `response_format`), told its schema and read against it.

Autoregressive servers steer each next token through a grammar; the diffusion sampler draws a canvas's tokens
together, with no left-to-right order to steer. So the schema is told to the model in the system turn, each
reply is read (a code fence around it forgiven) and checked against the schema, and a reply that does not read
is drawn again with the next seed, up to a number of tries. What comes back is JSON that matches, or an error
that says why the last try did not: never free text where JSON was asked for.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

import jsonschema

from .errors import DiffGemmaError

DEFAULT_TRIES = 3
JSON_TYPES = ("object", "array", "string", "number", "integer", "boolean", "null")
FENCE = re.compile(r"^```[\w-]*\s*\n(.*?)\n?```$", re.DOTALL)  # ```json ... ```, as chat models often wrap JSON


@dataclass(frozen=True)
class JsonFormat:
    """A JSON answer's form: any JSON object (`schema` None, OpenAI's "json_object"), or a value matching a JSON
    schema (its `name` and `description` told to the model with it)."""

    schema: dict[str, Any] | None = None
    name: str = "answer"
    description: str = ""

    def instruction(self) -> str:
        """What the system turn tells the model."""
        if self.schema is None:
            return "Answer with one JSON object and nothing else: no text before or after it, no code fence."
        about = f" ({self.description})" if self.description else ""
        schema = json.dumps(self.schema, ensure_ascii=False)
        return (
            f"Answer with one JSON value, {self.name}{about}, that matches this JSON schema, and nothing else: "
            f"no text before or after it, no code fence.\nJSON schema: {schema}"
        )

    def with_instruction(self, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """`messages` with the instruction at the end of their first system (or developer) turn, or in a system
        turn of its own before them."""
        if messages and messages[0].get("role") in ("system", "developer"):
            first = messages[0]
            content = first.get("content") or ""
            if isinstance(content, str):
                told = f"{content}\n\n{self.instruction()}" if content else self.instruction()
            else:  # a list of parts
                told = [*content, {"type": "text", "text": self.instruction()}]
            return [{**first, "content": told}, *messages[1:]]
        return [{"role": "system", "content": self.instruction()}, *messages]

    def read(self, text: str) -> Any:
        """The JSON value a reply is (surrounding whitespace and a code fence around it forgiven); a reply that is
        not JSON, or does not match the schema, raises DiffGemmaError saying where and why."""
        try:
            value = json.loads(unfenced(text))
        except json.JSONDecodeError as err:
            raise DiffGemmaError(f"the answer is not JSON ({err.msg} at character {err.pos})") from None
        if self.schema is None:
            if not isinstance(value, dict):
                raise DiffGemmaError(f"the answer is JSON but not an object (a {type(value).__name__})")
            return value
        validator = jsonschema.validators.validator_for(self.schema)(self.schema)
        error = jsonschema.exceptions.best_match(validator.iter_errors(value))
        if error is not None:
            raise DiffGemmaError(f"the answer does not match the schema: at {error.json_path}, {error.message}")
        return value


def unfenced(reply: str) -> str:
    """A reply without surrounding whitespace and a code fence around it: the JSON it holds, as its text."""
    reply = reply.strip()
    fenced = FENCE.match(reply)
    return fenced.group(1).strip() if fenced else reply


def json_format(spec: dict[str, Any] | bool | None, where: str) -> JsonFormat | None:
    """A JSON answer's form from what a caller gives: OpenAI's chat `response_format` ({"type": "text"},
    {"type": "json_object"}, {"type": "json_schema", "json_schema": {"name", "schema", "description", "strict"}}),
    the Responses API's `text.format` (the same, flattened), a bare JSON schema, or True (any JSON object).
    None (or "text") asks for free text. A schema that is not one raises DiffGemmaError naming `where`."""
    if spec is None or spec is False:
        return None
    if spec is True:
        return JsonFormat()
    if not isinstance(spec, dict):
        raise DiffGemmaError(f"{where}: expected a JSON schema or a response format object, got {type(spec).__name__}")
    kind = spec.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return JsonFormat()
    if kind == "json_schema":
        named = spec.get("json_schema", spec)  # chat completions nest it, the Responses API does not
        if not isinstance(named, dict) or not isinstance(named.get("schema"), dict):
            raise DiffGemmaError(f"{where}: a json_schema format needs its `schema`, a JSON schema object")
        fmt = JsonFormat(named["schema"], str(named.get("name") or "answer"), str(named.get("description") or ""))
    elif "response_format" in spec or "format" in spec:
        raise DiffGemmaError(f"{where}: give the format itself, not an object holding it")
    elif isinstance(kind, str) and kind not in JSON_TYPES:
        raise DiffGemmaError(f"{where}: unknown format type {kind!r}; expected text, json_object or json_schema")
    else:
        fmt = JsonFormat(spec)
    try:
        jsonschema.validators.validator_for(fmt.schema).check_schema(fmt.schema)
    except jsonschema.exceptions.SchemaError as err:
        raise DiffGemmaError(f"{where}: not a valid JSON schema: {err.message}") from None
    return fmt
