"""A row's generated ids read as a reply: its text before the first stop string (`StopStrings`), and for a chat
its thinking and its tool calls apart from the answer, as whole text or as deltas never taken back while the
canvas settles (`SettledText`, what the command line and the server stream)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from .errors import DiffGemmaError
from .tokenizer import THINKING_OPEN, Tokenizer, split_thinking
from .toolcalls import TOOL_CALL_OPEN, ToolCall, take_tool_calls


class StopStrings:
    """Strings that end a row where they first appear (OpenAI's `stop`): its text comes back without them, its
    tokens through the one that completed the first. `view` turns a row's ids into the text they are looked
    for in (a chat's answer, say, so that thinking never ends a reply)."""

    def __init__(self, stops: str | Sequence[str], view: Callable[[list[int]], str]) -> None:
        stops = [stops] if isinstance(stops, str) else list(stops) if isinstance(stops, Sequence) else [stops]
        if not stops or not all(isinstance(stop, str) and stop for stop in stops):
            raise DiffGemmaError(f"stop strings must be one or more non-empty strings, got {stops!r}")
        self.stops = tuple(dict.fromkeys(stops))
        self.view = view

    def first(self, text: str, start: int = 0) -> int | None:
        """Where the earliest stop string in `text[start:]` begins (None: there is none)."""
        found = [index for stop in self.stops if (index := text.find(stop, start)) >= 0]
        return min(found) if found else None

    def found(self, text: str) -> str | None:
        """The stop string that comes first in `text` (None: there is none)."""
        index = self.first(text)
        return None if index is None else next(stop for stop in self.stops if text.startswith(stop, index))

    def cut(self, text: str) -> str:
        """`text` before its first stop string."""
        index = self.first(text)
        return text if index is None else text[:index]

    def answer(self, text: str) -> str:
        """An answer (read with its trailing space) before its first stop string; without one, as answers are
        given: without trailing space."""
        index = self.first(text)
        return text.rstrip() if index is None else text[:index]

    def pending(self, text: str) -> int:
        """Characters at the end of `text` that may be the start of a stop string (a stream holds them back)."""
        for size in range(min(len(text), max(map(len, self.stops)) - 1), 0, -1):
            if any(stop.startswith(text[-size:]) for stop in self.stops):
                return size
        return 0

    def ends(self, tokens: list[int]) -> bool:
        return self.first(self.view(tokens)) is not None

    def tokens_through(self, tokens: list[int]) -> int | None:
        """How many of `tokens` it takes for a stop string to appear in their text (None: none appears)."""
        if not self.ends(tokens):
            return None
        low, high = 1, len(tokens)  # text grows with its tokens: the fewest that show one, by bisection
        while low < high:
            middle = (low + high) // 2
            if self.ends(tokens[:middle]):
                high = middle
            else:
                low = middle + 1
        return high

    def text_before(self, decode: Callable[[list[int]], str], tokens: list[int]) -> str:
        """`decode(tokens)` (tokens cut by `tokens_through`) before the stop string its last token completed."""
        text, before = decode(tokens), decode(tokens[:-1])
        start = max(0, len(before) - max(map(len, self.stops)) + 1)
        index = self.first(text, start)
        return text[:index] if index is not None else self.cut(text)


class SettledText:
    """A row's generated ids as (content, reasoning) text, and as deltas never taken back (for streams that
    send text as it settles). `chat`: the thinking channel comes apart from the answer; else plain text, its
    leading space kept (a continuation joins its prompt). The content ends before the first of `stops`.
    `tools` (chat): the answer's tool calls come apart too (`tool_calls`); `lead`: ids the reply was made to
    begin with, in the prompt's end (a call's opening, `toolcalls.tool_plan`), read as the reply's start."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        eos_ids: Sequence[int],
        pad_id: int | None,
        chat: bool,
        stops: Sequence[str] = (),
        tools: bool = False,
        lead: Sequence[int] = (),
    ) -> None:
        self.tokenizer = tokenizer
        self.eos = set(eos_ids)
        self.pad = pad_id
        self.chat = chat
        self.tools = tools
        self.lead = list(lead)
        self.sent = ["", ""]  # content, reasoning
        self.stops = StopStrings(stops, lambda tokens: self._parts(tokens, True, True)[0]) if stops else None
        # markers whose first tokens, while the rest may still come, must not show as text
        self.markers = (THINKING_OPEN, TOOL_CALL_OPEN) if tools else (THINKING_OPEN,)

    def through_stop(self, tokens: list[int]) -> list[int] | None:
        """`tokens` through the one that completed a stop string in the answer (None: no stop string yet)."""
        if self.stops is None:
            return None
        tokens = self.kept(tokens)
        through = self.stops.tokens_through(tokens)
        return None if through is None else tokens[:through]

    def kept(self, tokens: list[int]) -> list[int]:
        """The ids its text is made of: those before the first EOS, padding left out."""
        for index, token in enumerate(tokens):
            if token in self.eos:
                return tokens[:index]
        return [t for t in tokens if t != self.pad]

    def parts(self, tokens: list[int], final: bool = True) -> tuple[str, str]:
        if self.stops is None:
            return self._parts(tokens, final)
        content, reasoning = self._parts(tokens, final, trailing_space=True)
        # a chat's answer is given without trailing space; a text's continuation keeps what it wrote
        return self.stops.answer(content) if self.chat else self.stops.cut(content), reasoning

    def stop_found(self, tokens: list[int]) -> str | None:
        """The stop string that ended a finished reply (None: it ended otherwise)."""
        return self.stops.found(self._parts(tokens, True, True)[0]) if self.stops is not None else None

    def tool_calls(self, tokens: list[int]) -> tuple[ToolCall, ...]:
        """The tool calls in a finished reply (none unless it was offered `tools`)."""
        return take_tool_calls(self._raw(tokens, True))[1] if self.tools else ()

    def _raw(self, tokens: list[int], final: bool) -> str:
        """The reply's text with its special tokens; while not `final`, without the start of a marker that the
        coming tokens may complete."""
        raw = self.tokenizer.decode(self.lead + self.kept(tokens), skip_special_tokens=False)
        if not final:
            for marker in self.markers:
                for size in range(len(marker) - 1, 0, -1):
                    if raw.endswith(marker[:size]):
                        return raw[:-size]
        return raw

    def _parts(self, tokens: list[int], final: bool, trailing_space: bool = False) -> tuple[str, str]:
        if not self.chat:
            return self.tokenizer.decode(self.kept(tokens)), ""
        raw = self._raw(tokens, final)
        if self.tools:
            raw = take_tool_calls(raw, final)[0]
        reply = split_thinking(raw, self.tokenizer.special_strings, trailing_space)
        return reply.content, reply.reasoning

    def deltas(self, tokens: list[int], final: bool = False) -> tuple[str, str]:
        """New text since the last call. Until the end, trailing whitespace and a half-decoded character
        are held back, since more tokens may still join them."""
        out = []
        for index, text in enumerate(self.parts(tokens, final)):
            if not final:
                text = text.rstrip().rstrip("\ufffd")
                if index == 0 and self.stops is not None:  # what may begin a stop string waits too
                    text = text[: len(text) - self.stops.pending(text)].rstrip()
            sent = self.sent[index]
            if text.startswith(sent) and len(text) > len(sent):
                out.append(text[len(sent) :])
                self.sent[index] = text
            else:
                out.append("")
        return out[0], out[1]
