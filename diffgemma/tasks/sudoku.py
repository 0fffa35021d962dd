"""Sudoku: puzzles with unique solutions, the token format, and solving by diffusion with the givens clamped.

Format: the prompt is BOS and the 81 cells of the puzzle (row by row, '0' for an empty cell); the response
is the 81 cells of the solution, one canvas. At solve time the givens are clamped on the canvas (fixed in
every step and in the output) and the empty cells diffuse.

A puzzle file has one puzzle a line: 81 characters, '0' or '.' for an empty cell, optionally followed by a
tab and anything else (ignored).
"""

from __future__ import annotations

import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer as RustTokenizer
from tokenizers import decoders, models, pre_tokenizers, processors

from ..errors import DiffGemmaError

CELLS = 81
DIGITS = "0123456789"
SPECIAL = ["<pad>", "<eos>", "<bos>", "<unk>"]
VOCAB = {token: index for index, token in enumerate([*SPECIAL, *DIGITS])}
EMPTY_ID = VOCAB["0"]
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


def parse(line: str, where: str = "puzzle") -> list[int]:
    """81 cells from a puzzle line ('0' or '.' empty; a tab and whatever follows it is ignored)."""
    text = line.split("\t", 1)[0].strip()
    if len(text) != CELLS or any(ch not in "0123456789." for ch in text):
        raise DiffGemmaError(f"{where}: expected 81 characters of 1-9, 0 or '.', got {text[:90]!r}")
    grid = [0 if ch in "0." else int(ch) for ch in text]
    if not is_consistent(grid):
        raise DiffGemmaError(f"{where}: the givens break the rules (a digit repeats in a row, column or box)")
    return grid


def read_puzzles(path: str | Path) -> list[list[int]]:
    file = Path(path)
    if not file.is_file():
        raise DiffGemmaError(f"{file}: file not found")
    lines = [(n, line) for n, line in enumerate(file.read_text().splitlines(), 1) if line.strip()]
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
    """A uniformly shuffled valid grid: a base pattern under random digit, row, column, band and stack moves."""

    def pattern(r: int, c: int) -> int:
        return (3 * (r % 3) + r // 3 + c) % 9

    def shuffled() -> list[int]:
        order = []
        for group in rng.sample(range(3), 3):
            order += [group * 3 + i for i in rng.sample(range(3), 3)]
        return order

    rows, cols = shuffled(), shuffled()
    digits = rng.sample(range(1, 10), 9)
    grid = [digits[pattern(r, c)] for r in rows for c in cols]
    if rng.random() < 0.5:
        grid = [grid[c * 9 + r] for r in range(9) for c in range(9)]
    return grid


def make_puzzle(
    rng: random.Random, givens: int, unique: bool = True, attempts: int = 50
) -> tuple[list[int], list[int]]:
    """(puzzle, solution) with exactly `givens` filled cells; with `unique`, the solution is the only one."""
    if not 17 <= givens <= CELLS:
        raise DiffGemmaError(f"givens must be between 17 and 81, got {givens}")
    for _ in range(attempts):
        solution = random_solution(rng)
        puzzle = list(solution)
        order = rng.sample(range(CELLS), CELLS)
        filled = CELLS
        for cell in order:
            if filled == givens:
                break
            kept = puzzle[cell]
            puzzle[cell] = 0
            if unique and len(solve(puzzle, 2)) != 1:
                puzzle[cell] = kept
                continue
            filled -= 1
        if filled == givens:
            return puzzle, solution
    raise DiffGemmaError(f"could not make a unique puzzle with {givens} givens in {attempts} attempts")


def tokenizer() -> RustTokenizer:
    """One token a cell digit, plus the special tokens; BOS is added to plain text."""
    backend = RustTokenizer(models.WordLevel(vocab=VOCAB, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens(SPECIAL)
    backend.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", VOCAB["<bos>"])]
    )
    return backend


def prompt_ids(puzzle: Sequence[int]) -> list[int]:
    return [VOCAB["<bos>"], *(VOCAB[str(v)] for v in puzzle)]


def response_ids(solution: Sequence[int]) -> list[int]:
    return [VOCAB[str(v)] for v in solution]


def clamp_ids(puzzle: Sequence[int]) -> list[int]:
    """The canvas clamp: given cells fixed to their digit, empty cells free (-1)."""
    return [VOCAB[str(v)] if v else -1 for v in puzzle]


def grid_from_ids(ids: Sequence[int]) -> list[int]:
    digits = {VOCAB[str(d)]: d for d in range(10)}
    return [digits.get(token, 0) for token in list(ids)[:CELLS]]


@dataclass
class SolveOutcome:
    grids: list[list[int]]
    steps: list[int]


def solve_batch(model, puzzles: Sequence[Sequence[int]], seed: int = 0, clamp: bool = True, **sampler) -> SolveOutcome:
    """Solve puzzles with a loaded model (one canvas each), givens clamped unless `clamp` is False."""
    prompts = [prompt_ids(p) for p in puzzles]
    clamps = [clamp_ids(p) for p in puzzles] if clamp else None
    result = model.generate(
        prompts,
        max_new_tokens=CELLS,
        seed=[seed + i for i in range(len(puzzles))],
        clamp=clamps,
        eos_token_id=[],
        **sampler,
    )
    generated = result.sequences[:, result.prompt_length :].tolist()
    return SolveOutcome([grid_from_ids(row) for row in generated], result.steps[0])


def evaluate(model, puzzles: Sequence[Sequence[int]], batch_size: int = 32, seed: int = 0, **sampler) -> dict:
    """Exact-solve rate, accuracy on empty cells, givens kept, mean denoising steps; overall and per givens."""
    rows = []
    for start in range(0, len(puzzles), batch_size):
        chunk = puzzles[start : start + batch_size]
        outcome = solve_batch(model, chunk, seed=seed + start, **sampler)
        for puzzle, grid, steps in zip(chunk, outcome.grids, outcome.steps, strict=True):
            empty = [c for c in range(CELLS) if puzzle[c] == 0]
            solution = solve(puzzle, 1)
            target = solution[0] if solution else None
            correct = sum(1 for c in empty if target and grid[c] == target[c])
            rows.append(
                {
                    "givens": CELLS - len(empty),
                    "solved": is_solution(grid, puzzle),
                    "cells_correct": correct,
                    "cells_empty": len(empty),
                    "givens_kept": all(grid[c] == puzzle[c] for c in range(CELLS) if puzzle[c]),
                    "steps": steps,
                }
            )
    return summarize(rows)


def summarize(rows: list[dict]) -> dict:
    def block(selected: list[dict]) -> dict:
        n = len(selected)
        return {
            "n": n,
            "solved_rate": sum(r["solved"] for r in selected) / n,
            "cell_accuracy": sum(r["cells_correct"] for r in selected)
            / max(1, sum(r["cells_empty"] for r in selected)),
            "givens_kept_rate": sum(r["givens_kept"] for r in selected) / n,
            "mean_steps": sum(r["steps"] for r in selected) / n,
        }

    summary = block(rows)
    summary["per_givens"] = {
        str(g): block([r for r in rows if r["givens"] == g]) for g in sorted({r["givens"] for r in rows})
    }
    return summary


def training_pairs(rng: random.Random, count: int, givens: tuple[int, int]) -> list[tuple[list[int], list[int]]]:
    """Fast training data: random grids with cells removed at random (not checked for uniqueness)."""
    pairs = []
    for _ in range(count):
        solution = random_solution(rng)
        keep = rng.randint(*givens)
        shown = set(rng.sample(range(CELLS), keep))
        pairs.append(([v if i in shown else 0 for i, v in enumerate(solution)], solution))
    return pairs


def puzzles_to_tensor(puzzles: Sequence[Sequence[int]]) -> torch.Tensor:
    return torch.tensor([list(p) for p in puzzles], dtype=torch.long)


def write_tokenizer(folder: Path) -> None:
    """The sudoku vocabulary in the checkpoint layout (tokenizer.json and its config, no chat template)."""
    import json

    tokenizer().save(str(folder / "tokenizer.json"))
    settings = {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>"}
    (folder / "tokenizer_config.json").write_text(json.dumps(settings, indent=2), encoding="utf-8")
    (folder / "chat_template.jinja").unlink(missing_ok=True)


def givens_range(step: int, steps: int, hardest: int, easiest: int) -> tuple[int, int]:
    """Curriculum: puzzles start easy and the fewest givens fall to `hardest` over the first 60% of steps."""
    progress = min(1.0, step / max(1, 0.6 * steps))
    low = round(easiest - (easiest - hardest) * progress)
    return low, max(low, easiest)


def train_sudoku(
    out: str | Path,
    steps: int = 20000,
    batch_size: int = 64,
    seed: int = 0,
    peak_lr: float = 2e-3,
    ar_weight: float = 0.25,
    hardest: int = 22,
    easiest: int = 50,
    eval_every: int = 500,
    resume: bool = False,
    log=print,
):
    """Train the sudoku model into `out` (checkpoints as it goes; `resume` continues a stopped run)."""
    from ..api import load
    from ..presets import random_checkpoint
    from ..train.objective import Example
    from ..train.trainer import TrainConfig, save_state, train

    folder = Path(out)
    if resume:
        model = load(folder)
    else:
        random_checkpoint(folder, preset="sudoku", seed=seed)
        write_tokenizer(folder)
        model = load(folder)
        model.settings = model.settings.replace(max_denoising_steps=32, max_new_tokens=CELLS, eos_token_id=[])
        model.save(folder)
    config = TrainConfig(
        steps=steps, batch_size=batch_size, peak_lr=peak_lr, warmup=200, ar_weight=ar_weight, seed=seed
    )
    eval_rng = random.Random(10_000 + seed)
    eval_puzzles = [make_puzzle(eval_rng, eval_rng.randint(24, 36))[0] for _ in range(64)]

    def batch_for_step(index: int) -> list[Example]:
        rng = random.Random(seed * 1_000_003 + index)
        pairs = training_pairs(rng, batch_size, givens_range(index, steps, hardest, easiest))
        return [Example(prompt_ids(p), response_ids(s), id=index * batch_size + i) for i, (p, s) in enumerate(pairs)]

    def checkpoint(step: int, optimizer, losses: list[float]) -> None:
        model.save(folder)
        save_state(folder, step, optimizer, config, losses)
        if eval_every and (step % eval_every == 0 or step == steps):
            metrics = evaluate(model, eval_puzzles, batch_size=64, seed=seed)
            model.network.train()
            model.network.requires_grad_(True)
            log(
                f"step {step}: loss {sum(losses[-50:]) / len(losses[-50:]):.4f}, solved {metrics['solved_rate']:.1%}, "
                f"cells {metrics['cell_accuracy']:.1%} (24-36 givens, {metrics['n']} puzzles)"
            )

    started = time.perf_counter()

    def progress(step: int, loss: float) -> None:
        if (step + 1) % 50 == 0:
            elapsed = time.perf_counter() - started
            log(f"step {step + 1}/{steps}: loss {loss:.4f} ({elapsed / 60:.1f} min)")

    return train(
        model.network,
        batch_for_step,
        config,
        eos_id=VOCAB["<eos>"],
        pad_id=VOCAB["<pad>"],
        on_step=progress,
        checkpoint=checkpoint,
        checkpoint_every=eval_every,
        resume_from=folder if resume else None,
        show_progress=False,
    )
