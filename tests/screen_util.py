"""A terminal's screen from what was written to it, for the progress note's tests."""

import io
import re
import shutil
from types import SimpleNamespace

ESCAPE = re.compile(r"\x1b\[(\d*)([A-Za-z])")


class Terminal(io.StringIO):
    """What a terminal `width` cells wide shows of what was written to it (stdout and stderr alike): the escapes
    the note uses (style, erase to the line's end, cursor left), lines wrapping at the width."""

    encoding = "utf-8"  # (what it can show; a test may make it "ascii")

    def __init__(self, width: int) -> None:
        super().__init__()
        self.width = width

    def screen(self) -> list[str]:
        lines, column, text, at = [[]], 0, self.getvalue(), 0  # (nothing moves the cursor up: it is on the last)
        while at < len(text):
            escape = ESCAPE.match(text, at)
            if escape:
                if escape[2] == "K":
                    del lines[-1][column:]
                elif escape[2] == "D":
                    column = max(0, column - int(escape[1] or 1))
                at = escape.end()
                continue
            char, at = text[at], at + 1
            if char == "\r":
                column = 0
            elif char == "\n" or column == self.width:  # (a new line, or a wrap)
                lines.append([])
                column = 0
            if char not in "\r\n":
                lines[-1][column : column + 1] = [char]
                column += 1
        return ["".join(line) for line in lines]


def sized_terminal(monkeypatch, width: int) -> Terminal:
    """A `Terminal` `width` cells wide, which `shutil.get_terminal_size` reports for the test."""
    terminal = Terminal(width)
    monkeypatch.setattr(shutil, "get_terminal_size", lambda: SimpleNamespace(columns=width, lines=24))
    return terminal
