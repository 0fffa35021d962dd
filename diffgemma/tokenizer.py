"""Text <-> ids: `tokenizer.json` through `tokenizers`, the chat template through `jinja2`.

Also splits the Gemma 4 thinking channel (`<|channel>thought\\n ... <channel|>`) from the answer.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import cached_property
from pathlib import Path
from typing import Any

import jinja2
import jinja2.meta
import jinja2.sandbox
from tokenizers import Tokenizer as RustTokenizer

from .config import read_json, read_text
from .errors import DiffGemmaError
from .toolcalls import Tool, check_tools, marked_blocks

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
TEMPLATE_FILE = "chat_template.jinja"
TOKENIZER_FILES = (TOKENIZER_FILE, TOKENIZER_CONFIG, TEMPLATE_FILE, "special_tokens_map.json")
TURN_OPEN = "<|turn>"  # the chat template opens each turn with it
SYSTEM_ROLES = ("system", "developer")  # the roles whose turns instruct the model
THINKING_OPEN = "<|channel>thought\n"
THINKING_CLOSE = "<channel|>"


def tokenizer_files(folder: Path) -> dict[str, Path]:
    """The tokenizer's files a checkpoint folder holds, by name: what a checkpoint written from it copies."""
    return {name: folder / name for name in TOKENIZER_FILES if (folder / name).is_file()}


@dataclass(frozen=True)
class ChatReply:
    """A model turn split into its visible answer and its thinking channel (empty when there is none)."""

    content: str
    reasoning: str


def split_thinking(text: str, strip: tuple[str, ...] = (), trailing_space: bool = False) -> ChatReply:
    """Separate thinking-channel blocks from the answer; an unclosed block is all thinking so far.

    Strings in `strip` (other special tokens, such as the end-of-turn marker) are removed from both parts, and
    both lose the space around them; with `trailing_space` the answer keeps the space it ends with (where a stop
    string may lie).
    """
    content: list[str] = []
    reasoning: list[str] = []
    for before, thought, _ in marked_blocks(text, THINKING_OPEN, THINKING_CLOSE):
        content.append(before)
        if thought is not None:
            reasoning.append(thought)

    def clean(part: str) -> str:
        for token in strip:
            part = part.replace(token, "")
        return part

    answer = clean("".join(content))
    thinking = clean("\n".join(r.strip() for r in reasoning)).strip()
    return ChatReply(answer.lstrip() if trailing_space else answer.strip(), thinking)


def _token_text(value: Any) -> str | None:
    """Special tokens are written either as plain strings or as AddedToken objects with `content`."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


class Tokenizer:
    def __init__(self, folder: Path) -> None:
        path = folder / TOKENIZER_FILE
        try:
            self.backend = RustTokenizer.from_file(str(path))
        except Exception as err:  # the Rust library raises plain Exceptions for bad files
            raise DiffGemmaError(f"{path}: cannot read tokenizer ({err})") from None
        config_path = folder / TOKENIZER_CONFIG
        settings: dict[str, Any] = {}
        if config_path.is_file():
            settings = read_json(config_path)
        self.special = {role: _token_text(settings.get(f"{role}_token")) for role in ("bos", "eos", "pad", "unk")}
        template_path = folder / TEMPLATE_FILE
        template = settings.get("chat_template")
        if template_path.is_file():
            template = read_text(template_path)
        if isinstance(template, list):  # named templates: take the default one
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default")
        self.chat_template: str | None = None
        self._compiled: jinja2.Template | None = None
        self.renders_tools = False  # whether the template writes the `tools` it is given
        self._control_patterns_made: tuple[re.Pattern, re.Pattern] | None = None  # `_control_patterns`
        self._as_text: RustTokenizer | None = None  # `_special_as_text`
        if isinstance(template, str):
            self.use_template(template, str(folder))

    def use_template(self, template: str, where: str = "the chat template") -> None:
        """Render chats with `template` (a checkpoint's own, or one given in its place: `chat --chat-template`);
        `where` names it in the error if it does not parse."""
        environment = _template_environment()
        try:
            parsed = environment.parse(template)
        except jinja2.TemplateSyntaxError as err:
            raise DiffGemmaError(f"{where}: chat template has a syntax error: {err}") from None
        self.chat_template, self._compiled = template, environment.from_string(parsed)  # compiled from its parse
        self.renders_tools = "tools" in jinja2.meta.find_undeclared_variables(parsed)

    @cached_property
    def special_strings(self) -> tuple[str, ...]:
        """The text of every special added token (markers that plain decoding drops); read once, as every
        settling reply strips them."""
        added = self.backend.get_added_tokens_decoder().values()
        return tuple(token.content for token in added if token.special)

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def token_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    @cached_property
    def thinking_ids(self) -> tuple[tuple[int, ...], int | None]:
        """The thinking channel's opening ids and the id that closes it (None: this vocabulary has none)."""
        return tuple(self.encode(THINKING_OPEN, add_special_tokens=False)), self.token_id(THINKING_CLOSE)

    def thought_length(self, ids: Sequence[int]) -> int:
        """How many of a reply's `ids` its thinking channel takes, its markers included: 0 where the reply does not
        begin one, all of them where it is not closed."""
        opening, close = self.thinking_ids
        if close is None or tuple(ids[: len(opening)]) != opening:
            return 0
        return next((at + 1 for at in range(len(opening), len(ids)) if ids[at] == close), len(ids))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if not isinstance(text, str):
            raise DiffGemmaError(f"the tokenizer encodes a text, got {type(text).__name__}")
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        try:
            return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)
        except (TypeError, OverflowError):  # (the tokenizers library's errors for what is no list of ids)
            raise DiffGemmaError(f"the tokenizer decodes token ids (integers from 0), got {ids!r:.80}") from None

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        enable_thinking: bool = False,
        prefill: str = "",
        tools: Sequence[Tool] | None = None,
        **extra: Any,
    ) -> str:
        """Render a conversation to prompt text with the checkpoint's template. `prefill`: the answer begun (say
        "{"), written after the generation prompt, where the model's own answer would begin, for it to go on.
        `tools`: those the model may call (`toolcalls.check_tools`), for templates that write them."""
        if self._compiled is None:
            raise DiffGemmaError(
                "this checkpoint's tokenizer has no chat template (tokenizer_config.json or chat_template.jinja)"
            )
        check_messages(messages, prefill)
        if prefill and not add_generation_prompt:
            raise DiffGemmaError("a prefill begins the model's answer, so it needs the generation prompt")
        if tools and not self.renders_tools:
            raise DiffGemmaError("this checkpoint's chat template does not write tools, so none can be offered")
        if tools:
            extra["tools"] = check_tools(tools)
        try:
            rendered = self._compiled.render(
                messages=[_with_call_arguments(_with_reasoning_aliases(message)) for message in messages],
                add_generation_prompt=add_generation_prompt,
                enable_thinking=enable_thinking,
                bos_token=self.special["bos"] or "",
                eos_token=self.special["eos"] or "",
                **extra,
            )
        except jinja2.TemplateError as err:
            raise DiffGemmaError(f"chat template failed: {err}") from None
        return rendered + prefill

    def encode_chat(
        self,
        messages: list[dict[str, Any]],
        enable_thinking: bool = False,
        prefill: str = "",
        sanitize: bool = False,
        tools: Sequence[Tool] | None = None,
        **extra: Any,
    ) -> list[int]:
        """Chat prompt ids; the template writes its own special tokens (BOS included).

        `sanitize`: a special token's text inside the messages (or the prefill) is read as plain text, not as
        the token, so a message cannot forge the template's markers (a turn closed, a system turn opened), as
        `transformers`' `sanitize_control_tokens` reads it; off by default, as there. The messages' text is
        marked before rendering and the marked tokens encoded as text after; a conversation without such text
        gets the same ids either way (the tools' descriptions are read so too)."""
        if not sanitize:
            text = self.apply_chat_template(messages, True, enable_thinking, prefill, tools, **extra)
            return self.encode(text, add_special_tokens=False)
        tokens, pieces = self._control_patterns()
        marked, prefill, tools = (_mark_control_tokens(value, tokens) for value in (messages, prefill, tools))
        text = self.apply_chat_template(marked, True, enable_thinking, prefill, tools, **extra)
        ids: list[int] = []
        # text, marked token (None: a lone marker), text, ...: each marked token is encoded as plain text
        for index, piece in enumerate(pieces.split(text)):
            if piece:
                encoder = self._special_as_text() if index % 2 else self.backend
                ids += encoder.encode(piece, add_special_tokens=False).ids
        return ids

    def _control_patterns(self) -> tuple[re.Pattern, re.Pattern]:
        """(a pattern for the special tokens' texts, longest first so a token wins over those inside it; one that
        splits a rendered prompt at its marked tokens and lone markers), made once."""
        if self._control_patterns_made is None:
            tokens = sorted(self.special_strings, key=len, reverse=True)
            alternatives = "|".join(map(re.escape, tokens)) or "(?!)"
            pieces = f"{MARK_OPEN}({alternatives}){MARK_CLOSE}|[{MARK_OPEN}{MARK_CLOSE}]"
            self._control_patterns_made = (re.compile(alternatives), re.compile(pieces))
        return self._control_patterns_made

    def _special_as_text(self) -> RustTokenizer:
        """A copy of the tokenizer that reads special tokens' texts as plain text."""
        if self._as_text is None:
            self._as_text = RustTokenizer.from_str(self.backend.to_str())
            self._as_text.encode_special_tokens = True
        return self._as_text


MARK_OPEN, MARK_CLOSE = "\ue000", "\ue001"  # private-use characters around a special token's text in a message


def _mark_control_tokens(value: Any, tokens: re.Pattern) -> Any:
    """Every string in `value` (a text, or the values of messages' lists and objects) with each special token's
    text wrapped in MARK_OPEN ... MARK_CLOSE; markers already there are dropped first, so none can be forged."""
    if isinstance(value, str):
        value = value.replace(MARK_OPEN, "").replace(MARK_CLOSE, "")
        return tokens.sub(lambda found: f"{MARK_OPEN}{found.group(0)}{MARK_CLOSE}", value)
    if isinstance(value, dict):
        return {key: _mark_control_tokens(item, tokens) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_mark_control_tokens(item, tokens) for item in value]
    return value


REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")  # names a message's thinking comes under


def _with_reasoning_aliases(message: Any) -> Any:
    """A message's thinking under each name templates read it by (as `transformers` gives it them)."""
    if not isinstance(message, dict):
        return message
    reasoning = next((message[key] for key in REASONING_FIELDS if message.get(key) is not None), None)
    if reasoning is None:
        return message
    return {"thinking": reasoning, **message, "reasoning_content": reasoning}


def _with_call_arguments(message: Any) -> Any:
    """A message's tool calls with their arguments as objects, as templates iterate them (OpenAI's clients send
    them as JSON text), and its content "" where it has none (OpenAI's calling turns carry a null content or
    none at all, as the server reads them too)."""
    calls = message.get("tool_calls") if isinstance(message, dict) else None
    if not calls:
        return message
    read = []
    for index, call in enumerate(calls):
        function = call.get("function", call) if isinstance(call, dict) else None
        arguments = function.get("arguments") if isinstance(function, dict) else None
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments) if arguments.strip() else {}
            except json.JSONDecodeError as err:
                raise DiffGemmaError(f"tool_calls[{index}].function.arguments is not JSON ({err})") from None
        named = isinstance(function, dict) and isinstance(function.get("name"), str)
        if not named or not isinstance(arguments, dict | None):
            raise DiffGemmaError(f"tool_calls[{index}] must be {{'function': {{'name': ..., 'arguments': {{...}}}}}}")
        function = {**function, "arguments": arguments or {}}
        read.append({**call, "function": function} if "function" in call else function)
    return {**message, "content": message.get("content") or "", "tool_calls": read}


def _template_environment() -> jinja2.Environment:
    """The sandbox a chat template renders in, with what `transformers` gives templates beyond plain jinja2, so a
    checkpoint's template renders the same prompt here: loop controls (`{% break %}`), a `tojson` that takes
    json.dumps's options and leaves `<`, `>`, `&` and `'` as they are (jinja2's escapes them for HTML, which
    would change the prompt's tokens), `strftime_now(format)` and `raise_exception(message)`."""
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_template_error
    env.globals["strftime_now"] = lambda form: datetime.now().strftime(form)
    return env


def _tojson(
    value: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None, sort_keys: bool = False
) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise_template_error(message: str) -> None:
    raise jinja2.TemplateError(message)


def check_messages(messages: Any, prefill: Any = "") -> None:
    """A conversation's shape, checked before anything reads it: a non-empty list of objects, each with a string
    `role` and a `content` (an assistant's calling turn may have `tool_calls` alone, a list); and the answer's
    start (`prefill`), a text."""
    if not isinstance(prefill, str):
        raise DiffGemmaError(f"a prefill is the answer's start, a text; got {type(prefill).__name__}")
    if not isinstance(messages, list) or not messages:
        raise DiffGemmaError("messages must be a non-empty list of {'role': ..., 'content': ...} objects")
    for i, message in enumerate(messages):
        spoken = isinstance(message, dict) and ("content" in message or bool(message.get("tool_calls")))
        if not spoken or not isinstance(message.get("role"), str):
            raise DiffGemmaError(
                f"messages[{i}] must be an object with a string `role` and a `content` (or an assistant's `tool_calls`)"
            )
        if message.get("tool_calls") is not None and not isinstance(message["tool_calls"], list):
            raise DiffGemmaError(f"messages[{i}].tool_calls must be a list of calls")


def load_tokenizer(folder: Path) -> Tokenizer | None:
    """The folder's tokenizer, or None when it ships no tokenizer.json."""
    return Tokenizer(folder) if (folder / TOKENIZER_FILE).is_file() else None
