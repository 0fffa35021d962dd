"""A prediction of the output (`generate(..., prediction=)`, OpenAI's predicted outputs): how many denoising steps
a canvas takes when it starts from an answer that is mostly right, and whether what is wrong in it gets mended.

The shipped sudoku model (the one trained model here whose answers can be checked) on fresh puzzles, one try of
at most its 16 steps, as `diffgemma sudoku` solves them (givens clamped, candidates), each puzzle with the same
seed in every row: from noise (no prediction), then from each puzzle's solution with a share of its empty cells
given a wrong digit, and from a solution with a share of its empty cells left to the noise (a partial answer).
Then the puzzles the first try (from noise) got wrong, tried again with a fresh seed: from noise (the solver's
way), from the wrong grid, and from it with the cells in conflict left to the noise: is the model's own wrong
answer a prediction worth starting from?

    python bench/prediction.py [--puzzles 500] [--results FILE]
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import append_results

import diffgemma
from diffgemma.cli import SUDOKU_MODEL
from diffgemma.tasks.sudoku.puzzles import PEERS, is_solution, make_puzzle
from diffgemma.tasks.sudoku.solver import model_solver_inputs, try_seed
from diffgemma.tasks.sudoku.tokens import cell_ids, cell_token, grid_from_ids


def predicted(pairs: list, share: float, wrong: bool, rng: random.Random) -> list[list[int]]:
    """Each puzzle's solution as canvas ids with `share` of its empty cells changed: a wrong digit (`wrong`), or
    -1 (no prediction there: the cell starts as noise)."""
    rows = []
    for puzzle, solution in pairs:
        row = cell_ids(solution)
        for cell, given in enumerate(puzzle):
            if not given and rng.random() < share:
                digit = rng.choice([d for d in range(1, 10) if d != solution[cell]])
                row[cell] = cell_token(cell, digit) if wrong else -1
        rows.append(row)
    return rows


def without_conflicts(puzzle: list[int], grid: list[int]) -> list[int]:
    """A grid's canvas ids, its empty cells whose digit a peer holds too left to the noise (-1)."""
    return [
        -1 if not puzzle[cell] and any(grid[peer] == grid[cell] for peer in PEERS[cell]) else token
        for cell, token in enumerate(cell_ids(grid))
    ]


def one_try(model, puzzles: list, seeds: list[int], prediction) -> tuple[list[list[int]], int, list[int]]:
    """One try of each puzzle (one batch): the grids, how many came out solved, each one's steps."""
    result = model.generate(seed=seeds, prediction=prediction, **model_solver_inputs(model, puzzles))
    grids = [grid_from_ids(row) for row in result.sequences[:, result.prompt_length :].tolist()]
    solved = sum(is_solution(grid, puzzle) for grid, puzzle in zip(grids, puzzles, strict=True))
    return grids, solved, result.steps[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--puzzles", type=int, default=500)
    parser.add_argument("--seed", type=int, default=11, help="puzzle generator seed")
    parser.add_argument("--results", default=None, help="append the section here instead of bench/RESULTS.md")
    args = parser.parse_args()
    model = diffgemma.load(SUDOKU_MODEL)
    rng = random.Random(args.seed)
    pairs = [make_puzzle(rng, rng.randint(24, 36)) for _ in range(args.puzzles)]
    puzzles = [puzzle for puzzle, _ in pairs]
    seeds = list(range(len(puzzles)))
    runs = [("none (from noise)", None)]
    runs += [(f"solution, {share:.0%} of empty cells wrong", (share, True)) for share in (0.0, 0.1, 0.25, 0.5)]
    runs += [(f"solution, {share:.0%} of empty cells left to noise", (share, False)) for share in (0.5, 0.8)]
    lines, first_grids = [], None
    for label, change in runs:
        prediction = None if change is None else predicted(pairs, *change, random.Random(args.seed + 1))
        started = time.perf_counter()
        grids, solved, steps = one_try(model, puzzles, seeds, prediction)
        seconds = time.perf_counter() - started
        first_grids = first_grids or grids
        mended = ""
        if change is not None and change[1] and change[0] > 0:
            wrong = [
                (grid[cell], solution[cell])
                for grid, row, (puzzle, solution) in zip(grids, prediction, pairs, strict=True)
                for cell in range(81)
                if not puzzle[cell] and row[cell] != cell_token(cell, solution[cell])
            ]
            mended = f"{sum(got == right for got, right in wrong) / len(wrong):.1%} of {len(wrong)}"
        cells = (label, f"{solved / len(puzzles):.1%}", f"{sum(steps) / len(steps):.1f}", max(steps), mended)
        lines.append("| " + " | ".join(str(cell) for cell in cells) + f" | {seconds:.1f} |")
    wrong = [index for index, puzzle in enumerate(puzzles) if not is_solution(first_grids[index], puzzle)]
    again = [puzzles[index] for index in wrong]
    retries = []
    for attempt in (1, 2, 3):
        seeds_again = [try_seed(index, attempt) for index in wrong]
        starts = {
            "noise (the solver's retry)": None,
            "the wrong grid": [cell_ids(first_grids[index]) for index in wrong],
            "the wrong grid, cells in conflict left to noise": [
                without_conflicts(puzzles[index], first_grids[index]) for index in wrong
            ],
        }
        for label, prediction in starts.items():
            _, solved, steps = one_try(model, again, seeds_again, prediction)
            share = f"{solved} of {len(again)} ({solved / len(again):.1%})"
            retries.append(f"| {attempt} | {label} | {share} | {sum(steps) / len(steps):.1f} |")
    table = "\n".join(
        [
            "| prediction | solved | mean steps | most steps | wrong cells mended | seconds |",
            "|---|---|---|---|---|---|",
            *lines,
            "",
            "The puzzles the first try from noise got wrong, a second try (fresh seed; three seeds) starting from:",
            "",
            "| second try's seed | start | solved | mean steps |",
            "|---|---|---|---|",
            *retries,
        ]
    )
    append_results(
        "A prediction of the output: the sudoku model started from mostly right grids (bench/prediction.py)",
        table,
        f"The shipped sudoku model ({SUDOKU_MODEL.name}), {len(puzzles)} fresh puzzles (24-36 givens, generator seed "
        f"{args.seed}), one try of at most {model.settings.max_denoising_steps} steps, givens clamped, candidates; "
        "the same seed per puzzle in every row; one batch of all the puzzles per row.",
        args.results,
    )


if __name__ == "__main__":
    main()
