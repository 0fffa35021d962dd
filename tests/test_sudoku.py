"""Sudoku: puzzle generation, the file format, clamped solving and the evaluation report."""

import json
import random
from types import SimpleNamespace

import pytest
import torch

import diffgemma
from diffgemma import DiffGemmaError
from diffgemma.cli import main
from diffgemma.generate import Draft
from diffgemma.tasks import sudoku


@pytest.mark.parametrize("givens", [24, 30, 36])
def test_generated_puzzles_have_one_solution(givens):
    rng = random.Random(givens)
    puzzle, solution = sudoku.make_puzzle(rng, givens)
    assert sum(1 for v in puzzle if v) == givens
    assert sudoku.is_solution(solution, puzzle)
    assert sudoku.solve(puzzle, limit=2) == [solution]


def test_few_givens_come_from_thinning_only_where_the_passes_fall_short(monkeypatch):
    # 21 givens: a single pass rarely gets there (5 attempts here), so the closest puzzle is thinned
    puzzle, solution = sudoku.make_puzzle(random.Random(1), 21, attempts=5)
    assert sum(1 for v in puzzle if v) == 21
    assert sudoku.solve(puzzle, limit=2) == [solution]
    assert all(value in (0, solution[cell]) for cell, value in enumerate(puzzle))
    with pytest.raises(DiffGemmaError, match="down to 20"):  # below the floor: an error at once
        sudoku.make_puzzle(random.Random(1), 19, attempts=3)

    def never(*args):
        raise AssertionError("thinned a target the passes reach")

    monkeypatch.setattr(sudoku.puzzles, "_thin", never)  # seeds keep the puzzles they made before thinning existed
    rng = random.Random(2026)
    for _ in range(20):
        sudoku.make_puzzle(rng, rng.randint(24, 36))


def _segment_sets(grid: list[int]) -> int:
    """The most distinct row segments (a row's three cells in one box, as a set) any band holds, over the
    grid and its transpose: 3 for every image of one base pattern (each band repeats its rows' segments),
    up to 9 for a grid in general."""
    most = 0
    for cells in (grid, [grid[c * 9 + r] for r in range(9) for c in range(9)]):
        for band in range(3):
            rows = range(band * 3, band * 3 + 3)
            segments = {frozenset(cells[r * 9 + s * 3 : r * 9 + s * 3 + 3]) for r in rows for s in range(3)}
            most = max(most, len(segments))
    return most


def test_random_solutions_are_valid_and_not_images_of_one_pattern():
    def pattern_image(rng: random.Random) -> list[int]:  # the shortcut the generator must not take
        rows = [g * 3 + i for g in rng.sample(range(3), 3) for i in rng.sample(range(3), 3)]
        cols = [g * 3 + i for g in rng.sample(range(3), 3) for i in rng.sample(range(3), 3)]
        digits = rng.sample(range(1, 10), 9)
        return [digits[(3 * (r % 3) + r // 3 + c) % 9] for r in rows for c in cols]

    rng = random.Random(0)
    assert all(_segment_sets(pattern_image(rng)) == 3 for _ in range(20))  # the measure tells them apart
    grids = [sudoku.random_solution(rng) for _ in range(40)]
    assert all(sudoku.is_solution(grid) for grid in grids) and len({tuple(g) for g in grids}) == 40
    assert sum(_segment_sets(grid) > 3 for grid in grids) >= 30


def test_solver_finds_multiple_solutions_of_an_empty_grid():
    assert len(sudoku.solve([0] * 81, limit=2)) == 2


def test_parse_formats_and_errors(tmp_path):
    rng = random.Random(1)
    puzzle, _ = sudoku.make_puzzle(rng, 30)
    text = sudoku.format_grid(puzzle)
    assert sudoku.parse(text.replace("0", ".") + "\tsolution or notes") == puzzle
    with pytest.raises(DiffGemmaError, match="expected 81 cells"):
        sudoku.parse("123")
    broken = "11" + text[2:]
    with pytest.raises(DiffGemmaError, match="break the rules"):
        sudoku.parse(broken)
    # the rules kept, but the first row's last cell sees all nine digits (1-8 in its row, a 9 in its column)
    with pytest.raises(DiffGemmaError, match="no solution: row 1, column 9 can hold no digit"):
        sudoku.parse("12345678." + "........9" + "." * 63)
    for bad, said in (([0] * 80, "a list of 80"), (text, "a str"), (None, "a NoneType"), ([10] * 81, "a list of 81")):
        with pytest.raises(DiffGemmaError, match=f"expected 81 integers from 0 \\(empty\\) to 9 .* got {said}"):
            sudoku.check_puzzle(bad)  # (what the solvers check their puzzles with: an IndexError, before)
    path = tmp_path / "puzzles.txt"
    path.write_text(text + "\n\n" + text.replace("0", ".") + "\n")
    assert sudoku.read_puzzles(path) == [puzzle, puzzle]
    path.write_text("not a puzzle\n")
    with pytest.raises(DiffGemmaError, match=r"puzzles.txt:1: expected 81"):
        sudoku.read_puzzles(path)
    # as collections write them: a CSV of puzzles and solutions with its header, '_' or '*' for empty cells,
    # or a grid drawn over nine lines with its boxes ruled
    solution = sudoku.format_grid(sudoku.solve(puzzle, limit=1)[0])
    path.write_text(f"quizzes,solutions\n{text},{solution}\n{text.replace('0', '_')}\n{text.replace('0', '*')}\n")
    assert sudoku.read_puzzles(path) == [puzzle] * 3
    rows = [text[9 * r : 9 * r + 9].replace("0", ".") for r in range(9)]
    drawn = [" ".join(row[:3]) + " | " + " ".join(row[3:6]) + " | " + " ".join(row[6:]) for row in rows]
    drawn = [*drawn[:3], "------+-------+------", *drawn[3:6], "------+-------+------", *drawn[6:]]
    assert sudoku.parse("\n".join(drawn)) == puzzle


def test_token_format_round_trip():
    tokenizer = sudoku.tokenizer()
    puzzle, grid = sudoku.make_puzzle(random.Random(2), 30)
    response = sudoku.response_ids(grid)
    assert len(response) == sudoku.CANVAS and sudoku.grid_from_ids(response) == grid
    text = tokenizer.decode(response)
    assert text.startswith(f"r1c1={grid[0]}r1c2={grid[1]}") and text.endswith(f"r9c9={grid[80]}")
    assert tokenizer.encode(text, add_special_tokens=False).ids == response
    assert tokenizer.get_vocab_size() == sudoku.VOCAB_SIZE == 814
    prompt = tokenizer.decode(sudoku.autoregressive_prompt_ids(puzzle), skip_special_tokens=True)
    assert prompt.startswith(f"r1c1={puzzle[0] or '.'}") and sudoku.prompt_ids() == [sudoku.VOCAB["<bos>"]]
    # the clamp fixes every given and frees exactly the empty cells; each range holds its cell's nine digits
    clamp = sudoku.clamp_ids(puzzle)
    assert [c for c in clamp if c != -1] == [r for r, v in zip(response, puzzle, strict=True) if v]
    assert clamp.count(-1) == puzzle.count(0)
    ranges = sudoku.cell_ranges()
    assert all(low <= token < high and high - low == 9 for token, (low, high) in zip(response, ranges, strict=True))
    # a token of another cell, or the empty token, reads as empty
    assert sudoku.grid_from_ids([response[1], *response[1:]])[0] == 0
    assert sudoku.grid_from_ids(sudoku.cell_ids([0] * 81)) == [0] * 81


def moved_by(grid: list[int], order: torch.Tensor, digits: torch.Tensor) -> list[int]:
    return [int(digits[grid[cell]]) for cell in order.tolist()]


def test_symmetries_keep_puzzles_valid_and_unique():
    puzzle, solution = sudoku.make_puzzle(random.Random(6), 28)
    order, digits = sudoku.random_symmetries(5, torch.Generator().manual_seed(6), "cpu")
    for row in range(5):
        moved, moved_solution = moved_by(puzzle, order[row], digits[row]), moved_by(solution, order[row], digits[row])
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


def test_given_bans_are_the_digits_a_given_peer_holds():
    rng = random.Random(8)
    puzzles = [sudoku.make_puzzle(rng, givens)[0] for givens in (24, 30, 36)]
    bans = sudoku.given_bans(puzzles)
    assert bans.shape == (3, 81, sudoku.VOCAB_SIZE) and bans.dtype == torch.bool
    for puzzle, ban in zip(puzzles, bans, strict=True):
        solution = sudoku.solve(puzzle, 1)[0]
        expected = torch.zeros_like(ban)
        for cell in range(81):
            if puzzle[cell] == 0:
                for peer in sudoku.PEERS[cell]:
                    if puzzle[peer]:
                        expected[cell, sudoku.cell_token(cell, puzzle[peer])] = True
                assert not ban[cell, sudoku.cell_token(cell, solution[cell])]
        assert torch.equal(ban, expected) and 0 < int(ban.sum()) < 9 * puzzle.count(0)


def test_candidates_keep_ruled_out_digits_off_the_board(sudoku_model):
    puzzles = [sudoku.make_puzzle(random.Random(9), 24)[0]]
    bans = sudoku.given_bans(puzzles)[0]

    def ruled_out(grid: list[int]) -> int:
        return sum(bool(bans[c, sudoku.cell_token(c, v)]) for c, v in enumerate(grid) if v and not puzzles[0][c])

    events = list(sudoku_model.stream(seed=4, **sudoku.solver_inputs(puzzles)))
    drafts = [sudoku.grid_from_ids(e.ids[0].tolist()) for e in events if isinstance(e, Draft)]
    assert len(drafts) == 4 and all(ruled_out(grid) == 0 for grid in drafts)
    assert ruled_out(sudoku.solve_batch(sudoku_model, puzzles, seed=4).grids[0]) == 0
    assert ruled_out(sudoku.solve_batch(sudoku_model, puzzles, seed=4, candidates=False).grids[0]) > 0
    # the left-to-right decoding takes the same bans (any network of this format decodes that way too)
    (banned_row,) = sudoku.autoregressive_rows(sudoku_model, puzzles, clamp=True, candidates=True)
    (free_row,) = sudoku.autoregressive_rows(sudoku_model, puzzles, clamp=True)
    assert ruled_out(banned_row["grid"]) == 0 and ruled_out(free_row["grid"]) > 0


def test_tries_resolve_only_rule_breaking_grids(sudoku_model, monkeypatch):
    rng = random.Random(5)
    puzzles = [sudoku.make_puzzle(rng, 30)[0] for _ in range(3)]
    solved = sudoku.solve(puzzles[1], 1)[0]
    calls: list[list[int]] = []
    real = sudoku.solve_batch

    def fake(model, chunk, seed, **sampler):  # puzzle 1 "solved" on its first try, the others never
        calls.append(list(seed))
        outcome = real(model, chunk, seed=seed, **sampler)
        grids = [solved if p == puzzles[1] else g for p, g in zip(chunk, outcome.grids, strict=True)]
        return sudoku.SolveOutcome(grids, outcome.steps)

    monkeypatch.setattr(sudoku.solver, "solve_batch", fake)
    rows = sudoku.evaluate_rows(sudoku_model, puzzles, batch_size=2, seed=10, tries=3)
    assert calls[:2] == [[10, 11], [12]]  # the first try: seed + i
    assert calls[2:] == [[10 + 1_000_003, 12 + 1_000_003], [10 + 2_000_006, 12 + 2_000_006]]
    assert rows[1]["solved"] and rows[1]["steps"] <= 4 and rows[0]["steps"] >= 3 and not rows[0]["solved"]
    assert [r["tries"] for r in rows] == [3, 1, 3]
    summary = sudoku.summarize(rows)
    assert summary["first_try_solved_rate"] == pytest.approx(1 / 3) and summary["mean_tries"] == pytest.approx(7 / 3)
    # going on from a one-try run's rows: its grids stand, the first try is not solved again
    calls.clear()
    first = sudoku.evaluate_rows(sudoku_model, puzzles, batch_size=2, seed=10, tries=1)
    assert calls == [[10, 11], [12]]
    calls.clear()
    resumed = sudoku.evaluate_rows(sudoku_model, puzzles, batch_size=2, seed=10, tries=3, previous=first)
    assert calls == [[10 + 1_000_003, 12 + 1_000_003], [10 + 2_000_006, 12 + 2_000_006]]
    assert resumed == rows
    with pytest.raises(DiffGemmaError, match="tries"):
        sudoku.evaluate(sudoku_model, puzzles, tries=0)
    with pytest.raises(DiffGemmaError, match="previous rows: 1 for 3 puzzles"):
        sudoku.evaluate_rows(sudoku_model, puzzles, tries=2, previous=first[:1])


def test_sudoku_command_tries_again_while_the_grid_breaks_a_rule(sudoku_model, capsys):
    folder = str(sudoku_model.folder)
    assert main(["sudoku", "--model", folder, "--seed", "1", "--givens", "34", "--steps", "2", "--tries", "2"]) == 0
    printed = capsys.readouterr().out
    assert "not solved (try 2, 2 steps, 4 in all)" in printed  # a random model
    assert len(printed.strip().splitlines()[-1]) == 81
    assert main(["sudoku", "--model", folder, "--tries", "0"]) == 2
    assert "--tries must be at least 1" in capsys.readouterr().err


def test_eval_command_json(sudoku_model, tmp_path, capsys):
    rng = random.Random(4)
    path = tmp_path / "p.txt"
    path.write_text("\n".join(sudoku.format_grid(sudoku.make_puzzle(rng, 34)[0]) for _ in range(2)) + "\n")
    code = main(
        ["eval", "sudoku", "--puzzles", str(path), "--model", str(sudoku_model.folder), "--json", "--steps", "3"]
    )
    report = json.loads(capsys.readouterr().out)
    assert code == 0 and report["n"] == 2 and report["givens_kept_rate"] == 1.0
    # by default the solver's tries: a grid that breaks a rule is solved again, up to SOLVE_TRIES times
    assert 1 <= report["mean_tries"] <= sudoku.SOLVE_TRIES
    assert report["first_try_solved_rate"] <= report["solved_rate"]
    unsolved = report["n"] * (1 - report["solved_rate"])
    assert report["mean_tries"] * report["n"] >= report["n"] + unsolved * (sudoku.SOLVE_TRIES - 1) - 1e-9


def test_no_candidates_option_reaches_the_solver(sudoku_model, tmp_path, monkeypatch, capsys):
    calls: list[int] = []
    real = sudoku.given_bans
    monkeypatch.setattr(sudoku.solver, "given_bans", lambda puzzles: calls.append(len(puzzles)) or real(puzzles))
    path = tmp_path / "p.txt"
    path.write_text("\n".join(sudoku.format_grid(sudoku.make_puzzle(random.Random(4), 34)[0]) for _ in range(2)))
    common = ["--model", str(sudoku_model.folder), "--steps", "2", "--tries", "1"]
    assert main(["eval", "sudoku", "--puzzles", str(path), "--no-candidates", *common]) == 0 and calls == []
    assert main(["sudoku", "--seed", "1", "--no-candidates", *common]) == 0 and calls == []
    assert main(["eval", "sudoku", "--puzzles", str(path), *common]) == 0 and calls == [2]
    assert main(["sudoku", "--seed", "1", *common]) == 0 and calls == [2, 1]
    capsys.readouterr()


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
    # a resumed run goes on to the longer schedule, and its checkpoints still say a grid has no EOS
    assert main([*command[:4], "--resume", "--steps", "3", *command[6:]]) == 0
    assert torch.load(out / "trainer_state.pt", weights_only=False)["step"] == 3
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] is None
    # other data or seed would not continue this run: refused, and the run is left as it was
    for option, said in [("--seed", "seed 0 (now 5)"), ("--pool", "pool 6 (now 5)")]:
        assert main([*command[:4], "--resume", "--steps", "4", *command[6:], option, "5"]) == 2
        assert said in capsys.readouterr().err
    assert main([*command[:4], "--resume", "--steps", "4", *command[6:], "--self-conditioning-passes", "2"]) == 2
    assert "self_conditioning_passes 1 (now 2)" in capsys.readouterr().err
    assert torch.load(out / "trainer_state.pt", weights_only=False)["step"] == 3


def test_train_command_init_starts_from_a_checkpoint(sudoku_model, tmp_path, capsys):
    from diffgemma.presets import random_checkpoint

    out = tmp_path / "stage2"
    command = ["train", "sudoku", "--out", str(out), "--steps", "1", "--batch-size", "2", "--pool", "4"]
    command += ["--eval-every", "0", "--lr", "0"]  # a zero learning rate: the weights must arrive unchanged
    assert main([*command, "--init", str(sudoku_model.folder)]) == 0
    started, source = diffgemma.load(out).network.state_dict(), sudoku_model.network.state_dict()
    assert started.keys() == source.keys() and all(torch.equal(started[k], source[k]) for k in source)
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] is None  # a grid has no EOS
    assert (out / "tokenizer.json").read_text() == (sudoku_model.folder / "tokenizer.json").read_text()
    assert main([*command, "--init", str(random_checkpoint(tmp_path / "tiny", preset="tiny"))]) == 2
    assert "not a sudoku model of this format" in capsys.readouterr().err
    assert main([*command, "--init", str(sudoku_model.folder), "--resume"]) == 2
    assert "--init starts a new one" in capsys.readouterr().err
    fresh = [*command[:2], "--out", str(tmp_path / "never"), *command[4:], "--init", str(sudoku_model.folder)]
    assert main([*fresh, "--self-conditioning-passes", "0"]) == 2
    assert "passes must be at least 1" in capsys.readouterr().err and not (tmp_path / "never").exists()
    for bad, said in [("30:24", "low first"), ("12:20", "within 17-81"), ("many", "must look like 24:36")]:
        assert main([*fresh, "--givens", bad]) == 2
        assert said in capsys.readouterr().err and not (tmp_path / "never").exists()


def test_train_command_deepens_the_init_and_trains_the_new_layers(sudoku_model, tmp_path, capsys):
    out = tmp_path / "deeper"
    command = ["train", "sudoku", "--out", str(out), "--steps", "2", "--batch-size", "2", "--pool", "4"]
    command += ["--eval-every", "0", "--init", str(sudoku_model.folder)]
    assert main([*command, "--layers", "12"]) == 0
    deeper = diffgemma.load(out).network
    assert deeper.config.num_hidden_layers == 12
    # the repeats start switched off (zero post-norm scales) and the first steps turn them on
    assert all(layer.post_feedforward_layernorm.weight.abs().max() > 0 for layer in deeper.layers[6:])
    assert main([*command[:2], "--out", str(tmp_path / "never"), *command[4:], "--layers", "5"]) == 2
    assert "already has 6 layers" in capsys.readouterr().err and not (tmp_path / "never").exists()


def test_puzzles_command_makes_puzzles_in_the_range_and_refuses_others(capsys):
    assert main(["sudoku-puzzles", "3", "--givens", "30:31", "--seed", "2"]) == 0
    lines = capsys.readouterr().out.split()
    assert len(lines) == 3 and {81 - line.count("0") for line in lines} <= {30, 31}
    assert main(["sudoku-puzzles", "3", "--givens", "31:30"]) == 2
    assert "low first" in capsys.readouterr().err


def test_train_command_givens_set_the_pool(sudoku_model, tmp_path):
    pool_file = tmp_path / "pool.txt"
    command = ["train", "sudoku", "--out", str(tmp_path / "hard"), "--steps", "1", "--batch-size", "2"]
    command += ["--pool", "5", "--eval-every", "0", "--init", str(sudoku_model.folder), "--pool-file", str(pool_file)]
    assert main([*command, "--givens", "28:29"]) == 0
    puzzles = [line.split("\t")[0] for line in pool_file.read_text().splitlines()[1:]]
    assert len(puzzles) == 5 and {81 - p.count(".") - p.count("0") for p in puzzles} <= {28, 29}
    state = torch.load(tmp_path / "hard" / "trainer_state.pt", weights_only=False)
    assert [list(value) for name, value in state["config"]["recipe"] if name == "givens"] == [[28, 29]]


def test_a_pool_under_22_givens_says_it_is_slow_to_make(sudoku_model, tmp_path, capsys):
    command = ["train", "sudoku", "--out", str(tmp_path / "harder"), "--steps", "1", "--batch-size", "1"]
    command += ["--pool", "1", "--eval-every", "0", "--init", str(sudoku_model.folder), "--givens", "21:21"]
    assert main(command) == 0
    captured = capsys.readouterr()
    assert "puzzles under 22 givens take seconds each to make" in captured.out + captured.err


def test_solving_refuses_a_model_of_another_format(tmp_path):
    from diffgemma.presets import random_checkpoint

    other = diffgemma.load(random_checkpoint(tmp_path / "tiny", preset="tiny"))
    with pytest.raises(DiffGemmaError, match="not a sudoku model of this format"):
        sudoku.solve_batch(other, [sudoku.make_puzzle(random.Random(1), 30)[0]])


def test_autoregressive_baseline_report(sudoku_model):
    rng = random.Random(8)
    puzzles = [sudoku.make_puzzle(rng, 34)[0] for _ in range(2)]
    free = sudoku.solve_autoregressive(sudoku_model, puzzles, batch_size=2)
    forced = sudoku.solve_autoregressive(sudoku_model, puzzles, batch_size=2, clamp=True)
    assert free["n"] == forced["n"] == 2 and free["mean_steps"] == 81
    assert forced["givens_kept_rate"] == 1.0


def test_device_batches_corrupt_only_free_cells_and_repeat_by_index():
    pool = sudoku.puzzle_pool(1, 4, (26, 32))
    batches = sudoku.DeviceBatches(pool, 64, seed=5, device="cpu")
    batch = batches(3)
    assert torch.equal(batch.noisy, batches(3).noisy) and not torch.equal(batch.noisy, batches(4).noisy)
    assert int(batch.canvas_start[0]) == batch.response_start == 1 and bool((batch.ids[:, 0] == 2).all())
    assert torch.equal(batch.ids[:, 1:], batch.clean) and batch.tokens == batch.ids.numel()
    low, high = torch.tensor(sudoku.cell_ranges()).unbind(-1)
    assert bool(((batch.noisy >= low) & (batch.noisy < high)).all())  # every canvas token a digit of its cell
    # the baseline's batches draw the same boards and noise, with the puzzle in the prompt
    baseline = sudoku.DeviceBatches(pool, 64, seed=5, device="cpu", autoregressive=True)(3)
    assert int(baseline.canvas_start[0]) == baseline.response_start == 82
    assert torch.equal(baseline.noisy, batch.noisy) and torch.equal(baseline.ids[:, 82:], batch.clean)
    cells = baseline.ids[:, 1:82] - sudoku.CELL_BASE
    assert torch.equal(cells.div(10, rounding_mode="floor"), torch.arange(81).expand(64, 81))
    puzzles = cells.remainder(10)
    for row in range(8):
        solution = sudoku.grid_from_ids(batch.clean[row].tolist())
        assert sudoku.solve(puzzles[row].tolist(), 2) == [solution]  # a symmetric image of a pool puzzle: unique
    givens = puzzles > 0
    assert torch.equal(batch.noisy[givens], batch.clean[givens]) and bool(batch.keep[givens].all())
    kept = (batch.keep & ~givens).sum(1) / (~givens).sum(1)
    assert float((kept - (1 - batch.t)).abs().mean()) < 0.1


def test_device_batches_draw_detached_passes_without_moving_the_data():
    pool = sudoku.puzzle_pool(1, 4, (26, 32))
    plain = sudoku.DeviceBatches(pool, 8, seed=5, device="cpu")
    recycled = sudoku.DeviceBatches(pool, 8, seed=5, device="cpu", max_detached_passes=3)
    drawn = set()
    for index in range(40):
        a, b = plain(index), recycled(index)
        for field in ("ids", "noisy", "keep", "t", "use_self_conditioning"):
            assert torch.equal(getattr(a, field), getattr(b, field))
        assert a.detached_passes == 1 and b.detached_passes == recycled(index).detached_passes
        drawn.add(b.detached_passes)
    assert drawn == {1, 2, 3}
    with pytest.raises(DiffGemmaError, match="at least 1"):
        sudoku.DeviceBatches(pool, 8, seed=5, device="cpu", max_detached_passes=0)


def test_random_symmetries_match_the_group():
    generator = torch.Generator().manual_seed(0)
    order, digits = sudoku.random_symmetries(200, generator, "cpu")
    assert torch.equal(order.sort(dim=1).values, torch.arange(81).expand(200, 81))
    assert (digits[:, 0] == 0).all() and torch.equal(
        digits[:, 1:].sort(dim=1).values, torch.arange(1, 10).expand(200, 9)
    )
    _, solution = sudoku.make_puzzle(random.Random(1), 30)
    for row in range(20):
        assert sudoku.is_solution(moved_by(solution, order[row], digits[row]))
    transposed = order[:, 0] % 9 == order[:, 1] % 9  # the board's first two cells came from one column
    assert 0.35 < float(transposed.float().mean()) < 0.65


def test_puzzle_pool_is_the_same_from_workers_and_cache(tmp_path):
    cache = tmp_path / "pool.txt"
    made = sudoku.puzzle_pool(2, 6, (30, 34), workers=2, cache=cache)
    assert made == sudoku.puzzle_pool(2, 6, (30, 34)) == sudoku.puzzle_pool(2, 4, (30, 34), cache=cache) + made[4:]
    assert sudoku.puzzle_pool(3, 2, (30, 34), cache=cache) != made[:2]  # another seed does not read the cache


def test_a_time_budget_sizes_the_run_from_its_first_steps(tmp_path, monkeypatch):
    monkeypatch.setattr(sudoku.training, "PROBE_STEPS", 6)
    lines: list[str] = []
    losses = sudoku.train_sudoku(
        tmp_path / "run", batch_size=2, seconds=4, pool_size=4, eval_every=0, log=lines.append, givens=(30, 34)
    )
    sized = next(line for line in lines if line.startswith("timed"))
    planned = int(sized.split("reproduce with steps=")[1].rstrip(")"))
    assert planned >= 7 and 6 < len(losses) <= planned
    state = torch.load(tmp_path / "run" / "trainer_state.pt", weights_only=False)
    assert state["step"] == len(losses) and state["config"]["steps"] == planned


def test_candidate_tokens_follow_the_rules_from_the_givens():
    rng = random.Random(8)
    puzzles = [sudoku.make_puzzle(rng, givens)[0] for givens in (24, 30, 36)]
    grids = torch.tensor(puzzles)
    allowed, prior, bans = sudoku.candidate_tokens(grids), sudoku.candidate_prior(grids), sudoku.given_bans(puzzles)
    for puzzle, allow, probs, ban in zip(puzzles, allowed, prior, bans, strict=True):
        solution = sudoku.solve(puzzle, 1)[0]
        for cell in range(81):
            low, high = sudoku.cell_token(cell, 1), sudoku.cell_token(cell, 9) + 1
            assert not allow[cell, :low].any() and not allow[cell, high:].any()  # only the cell's digits
            assert allow[cell, sudoku.cell_token(cell, solution[cell])]
            if puzzle[cell]:
                assert int(allow[cell].sum()) == 1  # a given is certain
            else:
                assert torch.equal(allow[cell, low:high], ~ban[cell, low:high])  # the candidates `given_bans` leaves
            assert torch.allclose(
                probs[cell][allow[cell]], torch.full((int(allow[cell].sum()),), 1 / allow[cell].sum())
            )
        assert torch.equal(probs > 0, allow)


def test_a_candidate_prior_model_is_trained_and_solves_with_its_prior(sudoku_model, tmp_path, monkeypatch, capsys):
    pool = sudoku.puzzle_pool(1, 4, (26, 32))
    batch = sudoku.DeviceBatches(pool, 8, seed=5, device="cpu", candidate_prior=True)(2)
    plain = sudoku.DeviceBatches(pool, 8, seed=5, device="cpu")(2)
    assert plain.self_conditioning_prior is None and torch.equal(plain.noisy, batch.noisy)
    warm = sudoku.DeviceBatches(pool, 8, seed=5, device="cpu", max_detached_passes=3, draft_temperatures=(0.4, 0.8))
    recycled = sudoku.DeviceBatches(pool, 8, seed=5, device="cpu", max_detached_passes=3)
    temperatures = torch.cat([warm(i).draft_temperature for i in range(20)])
    assert plain.draft_temperature is None and 0.4 <= float(temperatures.min()) < float(temperatures.max()) <= 0.8
    assert all(warm(i).detached_passes == recycled(i).detached_passes for i in range(20))  # data and draws unmoved
    assert torch.equal(warm(2).noisy, batch.noisy)
    prior = batch.self_conditioning_prior
    assert bool((prior.gather(-1, batch.clean[..., None]) > 0).all())  # the solution is always a candidate
    # certain: the givens (26-32 a board) and any empty cell they leave one candidate, each of its solution
    certain = prior.max(-1).values == 1
    assert bool((certain.sum(-1) >= 26).all()) and bool((certain.sum(-1) < 81).all())
    assert bool((prior.gather(-1, batch.clean[..., None])[..., 0][certain] == 1).all())
    out = tmp_path / "prior"
    command = ["train", "sudoku", "--out", str(out), "--steps", "1", "--batch-size", "2", "--pool", "4"]
    assert main([*command, "--eval-every", "0", "--init", str(sudoku_model.folder), "--candidate-prior"]) == 0
    said = capsys.readouterr()
    assert "puzzle pool" in said.out and "solved" not in said.out  # --eval-every 0: no evaluation
    trained = diffgemma.load(out)
    assert sudoku.uses_candidate_prior(trained) and not sudoku.uses_candidate_prior(sudoku_model)
    state = torch.load(out / "trainer_state.pt", weights_only=False)
    assert ("candidate_prior", True) in [tuple(item) for item in state["config"]["recipe"]]
    later = tmp_path / "stage5"  # a later stage from it reads the prior too, unasked
    assert main(["train", "sudoku", "--out", str(later), *command[4:], "--eval-every", "0", "--init", str(out)]) == 0
    assert sudoku.uses_candidate_prior(diffgemma.load(later))
    never = [*command[:2], "--out", str(tmp_path / "never"), *command[4:], "--eval-every", "0"]
    for bad, said in [("0.8:0.4", "low first"), ("0:1", "above 0"), ("warm", "a range like 0.4:0.8")]:
        assert main([*never, "--draft-temperature", bad]) == 2
        assert said in capsys.readouterr().err and not (tmp_path / "never").exists()
    assert main([*never[:-1], "-1"]) == 2
    assert "must be 0" in capsys.readouterr().err and not (tmp_path / "never").exists()
    assert main([*never, "--objective", "autoregressive", "--candidate-prior"]) == 2
    assert "diffusion objective" in capsys.readouterr().err and not (tmp_path / "never").exists()
    puzzles = [sudoku.make_puzzle(random.Random(4), 28)[0]]
    firsts = []
    denoise = trained.network.denoise

    def recorded(canvas, cache, self_conditioning=None, *args, **kwargs):
        if not firsts:  # a copy: the loop refills the buffer it lent
            firsts.append(self_conditioning.clone())
        return denoise(canvas, cache, self_conditioning, *args, **kwargs)

    monkeypatch.setattr(trained.network, "denoise", recorded)
    grid = sudoku.solve_batch(trained, puzzles, seed=1).grids[0]
    assert torch.allclose(firsts[0], sudoku.candidate_prior(torch.tensor(puzzles)))
    allowed = sudoku.candidate_tokens(torch.tensor(puzzles))[0]
    assert all(allowed[c, sudoku.cell_token(c, v)] for c, v in enumerate(grid))  # candidates only, givens kept


def test_masked_cells_show_empty_in_training_and_solving(sudoku_model, tmp_path, monkeypatch):
    pool = sudoku.puzzle_pool(1, 4, (26, 32))
    plain = sudoku.DeviceBatches(pool, 16, seed=5, device="cpu")(2)
    masked = sudoku.DeviceBatches(pool, 16, seed=5, device="cpu", masked_cells=True)(2)
    for field in ("ids", "clean", "keep", "t", "use_self_conditioning"):
        assert torch.equal(getattr(plain, field), getattr(masked, field))  # the same data and draws
    empty = sudoku.cell_token(torch.arange(81), 0).expand(16, 81)
    assert torch.equal(masked.noisy[~masked.keep], empty[~masked.keep])  # every corrupted cell shows empty
    assert torch.equal(masked.noisy[masked.keep], plain.noisy[plain.keep])
    assert bool((plain.noisy[~plain.keep] != empty[~plain.keep]).all())  # while the recipe's noise is a digit
    out = tmp_path / "masked"
    command = ["train", "sudoku", "--out", str(out), "--steps", "1", "--batch-size", "2", "--pool", "4"]
    assert main([*command, "--eval-every", "0", "--init", str(sudoku_model.folder), "--masked-cells"]) == 0
    trained = diffgemma.load(out)
    assert sudoku.uses_masked_cells(trained) and not sudoku.uses_masked_cells(sudoku_model)
    later = tmp_path / "later"  # a later stage keeps it, unasked
    assert main(["train", "sudoku", "--out", str(later), *command[4:], "--eval-every", "0", "--init", str(out)]) == 0
    assert sudoku.uses_masked_cells(diffgemma.load(later))
    baseline = [*command[:3], str(tmp_path / "ar"), *command[4:], "--objective", "autoregressive"]
    assert main([*baseline, "--masked-cells"]) == 2
    assert not (tmp_path / "ar").exists()
    puzzle = sudoku.make_puzzle(random.Random(8), 28)[0]
    free = torch.tensor(puzzle) == 0
    canvases = []
    denoise = trained.network.denoise

    def recorded(canvas, *args, **kwargs):
        canvases.append(canvas.clone())
        return denoise(canvas, *args, **kwargs)

    monkeypatch.setattr(trained.network, "denoise", recorded)
    grid = sudoku.solve_batch(trained, [puzzle], seed=2).grids[0]
    assert bool((canvases[0][0][free] == empty[0][free]).all())  # the first canvas: givens, the rest empty
    assert all(1 <= digit <= 9 for digit in grid) and all(p in (0, g) for p, g in zip(puzzle, grid, strict=True))
    for canvas in canvases[1:]:  # afterwards a free cell is empty or one of its digits, never another cell's
        offset = canvas[0] - sudoku.cell_token(torch.arange(81), 0)
        assert bool(((offset >= 0) & (offset <= 9)).all())


def test_a_puzzle_without_a_solution_is_refused_before_any_solving(capsys, monkeypatch):
    """A cell left no digit is refused by the solver's inputs too (the Python API), where it would reach
    generation with every token banned; `sudoku --puzzle` also refuses a puzzle no filling solves (here the
    first row's last two cells both need the 9: the 8 is in their box), before loading a model."""
    from diffgemma import cli

    dead = [1, 2, 3, 4, 5, 6, 7, 8, 0] + [0] * 8 + [9] + [0] * 63
    with pytest.raises(DiffGemmaError, match="puzzle 1: no solution: row 1, column 9"):
        sudoku.solve_batch(SimpleNamespace(), [sudoku.make_puzzle(random.Random(0), 30)[0], dead], seed=0)
    monkeypatch.setattr(cli.tasks, "_sudoku_model", lambda args: pytest.fail("a model was loaded"))
    unsolvable = "1234567.." + ".......8." + "." * 63
    assert sudoku.parse(unsolvable) and not sudoku.solve(sudoku.parse(unsolvable), 1)
    assert cli.main(["sudoku", "--puzzle", unsolvable]) == 2
    assert "--puzzle: has no solution" in capsys.readouterr().err
