"""The token format: every token names a cell and its content (`r3c7=5`, `r3c7=.` when empty), the canvas is
the 81 cells row by row; the prompts, clamps and per-cell token ranges that put a puzzle on it, a canvas read
back as a grid, and the rules' candidates (the digits the givens leave each cell) as token masks."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
from tokenizers import Tokenizer as RustTokenizer
from tokenizers import decoders, models, pre_tokenizers, processors

from .puzzles import CELLS, PEERS

SPECIAL = ["<pad>", "<eos>", "<bos>", "<unk>"]
CELL_TOKENS = [f"r{c // 9 + 1}c{c % 9 + 1}={d or '.'}" for c in range(81) for d in range(10)]
VOCAB = {token: index for index, token in enumerate([*SPECIAL, *CELL_TOKENS])}
CELL_BASE = len(SPECIAL)  # the token of cell c holding d (0: empty) is CELL_BASE + 10 * c + d: `cell_token`
VOCAB_SIZE = len(VOCAB)
CANVAS = CELLS
PEER_MATRIX = torch.zeros(CELLS, CELLS)  # [cell, peer] 1.0 where the two share a row, a column or a box
for _cell, _peers in enumerate(PEERS):
    PEER_MATRIX[_cell, list(_peers)] = 1.0


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


def write_tokenizer(folder: Path) -> None:
    """The sudoku vocabulary in the checkpoint layout (tokenizer.json and its config, no chat template)."""
    tokenizer().save(str(folder / "tokenizer.json"))
    settings = {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>"}
    (folder / "tokenizer_config.json").write_text(json.dumps(settings, indent=2), encoding="utf-8")
    (folder / "chat_template.jinja").unlink(missing_ok=True)
