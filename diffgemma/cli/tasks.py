"""The tasks' commands: `sudoku` (solve one, live), `sudoku-puzzles`, `eval sudoku`."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import DiffGemmaError
from .common import load_model, range_option, sampler_options

SUDOKU_MODEL = Path(__file__).resolve().parent.parent / "models" / "sudoku"  # package data: a wheel carries it


def _sudoku_model(args: argparse.Namespace):
    path = args.model or (SUDOKU_MODEL if (SUDOKU_MODEL / "config.json").is_file() else None)
    if path is None:
        raise DiffGemmaError(
            f"no sudoku model given, and the shipped one ({SUDOKU_MODEL}) is missing: pass --model DIR "
            "(train one with `diffgemma train sudoku --out DIR`)"
        )
    from ..tasks import sudoku

    model = load_model(args, path)
    sudoku.check_model(model, str(path))
    return model


def cmd_sudoku(args: argparse.Namespace) -> None:
    import random

    from rich.console import Console
    from rich.live import Live
    from rich.text import Text

    from ..generate import Done, Draft
    from ..tasks import sudoku

    seed = args.seed if args.seed is not None else random.randrange(2**31)
    if args.puzzle:
        puzzle = sudoku.parse(args.puzzle, "--puzzle")
        if not sudoku.solve(puzzle, 1):  # (a check, as a player's; the model does the solving)
            raise DiffGemmaError("--puzzle: has no solution: no way to fill it keeps the rules")
    else:
        puzzle, _ = sudoku.make_puzzle(random.Random(seed), args.givens)
    model = _sudoku_model(args)
    tries = _tries(args)
    console = Console()
    grid = puzzle
    steps = spent = 0
    inputs = sudoku.model_solver_inputs(model, [puzzle], candidates=args.candidates)
    with Live(console=console, refresh_per_second=20) as live:
        # A grid that breaks a rule (checked as any player could) is solved again with a fresh seed, as
        # `eval sudoku --tries` does.
        for attempt in range(tries):
            label = f"try {attempt + 1}, " if tries > 1 else ""
            attempt_seed = sudoku.try_seed(seed, attempt)
            events = model.stream(seed=attempt_seed, **inputs, **sampler_options(args))
            for event in events:
                if isinstance(event, Draft):
                    grid, steps = sudoku.grid_from_ids(event.ids[0].tolist()), event.step
                    live.update(_sudoku_board(puzzle, grid, f"{label}step {steps}", Text), refresh=True)
                elif isinstance(event, Done):
                    grid = sudoku.grid_from_ids(event.result.sequences[0, event.result.prompt_length :].tolist())
            spent += steps
            if sudoku.is_solution(grid, puzzle):
                break
        verdict = "solved" if sudoku.is_solution(grid, puzzle) else "not solved"
        total = f", {spent} in all" if spent > steps else ""
        live.update(_sudoku_board(puzzle, grid, f"{verdict} ({label}{steps} steps{total})", Text), refresh=True)
    print(sudoku.format_grid(grid))


def _tries(args: argparse.Namespace) -> int:
    from ..tasks import sudoku

    tries = sudoku.SOLVE_TRIES if args.tries is None else args.tries
    if tries < 1:
        raise DiffGemmaError(f"--tries must be at least 1, got {tries}")
    return tries


def _sudoku_board(puzzle, grid, title: str, text_type):
    board = text_type(f"{title}\n")
    for row in range(9):
        if row and row % 3 == 0:
            board.append("------+-------+------\n")
        for col in range(9):
            if col and col % 3 == 0:
                board.append("| ")
            cell = row * 9 + col
            digit = str(grid[cell]) if grid[cell] else "."
            board.append(digit + " ", style="bold" if puzzle[cell] else "cyan")
        board.append("\n")
    return board


def givens_range(text: str) -> tuple[int, int]:
    """`--givens` as (low, high): a number, or a range A:B."""
    return range_option(text, int, "--givens must look like 24:36")


def cmd_sudoku_puzzles(args: argparse.Namespace) -> None:
    import random

    from ..tasks import sudoku

    low_givens, high_givens = givens_range(args.givens)
    sudoku.check_givens_range((low_givens, high_givens))
    rng = random.Random(args.seed)
    for _ in range(args.count):
        puzzle, _ = sudoku.make_puzzle(rng, rng.randint(low_givens, high_givens))
        print(sudoku.format_grid(puzzle))


def cmd_eval_sudoku(args: argparse.Namespace) -> None:
    import json

    from ..tasks import sudoku

    model = _sudoku_model(args)
    puzzles = sudoku.read_puzzles(args.puzzles)
    metrics = sudoku.evaluate(
        model, puzzles, seed=args.seed or 0, tries=_tries(args), candidates=args.candidates, **sampler_options(args)
    )
    if args.json:
        print(json.dumps(metrics))
        return
    print(
        f"puzzles {metrics['n']}: solved {metrics['solved_rate']:.1%} "
        f"(first try {metrics['first_try_solved_rate']:.1%}, mean tries {metrics['mean_tries']:.2f}), "
        f"cells {metrics['cell_accuracy']:.1%}, "
        f"givens kept {metrics['givens_kept_rate']:.1%}, mean steps {metrics['mean_steps']:.1f}"
    )
    for givens, block in metrics["per_givens"].items():
        print(
            f"  {givens} givens: {block['n']} puzzles, solved {block['solved_rate']:.1%}, "
            f"cells {block['cell_accuracy']:.1%}, steps {block['mean_steps']:.1f}"
        )
