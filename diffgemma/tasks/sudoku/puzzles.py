"""Sudoku grids: reading and checking puzzles, the rules, an exact solver (constraint propagation and
backtracking), and unique-solution puzzles made from random grids, one at a time or as a seeded pool.

A puzzle file has one puzzle a line: 81 characters, '0' or '.' for an empty cell, optionally followed by a
tab and anything else (ignored).
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from pathlib import Path

from ...config import is_int, read_text
from ...errors import DiffGemmaError

CELLS = 81
PEERS: list[tuple[int, ...]] = []
for _cell in range(CELLS):
    _row, _col = divmod(_cell, 9)
    _box = (_row // 3) * 3 * 9 + (_col // 3) * 3
    _peers = {_row * 9 + c for c in range(9)} | {r * 9 + _col for r in range(9)}
    _peers |= {_box + r * 9 + c for r in range(3) for c in range(3)}
    _peers.discard(_cell)
    PEERS.append(tuple(sorted(_peers)))
ALL = 0x3FE  # bits 1..9
EMPTY_CELLS = "0._*"  # what puzzle collections write for an empty cell
GRID_LINES = str.maketrans("", "", " \n\r|+-")  # a grid drawn over lines, boxes ruled


def parse(line: str, where: str = "puzzle") -> list[int]:
    """81 cells from a puzzle: a line of digits with '0', '.', '_' or '*' for empty cells, or the same drawn as a
    grid (spaces, newlines and the rules |, -, + between boxes are skipped). A tab or comma and whatever follows
    is ignored (a solution beside its puzzle, as CSV collections hold them)."""
    text = re.split(r"[\t,]", line, maxsplit=1)[0].translate(GRID_LINES)
    if len(text) != CELLS or any(ch not in "123456789" + EMPTY_CELLS for ch in text):
        raise DiffGemmaError(f"{where}: expected 81 cells of 1-9 (0, '.', '_' or '*' empty), got {text[:90]!r}")
    grid = [0 if ch in EMPTY_CELLS else int(ch) for ch in text]
    check_puzzle(grid, where)
    return grid


def check_puzzle(grid: Sequence[int], where: str = "puzzle") -> None:
    """Givens that keep the rules, and no empty cell whose peers already hold all nine digits (such a puzzle
    has no solution, and with the givens' digits banned that cell would have nothing left to draw)."""
    listed = isinstance(grid, Sequence) and not isinstance(grid, str)
    if not (listed and len(grid) == CELLS and all(is_int(value) and 0 <= value <= 9 for value in grid)):
        shown = f"a {type(grid).__name__}" + (f" of {len(grid)}" if listed else "")
        raise DiffGemmaError(
            f"{where}: expected {CELLS} integers from 0 (empty) to 9 (`parse` reads text), got {shown}"
        )
    if not is_consistent(grid):
        raise DiffGemmaError(f"{where}: the givens break the rules (a digit repeats in a row, column or box)")
    for cell in range(CELLS):
        if grid[cell] == 0 and len({grid[peer] for peer in PEERS[cell]} - {0}) == 9:
            row, column = divmod(cell, 9)
            raise DiffGemmaError(
                f"{where}: no solution: row {row + 1}, column {column + 1} can hold no digit (its row, column and box "
                "hold all nine)"
            )


def read_puzzles(path: str | Path) -> list[list[int]]:
    file = Path(path)
    lines = [(n, line) for n, line in enumerate(read_text(file).splitlines(), 1) if line.strip()]
    header = lines and "," in lines[0][1] and not any(ch.isdigit() for ch in lines[0][1])
    lines = lines[1:] if header else lines  # a CSV header ("quizzes,solutions")
    if not lines:
        raise DiffGemmaError(f"{file}: no puzzles")
    return [parse(line, f"{file}:{n}") for n, line in lines]


def format_grid(grid: Sequence[int]) -> str:
    return "".join(str(v) for v in grid)


def is_consistent(grid: Sequence[int]) -> bool:
    return all(grid[c] == 0 or all(grid[p] != grid[c] for p in PEERS[c]) for c in range(CELLS))


def is_solution(grid: Sequence[int], puzzle: Sequence[int] | None = None) -> bool:
    if any(v < 1 or v > 9 for v in grid) or not is_consistent(grid):
        return False
    return puzzle is None or all(p == 0 or p == g for p, g in zip(puzzle, grid, strict=True))


def solve(puzzle: Sequence[int], limit: int = 2) -> list[list[int]]:
    """Up to `limit` solutions, by constraint propagation and backtracking on the most constrained cell."""
    grid = list(puzzle)
    candidates = [0] * CELLS
    for cell in range(CELLS):
        if grid[cell] == 0:
            used = 0
            for peer in PEERS[cell]:
                if grid[peer]:
                    used |= 1 << grid[peer]
            candidates[cell] = ALL & ~used
    solutions: list[list[int]] = []

    def search() -> None:
        best, best_count = -1, 10
        for cell in range(CELLS):
            if grid[cell] == 0:
                count = candidates[cell].bit_count()
                if count < best_count:
                    best, best_count = cell, count
                    if count <= 1:
                        break
        if best < 0:
            solutions.append(list(grid))
            return
        options = candidates[best]
        while options and len(solutions) < limit:
            bit = options & -options
            options ^= bit
            digit = bit.bit_length() - 1
            changed = []
            ok = True
            for peer in PEERS[best]:
                if grid[peer] == 0 and candidates[peer] & bit:
                    candidates[peer] &= ~bit
                    changed.append(peer)
                    if not candidates[peer]:
                        ok = False
            if ok:
                grid[best] = digit
                search()
                grid[best] = 0
            for peer in changed:
                candidates[peer] |= bit

    search()
    return solutions


def random_solution(rng: random.Random) -> list[int]:
    """A random valid grid, filled cell by cell with the digits in random order, backtracking on a dead end.

    Any valid grid can come out. (A base pattern under random digit, row, column, band and stack moves, the
    usual shortcut, reaches only the images of that one pattern: every band repeats three row segments, a
    structure a model learns and real puzzles lack.)"""
    grid = [0] * CELLS

    def fill(cell: int) -> bool:
        if cell == CELLS:
            return True
        held = {grid[peer] for peer in PEERS[cell]}
        digits = [digit for digit in range(1, 10) if digit not in held]
        rng.shuffle(digits)
        for digit in digits:
            grid[cell] = digit
            if fill(cell + 1):
                return True
        grid[cell] = 0
        return False

    fill(0)
    return grid


def make_puzzle(
    rng: random.Random, givens: int, unique: bool = True, attempts: int = 50
) -> tuple[list[int], list[int]]:
    """(puzzle, solution) with exactly `givens` filled cells; with `unique`, the solution is the only one.

    Each attempt empties the cells of a random grid in random order, keeping only removals that leave one
    solution. Such a pass stops at a puzzle it cannot thin further, mostly of 23-26 givens (of 150 passes:
    22 givens 5 times, none fewer), so lower targets rarely come out of it. When every attempt stops short,
    the smallest puzzle they reached is thinned further by `_thin` (exchanges of one given for fewer), down
    to MIN_THINNED_GIVENS. Only requests that used to fail get there, so every seed that made puzzles
    before makes the same ones.
    """
    if not 17 <= givens <= CELLS:
        raise DiffGemmaError(f"givens must be between 17 and 81, got {givens}")
    closest: tuple[list[int], list[int]] | None = None
    for _ in range(attempts):
        solution = random_solution(rng)
        puzzle = list(solution)
        filled = _empty_cells(puzzle, rng.sample(range(CELLS), CELLS), CELLS, givens, unique)
        if filled == givens:
            return puzzle, solution
        if closest is None or filled < _filled(closest[0]):
            closest = (puzzle, solution)
    if closest is not None and unique and givens >= MIN_THINNED_GIVENS:
        puzzle = _thin(rng, *closest, givens)
        if puzzle is not None:
            return puzzle, closest[1]
    raise DiffGemmaError(
        f"could not make a unique puzzle with {givens} givens in {attempts} attempts (puzzles from random "
        f"grids rarely have fewer than 22 givens; diffgemma makes them down to {MIN_THINNED_GIVENS}, slowly)"
    )


# `_thin`'s reach: on 2 cores 21 givens took 5-94 exchanges (3-5 s a puzzle), 20 givens 175-884 (5-65 s);
# below 20 an exchange costs seconds and few searches arrive, so those targets fail at once.
MIN_THINNED_GIVENS = 20
THIN_MOVES = 1000
FEW_GIVENS = 22  # below this most puzzles need `_thin`


def _filled(puzzle: Sequence[int]) -> int:
    return sum(1 for value in puzzle if value)


def _empty_cells(puzzle: list[int], order: Sequence[int], filled: int, givens: int, unique: bool) -> int:
    """Empty `puzzle`'s filled cells in `order` (in place) until `givens` are left, skipping any whose removal
    would admit a second solution (with `unique`); returns the givens left."""
    for cell in order:
        if filled == givens:
            break
        kept = puzzle[cell]
        if not kept:
            continue
        puzzle[cell] = 0
        if unique and len(solve(puzzle, 2)) != 1:
            puzzle[cell] = kept
            continue
        filled -= 1
    return filled


def _thin(rng: random.Random, puzzle: list[int], solution: list[int], givens: int) -> list[int] | None:
    """A unique puzzle of `givens` givens from a unique `puzzle` no single removal can thin (a local search):
    put one empty cell's digit back, then empty givens in random order while the solution stays the only one.
    A move that ends with no more givens than before is kept. None if THIN_MOVES moves do not get there."""
    puzzle = list(puzzle)
    filled = _filled(puzzle)
    for _ in range(THIN_MOVES):
        trial = list(puzzle)
        restored = rng.choice([cell for cell in range(CELLS) if not trial[cell]])
        trial[restored] = solution[restored]
        order = [cell for cell in rng.sample(range(CELLS), CELLS) if cell != restored]
        count = _empty_cells(trial, order, filled + 1, givens, unique=True)
        if count == givens:
            return trial
        if count <= filled:
            puzzle, filled = trial, count
    return None


def check_givens_range(givens: tuple[int, int]) -> None:
    """A clear error unless (low, high) is a range of givens a puzzle can have, before any puzzle is made."""
    low, high = givens
    if not 17 <= low <= high <= CELLS:
        raise DiffGemmaError(f"givens must be a range within 17-81 (low first), got {low}:{high}")


def _pool_member(seed: int, index: int, givens: tuple[int, int]) -> tuple[list[int], list[int]]:
    # A string seed (hashed) cannot coincide with the integer seeds that make evaluation sets.
    rng = random.Random(f"sudoku-pool/{seed}/{index}")
    return make_puzzle(rng, rng.randint(*givens))


def puzzle_pool(
    seed: int, count: int, givens: tuple[int, int], workers: int = 1, cache: str | Path | None = None
) -> list[tuple[list[int], list[int]]]:
    """`count` unique-solution (puzzle, solution) pairs, givens uniform in the range. Puzzle i depends on
    (seed, i) alone, so the pool is the same whatever `workers` (processes) make it. `cache`: a file of
    `puzzle<TAB>solution` lines, read when it holds this pool's first `count` puzzles, written otherwise."""
    if cache is not None and Path(cache).is_file():
        lines = read_text(cache).splitlines()
        header, body = (lines[0], lines[1:]) if lines else ("", [])
        if header == _pool_header(seed, givens) and len(body) >= count:
            return [_cached_pair(line, f"{cache}:{number}") for number, line in enumerate(body[:count], 2)]
    arguments = [(seed, index, givens) for index in range(count)]
    if workers > 1:
        import multiprocessing

        with multiprocessing.get_context("spawn").Pool(workers) as processes:
            pool = processes.starmap(_pool_member, arguments, chunksize=64)
    else:
        pool = [_pool_member(*a) for a in arguments]
    if cache is not None:
        text = "\n".join(f"{format_grid(p)}\t{format_grid(s)}" for p, s in pool)
        Path(cache).write_text(f"{_pool_header(seed, givens)}\n{text}\n")
    return pool


def _cached_pair(line: str, where: str) -> tuple[list[int], list[int]]:
    fields = line.split("\t")
    if len(fields) != 2 or len(fields[0]) != CELLS or len(fields[1]) != CELLS or not line.replace("\t", "").isdigit():
        raise DiffGemmaError(f"{where}: expected puzzle<TAB>solution (81 digits each)")
    return [int(ch) for ch in fields[0]], [int(ch) for ch in fields[1]]


def _pool_header(seed: int, givens: tuple[int, int]) -> str:
    return f"# diffgemma sudoku pool v3 seed={seed} givens={givens[0]}-{givens[1]}"
