"""The terminal's progress note: after the text on the text's line, cut to the room left there (never wrapping),
erased before more text and when closed, so the screen ends with the text alone."""

import re
import time
from types import SimpleNamespace

import pytest
from screen_util import sized_terminal

from diffgemma.cli.progress import DIM, ProgressNote


@pytest.fixture
def terminal(monkeypatch):
    return sized_terminal(monkeypatch, 40)


def draft(canvas: int, step: int) -> SimpleNamespace:
    return SimpleNamespace(canvas_index=canvas, step=step)


def test_the_note_follows_the_text_and_is_gone_at_the_end(terminal):
    note = ProgressNote(16, out=terminal, err=terminal, tick=0)
    assert terminal.screen() == ["⠋ reading the prompt (0 s)"]
    note.step(draft(0, 3))
    assert terminal.screen() == ["⠋ canvas 1, step 3/16, 0 s"]  # (the longest note is over the room, 38)
    note.write("The sky")
    assert terminal.screen() == ["The sky ⠋ canvas 1, step 3/16, 0 s"]
    note.step(draft(1, 1))
    note.write(" is blue because air scatters")  # (36 cells: room for the spinner's shortest note alone)
    assert terminal.screen() == ["The sky is blue because air scatters ⠋"]
    note.write(" blue light")  # (past the width: the text wraps, the note follows it on the next line)
    assert terminal.screen() == ["The sky is blue because air scatters blu", "e light ⠋ canvas 2, step 1/16, 0 s"]
    note.write(" more.\n")
    assert terminal.screen()[-1].startswith("⠋ ")
    note.close()
    assert terminal.screen() == ["The sky is blue because air scatters blu", "e light more.", ""]
    note.write("after\n")  # (closed: plain text, no note)
    assert DIM not in terminal.getvalue().split("more.\n")[1].split("after")[1]
    assert terminal.screen()[-2:] == ["after", ""]


def test_no_note_where_the_column_is_not_known_or_the_line_is_full(terminal):
    note = ProgressNote(16, out=terminal, err=terminal, tick=0)
    note.write("a\tb")  # (a tab: where it ends is the terminal's to say)
    drawn = terminal.getvalue().count(DIM)
    note.step(draft(0, 1))
    assert terminal.getvalue().count(DIM) == drawn and terminal.screen() == ["a\tb"]
    note.write("\n" + "x" * 40)  # (the line exactly full: the next character wraps)
    note.step(draft(0, 2))
    assert terminal.screen() == ["a\tb", "x" * 40]
    note.close()


def test_the_spinner_turns_between_steps(terminal):
    note = ProgressNote(16, out=terminal, err=terminal, tick=0.01)
    note.step(draft(0, 1))
    deadline = time.monotonic() + 10  # (a loaded machine schedules the ticker late, not never)
    while len(set(re.findall(r"\x1b\[2m(.)", terminal.getvalue()))) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    note.close()
    assert len(set(re.findall(r"\x1b\[2m(.)", terminal.getvalue()))) >= 3 and terminal.screen() == [""]


def test_a_terminal_without_braille_gets_an_ascii_spinner(terminal):
    terminal.encoding = "ascii"
    note = ProgressNote(16, out=terminal, err=terminal, tick=0)
    note.step(draft(0, 2))
    note.write("x")
    assert terminal.screen() == ["x | canvas 1, step 2/16, 0 s"]
    note.close()


def test_off_a_terminal_text_is_only_written(terminal):
    note = ProgressNote(16, active=False, out=terminal, err=terminal)
    note.step(draft(0, 1))
    note.write("plain")
    note.close()
    assert terminal.getvalue() == "plain"
