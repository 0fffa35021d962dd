"""Sudoku: puzzle generation, the file format, clamped solving and the evaluation report."""

import json
import random

import pytest

import diffgemma
from diffgemma import DiffGemmaError
from diffgemma.cli import main
from diffgemma.tasks import sudoku


@pytest.mark.parametrize("givens", [24, 30, 36])
def test_generated_puzzles_have_one_solution(givens):
    rng = random.Random(givens)
    puzzle, solution = sudoku.make_puzzle(rng, givens)
    assert sum(1 for v in puzzle if v) == givens
    assert sudoku.is_solution(solution, puzzle)
    assert sudoku.solve(puzzle, limit=2) == [solution]


def test_solver_finds_multiple_solutions_of_an_empty_grid():
    assert len(sudoku.solve([0] * 81, limit=2)) == 2


def test_parse_formats_and_errors(tmp_path):
    rng = random.Random(1)
    puzzle, _ = sudoku.make_puzzle(rng, 30)
    text = sudoku.format_grid(puzzle)
    assert sudoku.parse(text.replace("0", ".") + "\tsolution or notes") == puzzle
    with pytest.raises(DiffGemmaError, match="expected 81 characters"):
        sudoku.parse("123")
    broken = "11" + text[2:]
    with pytest.raises(DiffGemmaError, match="break the rules"):
        sudoku.parse(broken)
    path = tmp_path / "puzzles.txt"
    path.write_text(text + "\n\n" + text.replace("0", ".") + "\n")
    assert sudoku.read_puzzles(path) == [puzzle, puzzle]
    path.write_text("not a puzzle\n")
    with pytest.raises(DiffGemmaError, match=r"puzzles.txt:1: expected 81"):
        sudoku.read_puzzles(path)


def test_tokenizer_round_trip():
    tokenizer = sudoku.tokenizer()
    grid = sudoku.random_solution(random.Random(2))
    ids = tokenizer.encode(sudoku.format_grid(grid)).ids
    assert ids == sudoku.prompt_ids(grid)
    assert sudoku.grid_from_ids(sudoku.response_ids(grid)) == grid


@pytest.fixture(scope="module")
def sudoku_model(tmp_path_factory):
    from diffgemma.presets import random_checkpoint

    folder = random_checkpoint(tmp_path_factory.mktemp("sudoku") / "model", preset="sudoku", seed=0)
    sudoku.write_tokenizer(folder)
    model = diffgemma.load(folder)
    model.settings = model.settings.replace(max_denoising_steps=4, eos_token_id=[])
    return model


def test_clamped_solving_keeps_every_given(sudoku_model):
    rng = random.Random(3)
    puzzles = [sudoku.make_puzzle(rng, 30)[0] for _ in range(3)]
    outcome = sudoku.solve_batch(sudoku_model, puzzles, seed=1)
    for puzzle, grid in zip(puzzles, outcome.grids, strict=True):
        assert all(grid[c] == puzzle[c] for c in range(81) if puzzle[c])
    metrics = sudoku.evaluate(sudoku_model, puzzles, batch_size=2)
    assert metrics["givens_kept_rate"] == 1.0 and metrics["n"] == 3
    assert set(metrics) >= {"solved_rate", "cell_accuracy", "givens_kept_rate", "mean_steps", "n", "per_givens"}


def test_eval_command_json(sudoku_model, tmp_path, capsys):
    rng = random.Random(4)
    path = tmp_path / "p.txt"
    path.write_text("\n".join(sudoku.format_grid(sudoku.make_puzzle(rng, 34)[0]) for _ in range(2)) + "\n")
    code = main(
        ["eval", "sudoku", "--puzzles", str(path), "--model", str(sudoku_model.folder), "--json", "--steps", "3"]
    )
    report = json.loads(capsys.readouterr().out)
    assert code == 0 and report["n"] == 2 and report["givens_kept_rate"] == 1.0
