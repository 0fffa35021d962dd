"""Tool calls in Gemma 4's syntax: the tools offered (OpenAI's shape, or Python functions), the calls read out of
a reply, the reply made to begin one, the calls run with the functions they name.

The model writes a call as `<|tool_call>call:NAME{key:value,...}<tool_call|>` and then ends its output with
`<|tool_response>` (an EOS): the caller runs the tool and puts its answer back in the conversation. Inside the
braces keys are bare, strings sit between two `<|"|>` tokens (no escapes), and numbers, `true`, `false`,
`null`, `{...}` and `[...]` are written as JSON writes them. The chat template writes the offered tools, and
the calls and answers already in a conversation, in the same syntax.
"""

from __future__ import annotations

import asyncio
import enum
import inspect
import json
import re
import types
import typing
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from .errors import DiffGemmaError
from .structured import schema_error, schema_fault

TOOL_CALL_OPEN = "<|tool_call>"
TOOL_CALL_CLOSE = "<tool_call|>"
TOOL_RESPONSE_OPEN = "<|tool_response>"  # where the tools' answers come in: the end of a turn's calls (an EOS)
STRING_QUOTE = '<|"|>'
# OpenAI's rule for a function's name (the model's syntax takes dots too, as some tool catalogues name tools)
TOOL_NAME = re.compile(r"[A-Za-z0-9_.\-]{1,64}")

Tool = dict[str, Any] | Callable[..., Any]  # OpenAI's shape, or a Python function (`function_tool`)
FORCED_CALL = "tool call that fits"  # (what a forced call's reply must hold: "no tool call that fits in 3 tries")

_CALL = re.compile(r"\s*call:\s*([A-Za-z0-9_.\-]+)\s*(\{.*\})\s*", re.DOTALL)
_BARE_KEY = re.compile(r"[^:,{}\[\]]+")
_BARE_VALUE = re.compile(r"[^,{}\[\]]*")
_PYTHON_WORDS = {"True": True, "False": False, "None": None}
_JSON = json.JSONDecoder()


@dataclass(frozen=True)
class ToolCall:
    """One call the model made: the tool's name and its arguments."""

    name: str
    arguments: dict[str, Any]

    @property
    def arguments_json(self) -> str:
        """The arguments as JSON text (OpenAI's `function.arguments`)."""
        return json.dumps(self.arguments, ensure_ascii=False)


def take_tool_calls(text: str, final: bool = True) -> tuple[str, tuple[ToolCall, ...]]:
    """(`text` without its call blocks, the calls in them, in order). While the reply is not `final`, a block
    still open is cut off with all after it (the rest of it is yet to come). At the end, a block that is not
    closed or does not read as a call stays in the text, so nothing the model wrote is lost."""
    kept: list[str] = []
    calls: list[ToolCall] = []
    for before, block, closed in marked_blocks(text, TOOL_CALL_OPEN, TOOL_CALL_CLOSE):
        kept.append(before)
        if block is None:
            continue
        if not closed:
            kept.append(TOOL_CALL_OPEN + block if final else "")
            continue
        try:
            calls.append(parse_call(block))
        except ValueError:
            kept.append(TOOL_CALL_OPEN + block + TOOL_CALL_CLOSE)
    return "".join(kept), tuple(calls)


def marked_blocks(text: str, open_marker: str, close_marker: str) -> Iterator[tuple[str, str | None, bool]]:
    """`text` as (the text before a block, the block between the markers, whether it was closed), in order,
    then (the text after the last block, None, True); a block left open runs to the end and is the last."""
    rest = text
    while open_marker in rest:
        before, _, after = rest.partition(open_marker)
        block, closed, rest = after.partition(close_marker)
        yield before, block, bool(closed)
        if not closed:
            return
    yield rest, None, True


def parse_call(block: str) -> ToolCall:
    """What lies between a call's markers (`call:NAME{...}`) as a ToolCall; ValueError if it is not one."""
    found = _CALL.fullmatch(block)
    if found is None:
        raise ValueError(f"not a call: {block[:80]!r}")
    reader = _ValueReader(found.group(2))
    arguments = reader.value()
    reader.end()
    return ToolCall(found.group(1), arguments)


class _ValueReader:
    """Reads one value of the call syntax, from `text` at `at` onward."""

    def __init__(self, text: str) -> None:
        self.text, self.at = text, 0

    def end(self) -> None:
        self._skip()
        if self.at != len(self.text):
            raise ValueError(f"unexpected {self.text[self.at : self.at + 20]!r} after the arguments")

    def value(self) -> Any:
        self._skip()
        if self.text.startswith(STRING_QUOTE, self.at):
            return self._quoted()
        head = self.text[self.at : self.at + 1]
        if head == "{":
            return self._mapping()
        if head == "[":
            return self._sequence()
        if head == '"':
            return self._json_string()
        word = _BARE_VALUE.match(self.text, self.at)
        self.at = word.end()
        return _bare(word.group(0).strip())

    def _mapping(self) -> dict[str, Any]:
        self.at += 1
        mapping: dict[str, Any] = {}
        if self._take("}"):
            return mapping
        while True:
            key = self._key()
            if not self._take(":"):
                raise ValueError(f"no ':' after the key {key!r}")
            mapping[key] = self.value()
            if self._take("}"):
                return mapping
            if not self._take(","):
                raise ValueError("an object's entries must be separated by ','")

    def _sequence(self) -> list[Any]:
        self.at += 1
        items: list[Any] = []
        if self._take("]"):
            return items
        while True:
            items.append(self.value())
            if self._take("]"):
                return items
            if not self._take(","):
                raise ValueError("a list's items must be separated by ','")

    def _key(self) -> str:
        self._skip()
        if self.text.startswith(STRING_QUOTE, self.at):
            return self._quoted()
        if self.text.startswith('"', self.at):
            return self._json_string()
        word = _BARE_KEY.match(self.text, self.at)
        if word is None or not word.group(0).strip():
            raise ValueError("an object's key is missing")
        self.at = word.end()
        return word.group(0).strip()

    def _quoted(self) -> str:
        start = self.at + len(STRING_QUOTE)
        end = self.text.find(STRING_QUOTE, start)
        if end < 0:
            raise ValueError("a string is not closed")
        self.at = end + len(STRING_QUOTE)
        return self.text[start:end]

    def _json_string(self) -> str:
        try:
            text, self.at = _JSON.raw_decode(self.text, self.at)
        except json.JSONDecodeError as err:
            raise ValueError(f"a quoted string does not read: {err}") from None
        return text

    def _take(self, symbol: str) -> bool:
        self._skip()
        if self.text.startswith(symbol, self.at):
            self.at += len(symbol)
            return True
        return False

    def _skip(self) -> None:
        while self.at < len(self.text) and self.text[self.at].isspace():
            self.at += 1


def _bare(word: str) -> Any:
    """An unquoted value: a JSON number or literal (Python's True, False and None too), else the word itself (a
    model may leave a string unquoted)."""
    if not word:
        raise ValueError("a value is missing")
    if word in _PYTHON_WORDS:
        return _PYTHON_WORDS[word]
    try:
        return json.loads(word)
    except json.JSONDecodeError:
        return word


def check_tools(tools: Sequence[Tool]) -> list[dict[str, Any]]:
    """Tools offered in OpenAI's shape, `{"type": "function", "function": {"name": ..., "description": ...,
    "parameters": {JSON schema}}}`, or as Python functions (`function_tool`; one that carries its own offer in
    that shape as `openai_tool` is offered so: an MCP server's tool, `tool_servers`), checked (a clear error names
    the one at fault)."""
    if not isinstance(tools, Sequence) or isinstance(tools, str):
        raise DiffGemmaError("tools must be a list of {'type': 'function', 'function': {...}} objects or functions")
    tools = [(getattr(tool, "openai_tool", None) or function_tool(tool)) if callable(tool) else tool for tool in tools]
    for index, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type", "function") != "function" or not isinstance(function, dict):
            raise DiffGemmaError(f"tools[{index}] must be {{'type': 'function', 'function': {{'name': ...}}}}")
        name = function.get("name")
        if not isinstance(name, str) or not TOOL_NAME.fullmatch(name):
            raise DiffGemmaError(
                f"tools[{index}].function.name must be 1-64 letters, digits, '_', '-' or '.', got {name!r}"
            )
        if not isinstance(function.get("parameters", {}), dict):
            raise DiffGemmaError(f"tools[{index}].function.parameters must be a JSON schema object")
    return tools


def function_tool(function: Callable[..., Any]) -> dict[str, Any]:
    """A Python function as a tool, read as `transformers` reads one: its name; its docstring's text before
    `Args:` as the description; each parameter's type hint as its JSON schema, with its line under `Args:`
    (`name: what it is`) as its description; parameters without a default are required."""
    name = getattr(function, "__name__", repr(function))
    try:
        hints = typing.get_type_hints(function)
        parameters = inspect.signature(function).parameters
    except (TypeError, ValueError, NameError) as err:
        raise DiffGemmaError(f"tool {name}: cannot read its signature ({err})") from None
    description, explained = _read_docstring(inspect.getdoc(function) or "")
    properties: dict[str, Any] = {}
    required = []
    for parameter in parameters.values():
        if parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
            raise DiffGemmaError(f"tool {name}: *{parameter.name} cannot be a tool's parameter; name each one")
        if parameter.name not in hints:
            raise DiffGemmaError(f"tool {name}: parameter {parameter.name!r} needs a type hint (its JSON type)")
        schema = _json_schema(hints[parameter.name], f"tool {name}: parameter {parameter.name!r}")
        if parameter.name in explained:
            schema["description"] = explained[parameter.name]
        properties[parameter.name] = schema
        if parameter.default is parameter.empty:
            required.append(parameter.name)
    schema = {"type": "object", "properties": properties, "required": required}
    return {"type": "function", "function": {"name": name, "description": description, "parameters": schema}}


_JSON_TYPES = {str: "string", int: "integer", float: "number", bool: "boolean", type(None): "null"}
_ARG_LINE = re.compile(r"\s*(\w+)\s*(?:\([^)]*\))?\s*:\s*(.*)")


def _json_schema(hint: Any, where: str) -> dict[str, Any]:
    """A type hint as a JSON schema: str, int, float, bool, None, lists, tuples and dicts of them, Literal
    choices, Enum classes (their members' values: a call's value becomes the member, `run_tool_calls`), and
    unions (`X | None`: X, nullable)."""
    origin, arguments = typing.get_origin(hint), typing.get_args(hint)
    if hint in _JSON_TYPES:
        return {"type": _JSON_TYPES[hint]}
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        values = [member.value for member in hint]
        return {"type": _JSON_TYPES.get(type(values[0]), "string"), "enum": values} if values else {"type": "string"}
    if origin is typing.Literal:
        return {"type": _JSON_TYPES.get(type(arguments[0]), "string"), "enum": list(arguments)}
    if origin in (typing.Union, types.UnionType):
        kinds = [argument for argument in arguments if argument is not type(None)]
        if len(kinds) == 1:
            return {**_json_schema(kinds[0], where), "nullable": True}
        return {"type": [_json_schema(kind, where)["type"] for kind in kinds]}
    if hint in (list, tuple) or origin in (list, tuple, Sequence):
        items = [argument for argument in arguments if argument is not Ellipsis]
        return {"type": "array", **({"items": _json_schema(items[0], where)} if len(items) == 1 else {})}
    if hint is dict or origin is dict:
        return {"type": "object"}
    raise DiffGemmaError(f"{where}: its type {hint!r} has no JSON schema here (str, int, float, bool, lists, dicts)")


def _read_docstring(doc: str) -> tuple[str, dict[str, str]]:
    """(the description: the text before the sections, each parameter's line under `Args:`; a parameter's
    description may go on over more deeply indented lines)."""
    description: list[str] = []
    explained: dict[str, str] = {}
    section, last, indent = "", "", None  # the section, the parameter read last, the parameters' indentation
    for line in doc.splitlines():
        heading, depth = line.strip().rstrip(":"), len(line) - len(line.lstrip())
        if line.strip().endswith(":") and heading in ("Args", "Arguments", "Parameters", "Returns", "Raises"):
            section, last, indent = heading, "", None
        elif not section:
            description.append(line.strip())
        elif section in ("Args", "Arguments", "Parameters") and line.strip():
            found = _ARG_LINE.fullmatch(line)
            if found and depth == (indent if indent is not None else depth):
                indent, last = depth, found.group(1)
                explained[last] = found.group(2).strip()
            elif last:
                explained[last] += " " + line.strip()
    return " ".join(part for part in description if part), explained


def run_tool_calls(
    calls: Sequence[ToolCall], functions: Sequence[Callable[..., Any]], content: str = ""
) -> list[dict[str, Any]]:
    """Run a reply's calls with the Python `functions` they name, and give back the messages that carry on the
    conversation: the assistant's (its `content`, its calls), then a tool message for each call with what it
    returned (text as it is, anything else as JSON; an `async` function's result awaited). A call to no function
    given, with arguments that do not fit, or whose function raises, is answered with the error, for the model
    to read (as agents do)."""
    by_name = {function.__name__: function for function in functions}
    turn: dict[str, Any] = {"role": "assistant", "content": content, "tool_calls": []}
    answers = []
    for call in calls:
        call_id = f"call_{uuid.uuid4().hex[:24]}"  # unique across rounds: a template may find a call by its id
        turn["tool_calls"].append(
            {"id": call_id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}
        )
        try:
            if call.name not in by_name:
                raise LookupError(f"no tool named {call.name!r}; the tools are {', '.join(by_name)}")
            returned = _call(by_name[call.name], call.arguments)
            answer = returned if isinstance(returned, str) else json.dumps(returned, ensure_ascii=False, default=str)
        except Exception as err:  # the model is told what went wrong, as an agent tells it
            answer = f"error: {type(err).__name__}: {err}"
        answers.append({"role": "tool", "tool_call_id": call_id, "name": call.name, "content": answer})
    return [turn, *answers]


def _call(function: Callable[..., Any], arguments: dict[str, Any]) -> Any:
    """`function` called with a call's arguments, each value for an Enum parameter made its member (the model
    writes the value), an `async` function's result awaited."""
    try:
        hints = typing.get_type_hints(function)
    except (TypeError, NameError):  # (a builtin, say: no hints to read, nothing to convert)
        hints = {}
    for name, value in arguments.items():
        kinds = [hints.get(name), *typing.get_args(hints.get(name))]  # (an `Enum | None` too)
        kind = next((kind for kind in kinds if isinstance(kind, type) and issubclass(kind, enum.Enum)), None)
        if kind is not None and value is not None:
            arguments = {**arguments, name: kind(value)}
    returned = function(**arguments)
    return asyncio.run(returned) if inspect.iscoroutine(returned) else returned


def tool_plan(tools: Sequence[Tool] | None, tool_choice: str = "auto") -> tuple[list | None, str]:
    """(the tools to offer the template, the text the reply is made to begin with) for `tool_choice`: "auto"
    (the model decides: nothing begun), "none" (no tools offered), "required" (the call marker begun: some
    call), or a tool's name (a call to that tool begun)."""
    if tools is not None and (not isinstance(tools, Sequence) or isinstance(tools, str)):
        check_tools(tools)  # (says what tools must be)
    if tool_choice == "none" or (not tools and tool_choice == "auto"):
        return None, ""
    if not tools:
        raise DiffGemmaError(f"tool_choice {tool_choice!r} needs tools to choose from")
    tools = check_tools(tools)
    if tool_choice == "auto":
        return tools, ""
    for index, tool in enumerate(tools):  # (a forced call's arguments are checked against them: forced_call_fault)
        error = schema_error(tool["function"].get("parameters") or {})
        if error is not None:
            raise DiffGemmaError(f"tools[{index}].function.parameters: not a valid JSON schema: {error}")
    if tool_choice == "required":
        return tools, f"{TOOL_CALL_OPEN}call:"
    names = [tool["function"]["name"] for tool in tools]
    if tool_choice not in names:
        message = f"tool_choice must be 'auto', 'none', 'required' or a tool's name ({', '.join(names)})"
        raise DiffGemmaError(f"{message}, got {tool_choice!r}")
    return tools, f"{TOOL_CALL_OPEN}call:{tool_choice}{{"


def forced_call_fault(calls: Sequence[ToolCall], tools: Sequence[dict[str, Any]], content: str) -> str | None:
    """Why a reply that had to call a tool (`tool_choice` "required" or a tool's name: `tool_plan`) did not: no
    call read from it (`content`: what it said instead), a call to a tool not offered, or arguments that do not
    match the tool's parameters. None: it made its calls, each fitting its tool."""
    if not calls:
        return f"no call read from the reply (it began {content.strip()[:40]!r})"
    parameters = {tool["function"]["name"]: tool["function"].get("parameters") or {} for tool in tools}
    for call in calls:
        if call.name not in parameters:
            return f"it called {call.name!r}, which is not offered ({', '.join(parameters)})"
        fault = schema_fault(parameters[call.name], call.arguments)
        if fault is not None:
            return f"its call to {call.name} does not fit the tool's parameters: {fault}"
    return None
