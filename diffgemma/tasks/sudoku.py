"""Sudoku: puzzles with unique solutions, the token format, and solving by diffusion with the givens clamped.

Format: every token names a cell and its content (`r3c7=5`, `r3c7=.` when empty). The diffusion model's
prompt is BOS alone and its canvas is the 81 cells, row by row: at solve time the givens are clamped on the
canvas (fixed in every step and in the output) and each empty cell diffuses over its own nine tokens
(`token_ranges`), so a sample, a draft and the re-noising never leave the cell. By default an empty cell also
never samples a digit that a given in its row, column or box holds (`given_bans`: its candidates from the
givens alone, the pencil marks a person starts with; the rules rule those digits out for certain, and the
re-noising still draws any of the nine, as in training). Training corrupts the same way: an empty cell's
token becomes a uniformly random one of its nine (givens stay clean), the t ~ U(eps, 1) schedule of the
objective.

A canvas of noise does not show which of its digits are the puzzle's: at the first step the givens look like
the noise around them. A model trained with the candidate prior (`candidate_prior`; `config.json` says so,
`uses_candidate_prior`) reads the pencil marks instead of no signal as its first self-conditioning input:
each given certain, each empty cell uniform over its candidates; every later distribution keeps to them.
The same holds for a digit the sampler accepted: re-noised to random digits, every cell it did not accept
looks as sure as the ones it did. A model trained with masked cells (`masked_cells`, `uses_masked_cells`)
sees a corrupted cell as its empty token (`r3c7=.`) instead: every digit on its canvas is then a given or a
digit it accepted, and solving starts each free cell empty and re-noises it to empty (generation's
`noise_ranges`): masked diffusion, within the uniform-state sampler's machinery.

Why cell-named tokens on the canvas: attention sees only relative positions (RoPE), so a digit alone would
have to learn where it sits from offsets; the token carries its place (an earlier layout spent a marker
token per cell on it, twice the canvas). Why BOS alone: the clamped givens already show the puzzle, so the
whole example is 82 tokens. The left-to-right baseline cannot see the canvas, so its prompt is BOS plus the
puzzle's 81 cell tokens and its response the solution's. All of it is vocabulary; the network is the standard
one.

A puzzle file has one puzzle a line: 81 characters, '0' or '.' for an empty cell, optionally followed by a
tab and anything else (ignored).
"""

from __future__ import annotations

import random
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer as RustTokenizer
from tokenizers import decoders, models, pre_tokenizers, processors

from ..config import is_int, read_text
from ..errors import DiffGemmaError

CELLS = 81
SPECIAL = ["<pad>", "<eos>", "<bos>", "<unk>"]
CELL_TOKENS = [f"r{c // 9 + 1}c{c % 9 + 1}={d or '.'}" for c in range(81) for d in range(10)]
VOCAB = {token: index for index, token in enumerate([*SPECIAL, *CELL_TOKENS])}
CELL_BASE = len(SPECIAL)  # the token of cell c holding d (0: empty) is CELL_BASE + 10 * c + d: `cell_token`
VOCAB_SIZE = len(VOCAB)
CANVAS = CELLS
PEERS: list[tuple[int, ...]] = []
for _cell in range(CELLS):
    _row, _col = divmod(_cell, 9)
    _box = (_row // 3) * 3 * 9 + (_col // 3) * 3
    _peers = {_row * 9 + c for c in range(9)} | {r * 9 + _col for r in range(9)}
    _peers |= {_box + r * 9 + c for r in range(3) for c in range(3)}
    _peers.discard(_cell)
    PEERS.append(tuple(sorted(_peers)))
UNITS = (
    [[r * 9 + c for c in range(9)] for r in range(9)]
    + [[r * 9 + c for r in range(9)] for c in range(9)]
    + [[(br * 3 + r) * 9 + bc * 3 + c for r in range(3) for c in range(3)] for br in range(3) for bc in range(3)]
)
ALL = 0x3FE  # bits 1..9
PEER_MATRIX = torch.zeros(CELLS, CELLS)  # [cell, peer] 1.0 where the two share a row, a column or a box
for _cell, _peers in enumerate(PEERS):
    PEER_MATRIX[_cell, list(_peers)] = 1.0
# How many times the solver (`diffgemma sudoku`, `eval sudoku`) solves a puzzle again, fresh seed, while its grid
# breaks a rule. A try that has not found the way in its first steps seldom finds it later, so many short tries
# (the shipped model's generation_config: 16 steps) solve more puzzles in fewer steps than a few long ones
# (bench/RESULTS.md, "Sudoku: short tries").
SOLVE_TRIES = 64


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


def tokenizer() -> RustTokenizer:
    """The cell tokens (`r3c7=5`) as added tokens, BOS added; anything else reads as unknown."""
    backend = RustTokenizer(models.WordLevel(vocab=VOCAB, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens(SPECIAL)
    backend.add_tokens(CELL_TOKENS)
    backend.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", VOCAB["<bos>"])]
    )
    return backend


def cell_token(cell: int | torch.Tensor, value: int | torch.Tensor) -> int | torch.Tensor:
    """The token of `cell` holding `value` (0: empty); ints or tensors."""
    return CELL_BASE + 10 * cell + value


def cell_ids(grid: Sequence[int]) -> list[int]:
    """The 81 cell tokens of a grid (0: empty)."""
    return [cell_token(cell, value) for cell, value in enumerate(grid)]


def prompt_ids() -> list[int]:
    """The diffusion model's prompt: BOS (the puzzle is on the canvas, clamped)."""
    return [VOCAB["<bos>"]]


def autoregressive_prompt_ids(puzzle: Sequence[int]) -> list[int]:
    """The left-to-right baseline's prompt: BOS and the puzzle's cells."""
    return [VOCAB["<bos>"], *cell_ids(puzzle)]


def response_ids(solution: Sequence[int]) -> list[int]:
    return cell_ids(solution)


def clamp_ids(puzzle: Sequence[int]) -> list[int]:
    """The canvas clamp: every given fixed, empty cells free (-1)."""
    return [token if value else -1 for token, value in zip(cell_ids(puzzle), puzzle, strict=True)]


def cell_ranges(first: int = 1, last: int = 9) -> list[tuple[int, int]]:
    """Each canvas position's half-open (low, high) ids: cell c's tokens for the contents first to last (by
    default its digits 1-9; 0, 0 is its empty token alone, the noise of a model trained with masked cells)."""
    return [(cell_token(cell, first), cell_token(cell, last) + 1) for cell in range(CELLS)]


def _givens_and_peers(grids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """From grids [N, 81] (0: empty): each cell's own digit one-hot and the digits its peers hold, both
    [N, 81, 10] booleans (index 0, empty, never counted as held by a peer)."""
    held = torch.nn.functional.one_hot(grids, 10)
    seen = torch.einsum("cq,nqd->ncd", PEER_MATRIX.to(grids.device), held.float()) > 0
    seen[..., 0] = False
    return held.bool(), seen


def _digit_tokens(digits: torch.Tensor) -> torch.Tensor:
    """[N, 81, 10] booleans over each cell's digits (0: empty) spread to [N, 81, VOCAB_SIZE] over its tokens."""
    count, device = len(digits), digits.device
    tokens = cell_token(torch.arange(CELLS, device=device)[:, None], torch.arange(10, device=device)[None, :])
    mask = torch.zeros(count, CELLS, VOCAB_SIZE, dtype=torch.bool, device=device)
    return mask.scatter_(-1, tokens.expand(count, -1, -1), digits)


def given_bans(puzzles: Sequence[Sequence[int]]) -> torch.Tensor:
    """[N, 81, VOCAB_SIZE] booleans: at each empty cell, the tokens of the digits a given among its peers
    holds. The digits left are the cell's candidates from the givens alone; the solution's digit is always
    among them."""
    grids = torch.tensor([list(p) for p in puzzles], dtype=torch.long).reshape(-1, CELLS)
    _, seen = _givens_and_peers(grids)
    return _digit_tokens(seen & (grids == 0)[..., None])


def candidate_tokens(puzzles: torch.Tensor) -> torch.Tensor:
    """[N, 81, VOCAB_SIZE] booleans from puzzles [N, 81] (0: empty), on their device: the tokens a cell may
    hold by the rules and the givens alone: a given's own token; at an empty cell, the digits no given peer
    holds (its candidates, never empty for a puzzle whose givens keep the rules)."""
    held, seen = _givens_and_peers(puzzles)
    candidates = ~seen
    candidates[..., 0] = False  # a cell never holds "empty"
    return _digit_tokens(torch.where((puzzles > 0)[..., None], held, candidates))


def candidate_prior(puzzles: torch.Tensor) -> torch.Tensor:
    """[N, 81, VOCAB_SIZE] the distribution the rules and the givens alone give each cell: a given certain,
    an empty cell uniform over its candidates (`candidate_tokens`). A model trained with it
    (`train_sudoku(candidate_prior=True)`) reads it as its first step's self-conditioning, where a canvas of
    noise cannot show which digits are the puzzle's."""
    allowed = candidate_tokens(puzzles).float()
    return allowed / allowed.sum(-1, keepdim=True)


def grid_from_ids(ids: Sequence[int]) -> list[int]:
    """The 81 digits of a canvas; a token that is not its cell's digit reads as empty."""
    grid = []
    for cell, token in enumerate(list(ids)[:CELLS]):
        value = token - cell_token(cell, 0)
        grid.append(value if 1 <= value <= 9 else 0)
    return grid


def check_model(model, where: str = "model") -> None:
    """A clear error unless `model` is a sudoku model of this format (vocabulary and canvas)."""
    config = model.network.config
    if config.vocab_size != VOCAB_SIZE or config.canvas_length != CANVAS:
        raise DiffGemmaError(
            f"{where}: not a sudoku model of this format (expected vocabulary {VOCAB_SIZE} and canvas {CANVAS}, "
            f"found {config.vocab_size} and {config.canvas_length})"
        )


PRIOR_KEY = "sudoku_candidate_prior"  # config.json: the model reads the candidates as its first self-conditioning


def _recorded(model, key: str) -> bool:
    """Whether `model`'s config.json records the training choice `key` (solving follows it)."""
    return bool(model.config.raw.get(key, False))


def uses_candidate_prior(model) -> bool:
    """Whether `model` was trained with the candidate prior (`train_sudoku(candidate_prior=True)`)."""
    return _recorded(model, PRIOR_KEY)


MASKED_KEY = "sudoku_masked_cells"  # config.json: a corrupted cell shows empty, not a random digit


def uses_masked_cells(model) -> bool:
    """Whether `model` was trained with masked cells (`train_sudoku(masked_cells=True)`)."""
    return _recorded(model, MASKED_KEY)


def solver_inputs(
    puzzles: Sequence[Sequence[int]],
    clamp: bool = True,
    candidates: bool = True,
    prior: bool = False,
    masked: bool = False,
) -> dict:
    """`generate`'s arguments that solve `puzzles` (one canvas each): prompts, clamped givens, cell ranges,
    and with `candidates` the digits the givens rule out banned (`given_bans`). `prior` (for a model trained
    with it, `uses_candidate_prior`): the first step's self-conditioning is the `candidate_prior`, and with
    `candidates` every cell's distribution keeps to its candidates, a given's to itself, as its drafts did in
    training. `masked` (a model trained with masked cells, `uses_masked_cells`): a cell starts empty and is
    re-noised to empty (`cell_ranges(0, 0)`), not to a random digit."""
    grids = torch.tensor([list(p) for p in puzzles], dtype=torch.long).reshape(-1, CELLS)
    bans = None
    if candidates:
        bans = ~candidate_tokens(grids) if prior else given_bans(puzzles)
    return {
        "prompt": [prompt_ids() for _ in puzzles],
        "max_new_tokens": CANVAS,
        "clamp": [clamp_ids(p) for p in puzzles] if clamp else None,
        "token_ranges": [cell_ranges()] * len(puzzles),
        "banned_tokens": bans,
        "first_self_conditioning": candidate_prior(grids) if prior else None,
        "noise_ranges": [cell_ranges(0, 0)] * len(puzzles) if masked else None,
        "eos_token_id": [],
    }


def model_solver_inputs(model, puzzles: Sequence[Sequence[int]], clamp: bool = True, candidates: bool = True) -> dict:
    """`solver_inputs` as `model` was trained to read them (its candidate prior, its masked cells)."""
    return solver_inputs(puzzles, clamp, candidates, uses_candidate_prior(model), uses_masked_cells(model))


@dataclass
class SolveOutcome:
    grids: list[list[int]]
    steps: list[int]


def solve_batch(
    model,
    puzzles: Sequence[Sequence[int]],
    seed: int | Sequence[int] = 0,
    clamp: bool = True,
    candidates: bool = True,
    **sampler,
) -> SolveOutcome:
    """Solve puzzles with a loaded model (one canvas each), givens clamped unless `clamp` is False, digits the
    givens rule out banned unless `candidates` is False. Puzzle i is solved with seed `seed + i`, or
    `seed[i]` given a list."""
    for index, puzzle in enumerate(puzzles):
        check_puzzle(puzzle, f"puzzle {index}")
    check_model(model)
    seeds = [seed + i for i in range(len(puzzles))] if isinstance(seed, int) else list(seed)
    inputs = model_solver_inputs(model, puzzles, clamp, candidates)
    result = model.generate(seed=seeds, **inputs, **sampler)
    generated = result.sequences[:, result.prompt_length :].tolist()
    return SolveOutcome([grid_from_ids(row) for row in generated], result.steps[0])


def try_seed(seed: int, attempt: int) -> int:
    """The seed of a puzzle's try `attempt` (0 first) when a rule-breaking grid is solved again."""
    return seed + attempt * 1_000_003


def evaluate(
    model,
    puzzles: Sequence[Sequence[int]],
    batch_size: int = 32,
    seed: int = 0,
    tries: int = 1,
    candidates: bool = True,
    **sampler,
) -> dict:
    """Exact-solve rate, accuracy on empty cells, givens kept, mean denoising steps; overall and per givens."""
    return summarize(evaluate_rows(model, puzzles, batch_size, seed, tries, candidates=candidates, **sampler))


def evaluate_rows(
    model,
    puzzles: Sequence[Sequence[int]],
    batch_size: int = 32,
    seed: int = 0,
    tries: int = 1,
    previous: Sequence[dict] | None = None,
    candidates: bool = True,
    **sampler,
) -> list[dict]:
    """One `score` row a puzzle (with its grid and the tries it took). Puzzle i is solved with seed
    `seed + i` whatever the batch size (fast mode draws per row), so rows of a subset equal the same rows of
    a larger run. With `tries` > 1, a grid that breaks a rule of sudoku (checked without the solution, as a
    user could) is solved again with a fresh seed (`try_seed`), up to `tries` times; its steps add up over
    the tries. `previous`: rows an earlier call gave for the same puzzles and seed with fewer tries; their
    grids stand and only the unsolved puzzles go on to the next tries. `candidates`: see `solve_batch`."""
    if tries < 1:
        raise DiffGemmaError(f"tries must be at least 1, got {tries}")
    if previous is None:
        grids: list[list[int]] = [[] for _ in puzzles]
        steps, taken, pending, done = [0] * len(puzzles), [0] * len(puzzles), list(range(len(puzzles))), 0
    else:
        if len(previous) != len(puzzles):
            raise DiffGemmaError(f"previous rows: {len(previous)} for {len(puzzles)} puzzles")
        grids = [row["grid"] for row in previous]
        steps, taken = [row["steps"] for row in previous], [row["tries"] for row in previous]
        pending, done = [i for i, r in enumerate(previous) if not r["solved"]], max(taken, default=0)
    for attempt in range(done, tries):
        for start in range(0, len(pending), batch_size):
            chosen = pending[start : start + batch_size]
            seeds = [try_seed(seed + i, attempt) for i in chosen]
            outcome = solve_batch(model, [puzzles[i] for i in chosen], seeds, candidates=candidates, **sampler)
            for i, grid, count in zip(chosen, outcome.grids, outcome.steps, strict=True):
                grids[i], steps[i], taken[i] = grid, steps[i] + count, attempt + 1
        pending = [i for i in pending if not is_solution(grids[i], puzzles[i])]
        if not pending:
            break
    return [score(p, g, s) | {"tries": k} for p, g, s, k in zip(puzzles, grids, steps, taken, strict=True)]


def score(puzzle: Sequence[int], grid: Sequence[int], steps: int) -> dict:
    """One evaluation row: solved, empty cells right (against the unique solution), givens kept, steps."""
    empty = [c for c in range(CELLS) if puzzle[c] == 0]
    solution = solve(puzzle, 1)
    target = solution[0] if solution else None
    return {
        "givens": CELLS - len(empty),
        "solved": is_solution(grid, puzzle),
        "cells_correct": sum(1 for c in empty if target and grid[c] == target[c]),
        "cells_empty": len(empty),
        "givens_kept": all(grid[c] == puzzle[c] for c in range(CELLS) if puzzle[c]),
        "steps": steps,
        "grid": list(grid),
    }


def solve_autoregressive(
    model,
    puzzles: Sequence[Sequence[int]],
    batch_size: int = 32,
    seed: int = 0,
    clamp: bool = False,
    candidates: bool = False,
    **_,
) -> dict:
    """The left-to-right baseline's report (`autoregressive_rows`). `seed` is unused: decoding is greedy."""
    return summarize(autoregressive_rows(model, puzzles, batch_size, clamp, candidates))


@torch.no_grad()
def autoregressive_rows(
    model, puzzles: Sequence[Sequence[int]], batch_size: int = 32, clamp: bool = False, candidates: bool = False
) -> list[dict]:
    """One `score` row a puzzle for the left-to-right baseline: greedy decoding with the causal encoder, cell
    by cell, each cell the argmax over its nine tokens; one forward pass a cell (steps = 81). Givens are
    written by the model (`clamp=False`, as such baselines are run) or forced into the sequence as it is decoded
    (`clamp=True`); with `candidates` an empty cell's argmax skips the digits the givens rule out
    (`given_bans`), as the diffusion solver's does."""
    network = model.network
    ranges = cell_ranges()
    rows = []
    for start in range(0, len(puzzles), batch_size):
        chunk = puzzles[start : start + batch_size]
        ids = torch.tensor([autoregressive_prompt_ids(p) for p in chunk], device=network.device)
        givens = torch.tensor([list(p) for p in chunk], device=network.device)
        bans = given_bans(chunk).to(network.device) if candidates else None
        cache = network.new_cache(len(chunk), ids.shape[1] + CANVAS)
        hidden = network.encode(ids, cache)
        grid = torch.zeros_like(givens)
        for cell in range(CELLS):
            low, high = ranges[cell]
            scores = network.head(hidden[:, -1])[:, low:high]
            if bans is not None:
                scores = scores.masked_fill(bans[:, cell, low:high], float("-inf"))
            choice = scores.argmax(dim=-1) + 1
            if clamp:
                choice = torch.where(givens[:, cell] > 0, givens[:, cell], choice)
            grid[:, cell] = choice
            if cell + 1 < CELLS:
                hidden = network.encode(cell_token(cell, choice)[:, None], cache)
        rows += [score(p, g, CELLS) for p, g in zip(chunk, grid.tolist(), strict=True)]
    return rows


def summarize(rows: list[dict]) -> dict:
    """Rates over `score` rows, overall and per number of givens; rows that count their tries (`evaluate_rows`)
    also give `first_try_solved_rate` (solved by the first try alone) and `mean_tries`."""

    def block(selected: list[dict]) -> dict:
        n = len(selected)
        summary = {
            "n": n,
            "solved_rate": sum(r["solved"] for r in selected) / n,
            "cell_accuracy": sum(r["cells_correct"] for r in selected)
            / max(1, sum(r["cells_empty"] for r in selected)),
            "givens_kept_rate": sum(r["givens_kept"] for r in selected) / n,
            "mean_steps": sum(r["steps"] for r in selected) / n,
        }
        if all("tries" in r for r in selected):
            summary["first_try_solved_rate"] = sum(r["solved"] and r["tries"] == 1 for r in selected) / n
            summary["mean_tries"] = sum(r["tries"] for r in selected) / n
        return summary

    summary = block(rows)
    summary["per_givens"] = {
        str(g): block([r for r in rows if r["givens"] == g]) for g in sorted({r["givens"] for r in rows})
    }
    return summary


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


def write_tokenizer(folder: Path) -> None:
    """The sudoku vocabulary in the checkpoint layout (tokenizer.json and its config, no chat template)."""
    import json

    tokenizer().save(str(folder / "tokenizer.json"))
    settings = {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>"}
    (folder / "tokenizer_config.json").write_text(json.dumps(settings, indent=2), encoding="utf-8")
    (folder / "chat_template.jinja").unlink(missing_ok=True)


@torch.no_grad()
def structured_embeddings_(network, seed: int, std: float = 0.02) -> None:
    """Start the embedding table with the board's structure in it: the token of a cell holding d is the sum
    of a row, a column, a box and a digit vector (d = 0, empty, has its own). Cells that share a unit then
    share a component from the first step, so attention can find a cell's peers before it has learned
    anything; training is free to move every vector."""
    generator = torch.Generator().manual_seed(seed)
    table = network.embed_tokens.weight
    hidden = table.shape[1]

    def vectors(count: int) -> torch.Tensor:
        return torch.randn(count, hidden, generator=generator) * std

    rows, cols, boxes, digits = vectors(9), vectors(9), vectors(9), vectors(10)
    for cell in range(CELLS):
        row, col = divmod(cell, 9)
        place = rows[row] + cols[col] + boxes[(row // 3) * 3 + col // 3]
        for value in range(10):
            table[cell_token(cell, value)] = (place + digits[value]).to(table)


def random_symmetries(
    count: int, generator: torch.Generator, device: torch.device | str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random elements of the sudoku symmetry group for `count` boards, drawn on the device: (cell orders
    [count, 81], digit relabellings [count, 10] with 0 kept for empty). Board b moves to
    `digits[b][grid[order[b]]]`; bands, rows within a band, stacks, columns within a stack, transposition
    and the nine digits relabelled keep a grid valid and a puzzle's solution unique."""

    def lines() -> torch.Tensor:
        groups = torch.rand(count, 3, generator=generator, device=device).argsort(dim=1)
        within = torch.rand(count, 3, 3, generator=generator, device=device).argsort(dim=2)
        return (groups[:, :, None] * 3 + within).reshape(count, 9)

    rows, cols = lines(), lines()
    order = rows[:, :, None] * 9 + cols[:, None, :]
    transpose = torch.rand(count, generator=generator, device=device) < 0.5
    order = torch.where(transpose[:, None, None], order.transpose(1, 2), order).reshape(count, CELLS)
    digits = torch.rand(count, 9, generator=generator, device=device).argsort(dim=1) + 1
    return order, torch.cat([torch.zeros_like(digits[:, :1]), digits], dim=1)


def check_detached_passes(count: int) -> None:
    if count < 1:
        raise DiffGemmaError(f"detached self-conditioning passes must be at least 1, got {count}")


def check_draft_temperatures(temperatures: tuple[float, float] | None) -> None:
    if temperatures is not None and not 0 < temperatures[0] <= temperatures[1]:
        raise DiffGemmaError(f"draft temperatures must be a range low:high above 0, low first, got {temperatures}")


class DeviceBatches:
    """Training batches made where the model trains: each example a pool puzzle under a fresh random symmetry.
    Diffusion: prompt BOS, canvas the solution's 81 cell tokens; the objective's corruption (t ~ U(eps, 1))
    reaches the empty cells only, each replaced by a uniformly random one of its nine digit tokens, as solving
    re-noises it (givens stay clean: they are clamped at solve time). `autoregressive`: the prompt is BOS and
    the puzzle's cells, for the left-to-right baseline. Batch k depends on (seed, k) alone: a resumed run sees
    the same data and noise. `max_detached_passes` > 1: each batch draws how many detached self-conditioning
    passes precede the scored one, uniformly from 1 to it (`Batch.detached_passes`). `masked_cells`: a corrupted
    cell shows its empty token instead of a random digit (masked diffusion within the same machinery: every
    digit the model sees is then right, so it can trust what the sampler accepted)."""

    def __init__(
        self,
        pool: Sequence[tuple[Sequence[int], Sequence[int]]],
        batch_size: int,
        seed: int,
        device,
        autoregressive: bool = False,
        max_detached_passes: int = 1,
        candidate_prior: bool = False,
        draft_temperatures: tuple[float, float] | None = None,
        masked_cells: bool = False,
    ) -> None:
        check_detached_passes(max_detached_passes)
        check_draft_temperatures(draft_temperatures)
        self.candidate_prior, self.draft_temperatures = candidate_prior, draft_temperatures
        self.device = torch.device(device)
        self.puzzles = torch.tensor([list(p) for p, _ in pool], dtype=torch.long, device=self.device)
        self.solutions = torch.tensor([list(s) for _, s in pool], dtype=torch.long, device=self.device)
        self.batch_size, self.seed, self.autoregressive = batch_size, seed, autoregressive
        self.max_detached_passes = max_detached_passes
        self.cells = cell_token(torch.arange(CELLS, device=self.device), 0)
        self.masked_cells = masked_cells

    def __call__(self, index: int):
        from ..train.objective import EPSILON, Batch

        count, device = self.batch_size, self.device
        generator = torch.Generator(device=device).manual_seed(self.seed * 1_000_003 + index)
        pick = torch.randint(0, len(self.puzzles), (count,), generator=generator, device=device)
        order, digits = random_symmetries(count, generator, device)
        puzzle = digits.gather(1, self.puzzles[pick].gather(1, order))
        solution = digits.gather(1, self.solutions[pick].gather(1, order))
        bos = torch.full((count, 1), VOCAB["<bos>"], device=device)
        prompt = torch.cat([bos, self.cells + puzzle], dim=1) if self.autoregressive else bos
        canvas = self.cells + solution
        t = EPSILON + (1 - EPSILON) * torch.rand(count, generator=generator, device=device)
        keep = (torch.rand(count, CANVAS, generator=generator, device=device) >= t[:, None]) | (puzzle > 0)
        noise = self.cells + torch.randint(1, 10, (count, CANVAS), generator=generator, device=device)
        if self.masked_cells:  # drawn all the same, so the draws after it do not move
            noise = self.cells.expand(count, -1)
        ids = torch.cat([prompt, canvas], dim=1)
        use_self_conditioning = torch.rand(count, generator=generator, device=device) < 0.5
        # drawn last, so a run with one pass sees the data and noise it always did; and only when there is a
        # choice, since reading the draw back waits for the device
        passes = 1
        if self.max_detached_passes > 1:
            passes = int(torch.randint(1, self.max_detached_passes + 1, (1,), generator=generator, device=device))
        temperature = None
        if self.draft_temperatures is not None:
            low, high = self.draft_temperatures
            temperature = low + (high - low) * torch.rand(count, generator=generator, device=device)
        return Batch(
            ids=ids,
            valid=torch.ones_like(ids, dtype=torch.bool),
            canvas_start=torch.full((count,), prompt.shape[1]),
            clean=canvas,
            noisy=torch.where(keep, canvas, noise),
            keep=keep,
            t=t,
            use_self_conditioning=use_self_conditioning,
            response_start=prompt.shape[1],
            tokens=ids.numel(),
            detached_passes=passes,
            self_conditioning_prior=candidate_prior(puzzle) if self.candidate_prior else None,
            draft_temperature=temperature,
        )


PROBE_STEPS = 30  # timed to size a run given in seconds; inside the warmup, so the steps count cannot change them


def train_sudoku(
    out: str | Path,
    steps: int = 20000,
    batch_size: int = 64,
    seed: int = 0,
    peak_lr: float = 2e-3,
    ar_weight: float = 0.0,
    givens: tuple[int, int] = (24, 36),
    pool_size: int = 4000,
    eval_every: int = 500,
    eval_puzzles: int = 64,
    objective: str = "diffusion",
    resume: bool = False,
    init: str | Path | None = None,
    device: str = "cpu",
    seconds: float | None = None,
    pool_workers: int = 1,
    pool_cache: str | Path | None = None,
    max_detached_passes: int = 1,
    layers: int | None = None,
    candidate_prior: bool = False,
    draft_temperatures: tuple[float, float] | None = None,
    masked_cells: bool = False,
    log=print,
):
    """Train the sudoku model into `out` (checkpoints as it goes; `resume` continues a stopped run).

    Data: a seeded pool of unique puzzles with `givens` in range, each drawn under a fresh random symmetry,
    batches made on `device` (`DeviceBatches`). `objective="autoregressive"` trains the same network left to
    right (the encoder alone): the baseline. `seconds`: a time budget instead of a step count: the first
    steps are timed and the run sized to fit (the log gives the step count, which `steps` reproduces), then it
    stops at the budget whatever the estimate said. `init`: a sudoku checkpoint whose weights start the run
    (a second stage with a fresh optimizer and schedule) instead of random ones. `max_detached_passes` > 1:
    each batch recycles the self-conditioning through up to that many detached passes (`DeviceBatches`).
    `layers`: the network's depth (the preset's 6 if not given); with `init`, a deeper network than the init's
    repeats its layers, the repeats starting switched off (`train.grow.deepen`). `candidate_prior`: the model
    reads the puzzle's `candidate_prior` as its first self-conditioning (recorded in its config; a model trained
    with it keeps it in later stages). `draft_temperatures` (low, high): see `DeviceBatches`. `masked_cells`:
    see `DeviceBatches` (recorded in its config like the prior; solving re-noises to empty cells)."""
    from ..train.trainer import TrainConfig, save_state, train

    started = time.perf_counter()
    folder = Path(out)
    if resume and init is not None:
        raise DiffGemmaError("--resume continues the run in --out; --init starts a new one: give one of them")
    check_detached_passes(max_detached_passes)  # before anything is written into `out`
    check_draft_temperatures(draft_temperatures)
    check_givens_range(givens)
    if eval_every < 0:
        raise DiffGemmaError(f"--eval-every must be 0 (only the final checkpoint) or more, got {eval_every}")
    if objective == "autoregressive" and (candidate_prior or masked_cells or draft_temperatures is not None):
        raise DiffGemmaError(
            "--candidate-prior, --masked-cells and --draft-temperature shape the diffusion objective's passes"
        )
    model, candidate_prior, masked_cells = _model_to_train(
        folder, resume, init, layers, seed, device, objective, candidate_prior, masked_cells
    )
    low, high = givens
    if low < FEW_GIVENS:
        log(
            f"puzzles under {FEW_GIVENS} givens take seconds each to make: a pool of {pool_size} may take long "
            "(--pool-workers to spread it, --pool-file to make it once)"
        )
    pool = puzzle_pool(seed, pool_size, givens, workers=pool_workers, cache=pool_cache)
    log(f"puzzle pool: {len(pool)} unique puzzles, {low}-{high} givens ({time.perf_counter() - started:.0f} s)")
    eval_rng = random.Random(10_000 + seed)
    held_out = [make_puzzle(eval_rng, eval_rng.randint(24, 36))[0] for _ in range(eval_puzzles if eval_every else 0)]
    batches = DeviceBatches(
        pool,
        batch_size,
        seed,
        model.network.device,
        objective == "autoregressive",
        max_detached_passes,
        candidate_prior,
        draft_temperatures,
        masked_cells,
    )

    def settings(total: int) -> TrainConfig:
        return TrainConfig(
            steps=total,
            batch_size=batch_size,
            peak_lr=peak_lr,
            warmup=200,
            ar_weight=ar_weight,
            seed=seed,
            objective=objective,
            recipe=(
                ("pool", pool_size),
                ("givens", givens),
                ("self_conditioning_passes", max_detached_passes),
                ("layers", layers),
                ("candidate_prior", candidate_prior),
                ("draft_temperatures", draft_temperatures),
                ("masked_cells", masked_cells),
            ),
        )

    config = settings(steps)

    def report(step: int, losses: list[float]) -> None:
        solve = solve_autoregressive if objective == "autoregressive" else evaluate
        metrics = solve(model, held_out, batch_size=64, seed=seed)
        model.network.train()
        log(
            f"step {step}: loss {sum(losses[-50:]) / len(losses[-50:]):.4f}, solved {metrics['solved_rate']:.1%}, "
            f"cells {metrics['cell_accuracy']:.1%}, steps {metrics['mean_steps']:.1f} "
            f"(24-36 givens, {metrics['n']} puzzles, {(time.perf_counter() - started) / 60:.1f} min)"
        )

    def checkpoint(step: int, optimizer, losses: list[float]) -> None:
        model.save(folder)
        save_state(folder, step, optimizer, config, losses)
        if eval_every and step % eval_every == 0:
            report(step, losses)

    stamps: list[float] = []

    def progress(step: int, loss: float) -> None:
        stamps.append(time.perf_counter())
        if (step + 1) % 50 == 0:
            elapsed = time.perf_counter() - started
            log(f"step {step + 1}/{config.steps}: loss {loss:.4f} ({elapsed / 60:.1f} min)")

    def run(stop_at: int | None = None, deadline: float | None = None, resume_from: Path | None = None):
        return train(
            model.network,
            batches,
            config,
            eos_id=VOCAB["<eos>"],
            pad_id=VOCAB["<pad>"],
            on_step=progress,
            checkpoint=checkpoint,
            checkpoint_every=eval_every,
            resume_from=resume_from,
            show_progress=False,
            stop_at=stop_at,
            deadline=deadline,
        )

    if seconds is None:
        losses = run(resume_from=folder if resume else None)
    else:
        if resume:
            raise DiffGemmaError("--seconds sizes a new run; resume one with its step count (--steps) instead")
        deadline = time.monotonic() + seconds - (time.perf_counter() - started)
        config = settings(10**9)  # the probe runs inside the warmup, where the total does not matter
        run(stop_at=PROBE_STEPS)
        first = PROBE_STEPS // 3  # the first steps pay for warming up
        per_step = (stamps[-1] - stamps[first]) / (len(stamps) - 1 - first)
        config = settings(PROBE_STEPS + max(1, int((deadline - time.monotonic()) / per_step)))
        log(
            f"timed {per_step * 1000:.1f} ms a step: the run is {config.steps} steps of {batch_size} "
            f"(reproduce with steps={config.steps})"
        )
        losses = run(deadline=deadline, resume_from=folder)
        if len(losses) < config.steps:
            log(f"stopped at step {len(losses)} of {config.steps}: the time budget was spent")
    if eval_every and losses and len(losses) % eval_every:
        report(len(losses), losses)
    return losses


def _model_to_train(
    folder: Path,
    resume: bool,
    init: str | Path | None,
    layers: int | None,
    seed: int,
    device: str,
    objective: str,
    candidate_prior: bool,
    masked_cells: bool,
):
    """The model a run starts from, saved in `folder` (a resumed run's is there already): the run's own
    (`resume`), a trained one (`init`, deepened to `layers`), or a new random one; with whether it reads the
    candidate prior and re-noises to empty cells (a choice the model was trained with, an init or a resumed
    run, stays on; recorded in its config, which solving reads)."""
    from ..api import load
    from ..presets import random_checkpoint
    from ..train.grow import deepen

    if resume:
        model = load(folder, device=device)
    elif init is not None:
        model = load(init, device=device)  # its tokenizer files go with it when it is saved below
        check_model(model, str(init))
        if layers is not None and layers != model.config.num_hidden_layers:
            model = deepen(model, layers)
    else:
        depth = {} if layers is None else {"num_hidden_layers": layers}
        random_checkpoint(folder, preset="sudoku", seed=seed, **depth)
        write_tokenizer(folder)
        model = load(folder, device=device)
        structured_embeddings_(model.network, seed)
        model.settings = model.settings.replace(max_denoising_steps=64)

    def kept(asked: bool, key: str) -> bool:
        chosen = asked or (objective == "diffusion" and _recorded(model, key))
        if chosen:
            model.config.raw[key] = True
        return chosen

    candidate_prior, masked_cells = kept(candidate_prior, PRIOR_KEY), kept(masked_cells, MASKED_KEY)
    # a grid has no EOS (a saved "none" reads back as the config's EOS, so a resumed run says it again)
    model.settings = model.settings.replace(max_new_tokens=CANVAS, eos_token_id=[])
    if not resume:
        model.save(folder)
    return model, candidate_prior, masked_cells
