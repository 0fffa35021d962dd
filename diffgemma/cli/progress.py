"""The terminal's progress note: a dim note after the text shown so far (alone on its line before any) that says
which canvas and step the denoising is on and the seconds so far, its spinner turning between steps (a step of a
large model on a CPU takes many seconds, and a canvas's text may settle only after several). The text is stdout's
and the note stderr's, on one line of one terminal: the note is cut to the room the line has left (it never
wraps), erased before more text is written and when it closes, so what remains is the text alone."""

from __future__ import annotations

import shutil
import sys
import threading
import time
from typing import TextIO

from rich.cells import cell_len
from rich.console import Console

# (each character one cell wide wherever it shows: none of East Asian "ambiguous" width, which CJK terminals draw
# two cells wide; where the terminal's encoding has no braille, the ASCII spinner)
SPINNER, ASCII_SPINNER = "⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏", "|/-\\"
DIM, PLAIN, ERASE = "\x1b[2m", "\x1b[0m", "\x1b[K"  # (ERASE: from the cursor to the line's end)
TICK = 0.25  # seconds between redraws: the spinner turns and the seconds count while a step runs


class ProgressNote:
    """The note (`active`: on a terminal; otherwise text is just written). `write` every piece of text shown
    while it is open; `step` each draft (`DiffGemma.generate`'s `progress`); `close` (or leave its `with`)."""

    def __init__(
        self, steps: int, active: bool = True, out: TextIO | None = None, err: TextIO | None = None, tick: float = TICK
    ) -> None:
        self.steps, self.active = steps, active
        self.out, self.err = out or sys.stdout, err or sys.stderr
        self.began = time.perf_counter()
        self.step_of: tuple[int, int] | None = None  # the canvas (from 1) and step the denoising is on
        self.column: int | None = 0  # cells of text on the cursor's line (None after a tab: not known)
        self.drawn = 0  # cells of the note after the cursor
        self.turns = 0
        self.spinner = SPINNER if _encodes(self.err, SPINNER) else ASCII_SPINNER
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._ticker = None
        if active:
            self._draw()
            if tick > 0:
                self._ticker = threading.Thread(target=self._tick, args=(tick,), daemon=True)
                self._ticker.start()

    def step(self, draft) -> None:
        """The denoising reached `draft` (a `generate.Draft`)."""
        with self._lock:
            self.step_of = (draft.canvas_index + 1, draft.step)
            self._draw()

    def write(self, text: str) -> None:
        """`text` on stdout, the note moved after it."""
        if not text:
            return
        with self._lock:
            self._erase()
            self.out.write(text)
            self.out.flush()
            self._advance(text)
            self._draw()

    def close(self) -> None:
        """The note erased and stopped; `write` writes plain text from now on."""
        self._closed.set()
        if self._ticker is not None:
            self._ticker.join()
        with self._lock:
            self._erase()

    def __enter__(self) -> ProgressNote:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _tick(self, seconds: float) -> None:
        while not self._closed.wait(seconds):
            with self._lock:
                self.turns += 1
                self._draw()

    def _advance(self, text: str) -> None:
        line = text.replace("\r", "\n").rsplit("\n", 1)
        if len(line) == 2:
            self.column = 0
        if self.column is not None:
            self.column = None if "\t" in line[-1] else self.column + cell_len(line[-1])

    def _draw(self) -> None:
        if not self.active or self._closed.is_set():
            return
        self._erase()
        width = shutil.get_terminal_size().columns
        if self.column is None or (self.column and self.column % width == 0):  # (or at a wrap about to happen)
            return
        at = self.column % width
        room = width - at - 2  # (a cell spare: a character the count may have judged narrower than it shows)
        note = next((note for note in self._notes(" " if at else "") if len(note) <= room), None)
        if note is None:
            return
        self.err.write(f"{DIM}{note}{PLAIN}\x1b[{len(note)}D")
        self.err.flush()
        self.drawn = len(note)

    def _notes(self, lead: str) -> list[str]:
        """What the note may say, the most first: the line's room picks the longest that fits."""
        spinner = f"{lead}{self.spinner[self.turns % len(self.spinner)]}"
        seconds = f"{time.perf_counter() - self.began:.0f} s"
        if self.step_of is None:
            return [f"{spinner} reading the prompt ({seconds})", f"{spinner} {seconds}", spinner]
        canvas, step = self.step_of
        return [
            f"{spinner} denoising: canvas {canvas}, step {step} of {self.steps} ({seconds})",
            f"{spinner} canvas {canvas}, step {step}/{self.steps}, {seconds}",
            f"{spinner} {step}/{self.steps}",
            spinner,
        ]

    def _erase(self) -> None:
        if self.drawn:
            self.err.write(ERASE)
            self.err.flush()
            self.drawn = 0


def _encodes(stream: TextIO, text: str) -> bool:
    """Whether `stream`'s encoding can write `text`."""
    try:
        text.encode(getattr(stream, "encoding", None) or "utf-8")
    except (UnicodeEncodeError, LookupError):
        return False
    return True


def terminal_note(steps: int) -> ProgressNote:
    """A note for a denoising of `steps` steps a canvas: active where stdout and stderr are one terminal that
    takes its escapes (not a dumb one, not the legacy Windows console)."""
    console = Console(stderr=True)
    on_terminal = sys.stdout.isatty() and sys.stderr.isatty()
    return ProgressNote(steps, on_terminal and not console.is_dumb_terminal and not console.legacy_windows)
