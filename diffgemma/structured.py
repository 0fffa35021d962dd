"""Answers of a given form: JSON (OpenAI's `response_format`, matching a schema or any object), or, as vLLM's
structured outputs ask, text matching a regular expression or one of given choices.

Autoregressive servers steer each next token through a grammar; the diffusion sampler draws a canvas's tokens
together, with no left-to-right order to steer. So the form is told to the model in the system turn, each reply
is read against it (JSON: a code fence around it forgiven), and a reply that does not read is drawn again with
the next seed, up to a number of tries. What comes back has the form asked for, or an error says why the last
try did not: never free text where a form was asked for.
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


class AnswerFormat:
    """A form an answer must have: told to the model (`instruction`), read from a reply (`read`: its value, or
    DiffGemmaError saying why not), and given back as `text` (what the reply says, in that form)."""

    what = "answer in the form asked for"  # (in errors: "no JSON answer in 3 draws")

    def instruction(self) -> str:
        raise NotImplementedError

    def read(self, text: str) -> Any:
        raise NotImplementedError

    def text(self, reply: str) -> str:
        return reply.strip()

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


@dataclass(frozen=True)
class JsonFormat(AnswerFormat):
    """A JSON answer's form: any JSON object (`schema` None, OpenAI's "json_object"), or a value matching a JSON
    schema (its `name` and `description` told to the model with it)."""

    schema: dict[str, Any] | None = None
    name: str = "answer"
    description: str = ""
    what = "JSON answer"

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

    def text(self, reply: str) -> str:
        return unfenced(reply)

    def read(self, text: str) -> Any:
        """The JSON value a reply is (surrounding whitespace and a code fence around it forgiven); a reply that is
        not JSON, or does not match the schema, raises DiffGemmaError saying where and why."""
        try:
            value = json.loads(unfenced(text))
        except json.JSONDecodeError as err:
            began = unfenced(text)[:40]
            raise DiffGemmaError(
                f"the answer is not JSON ({err.msg} at character {err.pos}; it began {began!r})"
            ) from None
        if self.schema is None:
            if not isinstance(value, dict):
                raise DiffGemmaError(f"the answer is JSON but not an object (a {type(value).__name__})")
            return value
        fault = schema_fault(self.schema, value)
        if fault is not None:
            raise DiffGemmaError(f"the answer does not match the schema: {fault}")
        return value


def schema_fault(schema: dict[str, Any], value: Any) -> str | None:
    """Where and why `value` does not match the JSON `schema` (a valid one), the likeliest fault first; None when
    it matches."""
    validator = jsonschema.validators.validator_for(schema)(schema)
    error = jsonschema.exceptions.best_match(validator.iter_errors(value))
    return None if error is None else f"at {error.json_path}, {error.message}"


def schema_error(schema: dict[str, Any]) -> str | None:
    """Why `schema` is not a valid JSON schema (None: it is one)."""
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.exceptions.SchemaError as err:
        return err.message
    return None


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
    return _checked(fmt, where)


def _checked(fmt: JsonFormat, where: str) -> JsonFormat:
    """`fmt`, once its schema is known to be JSON, and a valid JSON schema."""
    try:
        json.dumps(fmt.schema)
    except (TypeError, ValueError) as err:
        raise DiffGemmaError(f"{where}: a JSON schema must be JSON ({err})") from None
    error = schema_error(fmt.schema)
    if error is not None:
        raise DiffGemmaError(f"{where}: not a valid JSON schema: {error}")
    return fmt


@dataclass(frozen=True)
class RegexFormat(AnswerFormat):
    """An answer whose text (surrounding whitespace aside) matches a regular expression whole."""

    pattern: str
    what = "answer matching the regular expression"

    def instruction(self) -> str:
        return f"Answer with text that matches this regular expression, and nothing else: {self.pattern}"

    def read(self, text: str) -> str:
        if re.fullmatch(self.pattern, text.strip()) is None:
            raise DiffGemmaError(f"the answer does not match {self.pattern!r} (it began {text.strip()[:40]!r})")
        return text.strip()


@dataclass(frozen=True)
class ChoiceFormat(AnswerFormat):
    """An answer that is one of given texts (surrounding whitespace aside)."""

    choices: tuple[str, ...]
    what = "answer among the choices"

    def instruction(self) -> str:
        return "Answer with exactly one of these, and nothing else: " + "; ".join(self.choices)

    def read(self, text: str) -> str:
        if text.strip() not in self.choices:
            raise DiffGemmaError(f"the answer is none of the choices (it began {text.strip()[:40]!r})")
        return text.strip()


def vllm_format(fields: dict[str, Any], where: str) -> AnswerFormat | None:
    """The form vLLM's structured outputs ask for: `structured_outputs` {"json" | "regex" | "choice" |
    "json_object"}, or the older `guided_json`, `guided_regex`, `guided_choice` (None: none asked). A grammar is
    refused (no reader here for one); so is more than one form."""
    nested = fields.get("structured_outputs") or {}
    if not isinstance(nested, dict):
        raise DiffGemmaError(f"{where}: structured_outputs must be an object")
    asked = {f"guided_{key}": value for key, value in nested.items() if value not in (None, False)}
    asked |= {key: value for key, value in fields.items() if key.startswith("guided_") and value is not None}
    if "guided_grammar" in asked:
        raise DiffGemmaError(f"{where}: a grammar is not supported (JSON schemas, regular expressions, choices are)")
    kinds = sorted(set(asked) & {"guided_json", "guided_regex", "guided_choice", "guided_json_object"})
    if len(kinds) > 1:
        raise DiffGemmaError(f"{where}: give one form, not {', '.join(kinds)}")
    if not kinds:
        return None
    value = asked[kinds[0]]
    if kinds[0] == "guided_json_object":
        return JsonFormat()
    if kinds[0] == "guided_json":
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                raise DiffGemmaError(f"{where}: guided_json is not a JSON schema (nor JSON text of one)") from None
        if not isinstance(value, dict):
            raise DiffGemmaError(f"{where}: guided_json must be a JSON schema")
        return _checked(JsonFormat(value), where)
    if kinds[0] == "guided_regex":
        try:
            re.compile(value)
        except (re.error, TypeError) as err:
            raise DiffGemmaError(f"{where}: guided_regex is not a regular expression ({err})") from None
        return RegexFormat(value)
    if not isinstance(value, list) or not value or not all(isinstance(choice, str) for choice in value):
        raise DiffGemmaError(f"{where}: guided_choice must be a list of texts")
    return ChoiceFormat(tuple(value))
