"""Solving with a trained model: the givens clamped on the canvas, each empty cell diffusing over its own digits
(and by default only its candidates), tried again with a fresh seed while the grid breaks a rule; evaluation
rows and their summary; the left-to-right baseline decoded greedily for comparison."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ...errors import DiffGemmaError
from .puzzles import CELLS, check_puzzle, is_solution, solve
from .tokens import (
    CANVAS,
    VOCAB_SIZE,
    autoregressive_prompt_ids,
    candidate_prior,
    candidate_tokens,
    cell_ranges,
    cell_token,
    clamp_ids,
    given_bans,
    grid_from_ids,
    prompt_ids,
)

# How many times the solver (`diffgemma sudoku`, `eval sudoku`) solves a puzzle again, fresh seed, while its grid
# breaks a rule. A try that has not found the way in its first steps seldom finds it later, so many short tries
# (the shipped model's generation_config: 16 steps) solve more puzzles in fewer steps than a few long ones
# (bench/RESULTS.md, "Sudoku: short tries").
SOLVE_TRIES = 64


def check_model(model, where: str = "model") -> None:
    """A clear error unless `model` is a sudoku model of this format (vocabulary and canvas)."""
    config = model.network.config
    if config.vocab_size != VOCAB_SIZE or config.canvas_length != CANVAS:
        raise DiffGemmaError(
            f"{where}: not a sudoku model of this format (expected vocabulary {VOCAB_SIZE} and canvas {CANVAS}, "
            f"found {config.vocab_size} and {config.canvas_length})"
        )


PRIOR_KEY = "sudoku_candidate_prior"  # config.json: the model reads the candidates as its first self-conditioning


def recorded(model, key: str) -> bool:
    """Whether `model`'s config.json records the training choice `key` (solving follows it)."""
    return bool(model.config.raw.get(key, False))


def uses_candidate_prior(model) -> bool:
    """Whether `model` was trained with the candidate prior (`train_sudoku(candidate_prior=True)`)."""
    return recorded(model, PRIOR_KEY)


MASKED_KEY = "sudoku_masked_cells"  # config.json: a corrupted cell shows empty, not a random digit


def uses_masked_cells(model) -> bool:
    """Whether `model` was trained with masked cells (`train_sudoku(masked_cells=True)`)."""
    return recorded(model, MASKED_KEY)


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
