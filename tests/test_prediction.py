"""A prediction of the output (OpenAI's predicted outputs): the canvases start from its tokens, not random ones."""

import random

import openai
import pytest
import torch
from assets.make_demo_model import ANSWERS
from test_open_batch import alone, run

import diffgemma
from diffgemma import DiffGemmaError
from diffgemma.cli import SUDOKU_MODEL
from diffgemma.generate import DecoderPass, predicted_start
from diffgemma.open_batch import BatchRow
from diffgemma.tasks.sudoku.puzzles import is_solution, make_puzzle
from diffgemma.tasks.sudoku.solver import model_solver_inputs
from diffgemma.tasks.sudoku.tokens import cell_ids, cell_token, grid_from_ids


@pytest.fixture(scope="module")
def sudoku_model():
    return diffgemma.load(SUDOKU_MODEL)


def first_canvases(monkeypatch, model, **asked) -> tuple[list[torch.Tensor], list[int]]:
    """The canvas each of a generation's canvases starts from (its first decoder pass's input), and the ids it
    generated."""
    seen, call = [], DecoderPass.__call__

    def spy(self, canvas, self_conditioning, step, *rest):
        if step == 1:
            seen.append(canvas.clone())
        return call(self, canvas, self_conditioning, step, *rest)

    monkeypatch.setattr(DecoderPass, "__call__", spy)
    length = model.config.canvas_length
    result = model.generate("x", seed=5, max_new_tokens=2 * length, max_denoising_steps=2, **asked)
    monkeypatch.undo()
    return seen, result.sequences[0, result.prompt_length :].tolist()


def test_each_canvas_starts_from_the_prediction_where_the_writing_has_come_to(tiny, monkeypatch):
    """The first canvas starts from the prediction's first ids, the next from the part that follows what the
    first canvas wrote (`predicted_start`); where the prediction has none (-1, or past its end) from the random
    ids it starts from without one; clamped ids win over both."""
    length = tiny.config.canvas_length
    predicted = [(7 * i) % 200 + 3 for i in range(length + 9)]
    predicted[4] = -1
    clamp = [-1, -1, 42]
    plain, _ = first_canvases(monkeypatch, tiny, clamp=clamp)
    started, written = first_canvases(monkeypatch, tiny, clamp=clamp, prediction=predicted)
    assert len(plain) == len(started) == 2
    for index, (canvas, noise) in enumerate(zip(started, plain, strict=True)):
        start = torch.tensor(predicted_start(predicted, written[: index * length], length))
        expected = torch.where(start >= 0, start, noise[0])
        if index == 0:
            expected[2] = 42
        assert torch.equal(canvas[0], expected), index
    assert torch.equal(started[0][0, 5:length], torch.tensor(predicted[5:length]))


def test_the_prediction_is_read_on_from_where_the_writing_has_come_to():
    """`predicted_start` aligns what a row has written with the prediction: the rest of the prediction moves
    by what the answer added or left out."""
    prediction = list(range(100, 120))
    assert predicted_start(prediction, [], 4) == [100, 101, 102, 103]
    assert predicted_start(prediction, prediction[:6], 4) == [106, 107, 108, 109]  # (as predicted)
    assert predicted_start(prediction, [100, 101, 7, 8, *prediction[2:6]], 4) == [106, 107, 108, 109]  # (added)
    assert predicted_start(prediction, [*prediction[:2], *prediction[5:9]], 4) == [109, 110, 111, 112]  # (left out)
    assert predicted_start(prediction, [*prediction[:5], 7], 4) == [106, 107, 108, 109]  # (one changed)
    assert predicted_start(prediction, [1, 2, 3], 4) == [103, 104, 105, 106]  # (nothing shared: as far)
    assert predicted_start(prediction, prediction[:18], 4) == [118, 119, -1, -1]  # (its end)


def test_a_prediction_of_each_row_and_bad_ones(tiny):
    """A batch takes one prediction for every row or one a row (a text or ids); what is not one is refused
    with a clear error."""
    rows = [[2, 10, 11], [2, 12]]
    predictions = [[20, 21], "ab"]
    each = tiny.generate(rows, max_new_tokens=8, seed=[1, 2], prediction=predictions)
    alone = [
        tiny.generate(row, max_new_tokens=8, seed=index + 1, prediction=predictions[index])
        for index, row in enumerate(rows)
    ]
    assert each.new_tokens == [result.new_tokens[0] for result in alone]
    long = [3 + i % 200 for i in range(3 * tiny.config.canvas_length)]  # (past the one canvas: left out)
    assert tiny.generate("x", max_new_tokens=8, seed=1, prediction=long).new_tokens[0]
    vocab = tiny.config.vocab_size
    for bad, message in [
        (3.5, "prediction must be a text or token ids, or 2 of them"),
        ([1, "a"], "a prediction must be a text or token ids"),
        ([[1], [2], [3]], "prediction must be a text or token ids, or 2 of them"),
        (torch.zeros(2, 2, 2, dtype=torch.long), "a prediction tensor must hold token ids"),
        (torch.zeros(3), "a prediction tensor must hold token ids"),
        ([vocab], "ids must be token ids below"),
    ]:
        with pytest.raises(DiffGemmaError, match=message):
            tiny.generate(rows, max_new_tokens=8, seed=1, prediction=bad)
    with pytest.raises(DiffGemmaError, match="thinking puts its thoughts there"):
        tiny.chat([{"role": "user", "content": "hi"}], enable_thinking=True, prediction="hello")


def test_a_mostly_right_sudoku_grid_settles_in_a_few_steps(sudoku_model):
    """The shipped sudoku model started from each puzzle's solution with a fifth of its empty cells wrong: every
    grid comes out solved, wrong cells mended, in far fewer steps than from noise."""
    rng = random.Random(3)
    pairs = [make_puzzle(rng, rng.randint(26, 30)) for _ in range(12)]
    puzzles = [puzzle for puzzle, _ in pairs]
    inputs = model_solver_inputs(sudoku_model, puzzles)
    seeds = list(range(100, 112))
    predicted = []
    for puzzle, solution in pairs:
        row = cell_ids(solution)
        for cell, given in enumerate(puzzle):
            if not given and rng.random() < 0.2:
                row[cell] = cell_token(cell, rng.choice([d for d in range(1, 10) if d != solution[cell]]))
        predicted.append(row)
    from_noise = sudoku_model.generate(seed=seeds, **inputs)
    from_prediction = sudoku_model.generate(seed=seeds, prediction=predicted, **inputs)
    grids = [grid_from_ids(row) for row in from_prediction.sequences[:, from_prediction.prompt_length :].tolist()]
    assert all(is_solution(grid, puzzle) for grid, puzzle in zip(grids, puzzles, strict=True))
    steps = from_prediction.steps[0]
    assert max(steps) <= 4 and sum(steps) * 2 < sum(from_noise.steps[0])


def test_an_open_batch_row_with_a_prediction_joins_as_alone(tiny):
    length = tiny.config.canvas_length
    base = BatchRow([2, 10, 11, 12], 2 * length, 7)
    predicted = BatchRow([2, 30, 31], length + 4, 8, prediction=list(range(40, 40 + length + 2)))
    batch = tiny.open_batch()
    batch.add(base)
    finished, _ = run(batch, {1: [predicted]})
    for index, row in enumerate([base, predicted]):
        kwargs = {"prediction": row.prediction} if row.prediction else {}
        assert (finished[index].new_tokens, finished[index].steps) == alone(tiny, row, **kwargs), index
    with pytest.raises(DiffGemmaError, match="prediction must be token ids"):
        batch.add(BatchRow([2], 4, 1, prediction=[5, tiny.config.vocab_size]))


def test_openais_prediction_field_and_its_usage(server, demo):
    """The OpenAI client's `prediction` reaches the canvas (the answer is the API's with the same prediction and
    seed); usage counts the prediction's tokens the answer kept in place and the rest, streamed or not; with
    thinking it is refused."""
    client = openai.OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0)
    question = "Why is the sky blue?"
    messages = [{"role": "user", "content": question}]
    guess = ANSWERS[question].replace("blue", "gray")
    expected = demo.chat(messages, seed=2, prediction=guess).content
    asked = dict(model="demo", messages=messages, seed=2, prediction={"type": "content", "content": guess})
    reply = client.chat.completions.create(**asked)
    assert reply.choices[0].message.content == expected
    details = reply.usage.completion_tokens_details
    answer = demo.prediction_ids(expected)
    kept = sum(a == b for a, b in zip(demo.prediction_ids(guess), answer, strict=False))
    assert details.accepted_prediction_tokens == kept and kept > 0
    assert details.accepted_prediction_tokens + details.rejected_prediction_tokens == len(demo.prediction_ids(guess))
    chunks = list(client.chat.completions.create(**asked, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
    assert chunks[-1].usage.completion_tokens_details == details
    parts = {"type": "content", "content": [{"type": "text", "text": guess}]}
    assert client.chat.completions.create(**{**asked, "prediction": parts}).choices[0].message.content == expected
    plain = client.chat.completions.create(model="demo", messages=messages, seed=2)
    assert plain.usage.completion_tokens_details is None  # (no prediction, no count)
    with pytest.raises(openai.BadRequestError, match="thinking puts its thoughts there"):
        client.chat.completions.create(**asked, extra_body={"enable_thinking": True})


def test_the_command_line_reads_a_prediction_file(demo, tmp_path, capsys):
    """`chat --prediction FILE` and `generate --prediction FILE` start the answer's canvas from the file's text:
    what the API gives for the same prediction and seed; where it cannot serve, it says so."""
    from diffgemma.cli import main

    question = "Why is the sky blue?"
    guess = tmp_path / "guess.txt"
    guess.write_text(ANSWERS[question].replace("blue", "gray"))
    model = ["--model", str(demo.folder), "--seed", "2", "--no-stream"]
    expected = demo.chat([{"role": "user", "content": question}], seed=2, prediction=guess.read_text())
    assert main(["chat", question, "--prediction", str(guess), *model]) == 0
    assert capsys.readouterr().out.strip() == expected.content
    generated = demo.generate("Once", seed=2, max_new_tokens=40, prediction=guess.read_text())
    assert main(["generate", "Once", "--prediction", str(guess), "--max-new-tokens", "40", *model]) == 0
    assert capsys.readouterr().out.rstrip("\n") == generated.text
    assert main(["chat", question, "--prediction", str(guess), "--think", *model]) == 2
    assert "thinking puts its thoughts there" in capsys.readouterr().err
    assert main(["chat", question, "--prediction", str(tmp_path / "none.txt"), *model]) == 2
    assert "file not found" in capsys.readouterr().err


def test_rewrite_asks_for_the_text_back_changed_starting_from_it(demo, monkeypatch):
    """`rewrite`: one chat turn (the system's ask for the whole text alone, the instruction, the text), its canvas
    started from the text (the prediction); a code fence around the answer comes off and the text's last newline
    stays."""
    from diffgemma.api import REWRITE_SYSTEM, _unfenced

    text = "def add(a, b):\n    return a + b\n"
    asked = {}
    chat = demo.chat

    def spy(messages, **settings):
        asked.update(messages=messages, **settings)
        return chat(messages, **settings)

    monkeypatch.setattr(demo, "chat", spy)
    reply = demo.rewrite(text, "  Rename add to plus. ", seed=3)
    assert asked["messages"] == [
        {"role": "system", "content": REWRITE_SYSTEM},
        {"role": "user", "content": "Rename add to plus.\n\n" + text},
    ]
    assert asked["prediction"] == demo.prediction_ids(text) and asked["seed"] == 3
    assert asked["max_new_tokens"] == 2 * len(demo.prediction_ids(text)) + demo.config.canvas_length
    answer = _unfenced(chat(asked["messages"], seed=3, max_new_tokens=asked["max_new_tokens"], prediction=text).content)
    assert reply.content == (answer if answer.endswith("\n") else answer + "\n")
    assert _unfenced("```python\nx = 1\ny = 2\n```") == "x = 1\ny = 2"
    assert _unfenced("no fence\n") == "no fence\n" and _unfenced("```inline```") == "```inline```"
    with pytest.raises(DiffGemmaError, match="a text and an instruction"):
        demo.rewrite(text, "  ")


def test_edit_with_an_instruction_prints_a_diff_or_writes(demo, tmp_path, capsys):
    """`edit FILE --instruction TEXT`: the rewrite as a unified diff (the file untouched), or with --write the
    file rewritten atomically beside a backup; --lines and --instruction are one or the other."""
    from diffgemma.cli import main

    path = tmp_path / "add.py"
    text = "def add(a, b):\n    return a + b\n"
    path.write_text(text)
    new = demo.rewrite(text, "Rename add to plus.", seed=4).content
    assert new != text
    model = ["--model", str(demo.folder), "--seed", "4"]
    assert main(["edit", str(path), "--instruction", "Rename add to plus.", *model]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"--- {path}\n+++ {path} (rewritten)\n@@ ") and path.read_text() == text
    assert all(f"-{line}" in out for line in text.splitlines())
    assert main(["edit", str(path), "--instruction", "Rename add to plus.", "--write", *model]) == 0
    assert path.read_text() == new and (tmp_path / "add.py.bak").read_text() == text
    with pytest.raises(SystemExit) as refused:
        main(["edit", str(path), "--instruction", "x", "--lines", "1:1", *model])
    assert refused.value.code == 2 and "not allowed with argument" in capsys.readouterr().err
