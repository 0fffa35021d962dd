"""The `diffgemma` command: argument parsing and printing only; the work is the public API's. The commands live
in rooms of their own (text, checkpoints, tasks, train), their options in `parser`."""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Sequence

from ..errors import DiffGemmaError
from ..resources import first_line, out_of_memory
from .common import set_threads
from .parser import build_parser
from .tasks import SUDOKU_MODEL

__all__ = ["SUDOKU_MODEL", "build_parser", "main"]


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """A warning as one line for a person at a terminal, not a source location."""
    print(f"diffgemma: warning: {message}", file=file or sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning
            set_threads(args)
            if getattr(args, "device", None) == "auto":
                from ..api import resolve_device

                args.device = str(resolve_device("auto"))
            args.run(args)
    except DiffGemmaError as err:
        print(f"diffgemma: {err}", file=sys.stderr)
        return 2
    except (MemoryError, RuntimeError) as err:
        if not out_of_memory(err):
            raise
        print(
            f"diffgemma: out of memory ({first_line(err)}). `diffgemma info --model PATH --context N --batch B` "
            "gives what a load and a denoising step take; fewer rows (--batch-size), fewer tokens (training: "
            "--max-length) or --quant int4 take less",
            file=sys.stderr,
        )
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # the reader went away (`| head`): stop quietly, as other command-line tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # (Python's own flush at exit would fail)
        return 141
    return 0
