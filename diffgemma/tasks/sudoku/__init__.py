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

The rooms: `puzzles` (grids, rules, an exact solver, puzzle making), `tokens` (the format), `solver` (solving
and evaluating with a model), `training` (the batches and the run).
"""

from . import puzzles, solver, tokens, training
from .puzzles import (
    CELLS,
    PEERS,
    check_givens_range,
    check_puzzle,
    format_grid,
    is_consistent,
    is_solution,
    make_puzzle,
    parse,
    puzzle_pool,
    random_solution,
    read_puzzles,
    solve,
)
from .solver import (
    SOLVE_TRIES,
    SolveOutcome,
    autoregressive_rows,
    check_model,
    evaluate,
    evaluate_rows,
    model_solver_inputs,
    score,
    solve_autoregressive,
    solve_batch,
    solver_inputs,
    summarize,
    try_seed,
    uses_candidate_prior,
    uses_masked_cells,
)
from .tokens import (
    CANVAS,
    CELL_BASE,
    VOCAB,
    VOCAB_SIZE,
    autoregressive_prompt_ids,
    candidate_prior,
    candidate_tokens,
    cell_ids,
    cell_ranges,
    cell_token,
    clamp_ids,
    given_bans,
    grid_from_ids,
    prompt_ids,
    response_ids,
    tokenizer,
    write_tokenizer,
)
from .training import DeviceBatches, random_symmetries, train_sudoku

__all__ = [
    "CANVAS",
    "CELLS",
    "CELL_BASE",
    "PEERS",
    "SOLVE_TRIES",
    "VOCAB",
    "VOCAB_SIZE",
    "DeviceBatches",
    "SolveOutcome",
    "autoregressive_prompt_ids",
    "autoregressive_rows",
    "candidate_prior",
    "candidate_tokens",
    "cell_ids",
    "cell_ranges",
    "cell_token",
    "check_givens_range",
    "check_model",
    "check_puzzle",
    "clamp_ids",
    "evaluate",
    "evaluate_rows",
    "format_grid",
    "given_bans",
    "grid_from_ids",
    "is_consistent",
    "is_solution",
    "make_puzzle",
    "model_solver_inputs",
    "parse",
    "prompt_ids",
    "puzzle_pool",
    "puzzles",
    "random_solution",
    "random_symmetries",
    "read_puzzles",
    "response_ids",
    "score",
    "solve",
    "solve_autoregressive",
    "solve_batch",
    "solver",
    "solver_inputs",
    "summarize",
    "tokenizer",
    "tokens",
    "train_sudoku",
    "training",
    "try_seed",
    "uses_candidate_prior",
    "uses_masked_cells",
    "write_tokenizer",
]
