"""Sudoku: puzzle generation, the file format, clamped solving and the evaluation report."""

import json
import random

import pytest
import torch

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


def test_token_format_round_trip():
    tokenizer = sudoku.tokenizer()
    puzzle, grid = sudoku.make_puzzle(random.Random(2), 30)
    response = sudoku.response_ids(grid)
    assert len(response) == sudoku.CANVAS and sudoku.grid_from_ids(response) == grid
    text = tokenizer.decode(response)
    assert text.startswith(f"<r1c1>{grid[0]}<r1c2>{grid[1]}") and text.endswith(f"<r9c9>{grid[80]}")
    assert tokenizer.encode(text, add_special_tokens=False).ids == response
    prompt = tokenizer.decode(sudoku.prompt_ids(puzzle), skip_special_tokens=True)
    assert prompt.startswith(f"r1c1={puzzle[0] or '.'}") and tokenizer.get_vocab_size() == sudoku.VOCAB_SIZE
    # the clamp fixes every marker and every given, and frees exactly the empty cells' digits
    clamp = sudoku.clamp_ids(puzzle)
    assert [c for c, r in zip(clamp, response, strict=True) if c != -1] == [
        r for i, r in enumerate(response) if i % 2 == 0 or puzzle[i // 2]
    ]
    assert clamp.count(-1) == puzzle.count(0)


def test_symmetries_keep_puzzles_valid_and_unique():
    rng = random.Random(6)
    puzzle, solution = sudoku.make_puzzle(rng, 28)
    for _ in range(5):
        symmetry = sudoku.random_symmetry(rng)
        moved, moved_solution = sudoku.apply_symmetry(puzzle, symmetry), sudoku.apply_symmetry(solution, symmetry)
        assert sudoku.is_solution(moved_solution, moved) and sudoku.solve(moved, 2) == [moved_solution]
        assert sum(1 for v in moved if v) == 28


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


@pytest.mark.parametrize("objective", ["diffusion", "autoregressive"])
def test_train_command_checkpoints_and_evaluates(tmp_path, capsys, objective):
    out = tmp_path / objective
    command = ["train", "sudoku", "--out", str(out), "--steps", "2", "--batch-size", "4", "--pool", "6"]
    command += ["--eval-every", "2", "--eval-puzzles", "2", "--objective", objective]
    assert main(command) == 0
    printed = capsys.readouterr().out
    assert "puzzle pool: 6 unique puzzles" in printed and "step 2: loss" in printed and "solved" in printed
    model = diffgemma.load(out)
    assert model.config.canvas_length == sudoku.CANVAS and model.config.vocab_size == sudoku.VOCAB_SIZE
    state = torch.load(out / "trainer_state.pt", weights_only=False)
    assert state["step"] == 2 and state["config"]["objective"] == objective


def test_autoregressive_baseline_report(sudoku_model):
    rng = random.Random(8)
    puzzles = [sudoku.make_puzzle(rng, 34)[0] for _ in range(2)]
    free = sudoku.solve_autoregressive(sudoku_model, puzzles, batch_size=2)
    forced = sudoku.solve_autoregressive(sudoku_model, puzzles, batch_size=2, clamp=True)
    assert free["n"] == forced["n"] == 2 and free["mean_steps"] == 81
    assert forced["givens_kept_rate"] == 1.0
