"""An open batch: rows join between canvases and leave when done, each giving what it gives alone."""

import pytest
import torch
from assets.make_demo_adapter import PIRATE as PIRATE_ANSWERS
from assets.make_demo_model import ANSWERS, FRUIT, SKY
from conftest import DEMO

import diffgemma
from diffgemma import DiffGemmaError
from diffgemma.generate import row_output, run_to_end
from diffgemma.open_batch import BatchRow, OpenBatch, RowFinished, RowsCommitted, RowsStep


def alone(model, row: BatchRow, **sampler):
    """What `stream` gives the row by itself, as a server runs a request: (new tokens, steps a canvas)."""
    clamp = None if row.clamp is None else torch.tensor([row.clamp])
    banned = [list(row.banned)] if row.banned else None
    result = run_to_end(
        model.stream(
            [row.prompt],
            max_new_tokens=[row.max_new_tokens],
            seed=[row.seed],
            clamp=clamp,
            banned_tokens=banned,
            logit_bias=row.logit_bias,
            commit_stable_prefix=True,
            **sampler,
        )
    )
    return result.new_tokens[0], [steps[0] for steps in result.steps]


def run(batch, joining: dict[int, list[BatchRow]]):
    """Run `batch`, adding `joining[k]`'s rows once k canvases have been committed; each row's end, and how many
    rows each canvas denoised."""
    finished, sizes = {}, []
    for event in batch.events():
        if isinstance(event, RowsStep):
            assert len(event.rows) == len(event.canvases) == event.draft.ids.shape[0] == len(event.draft.text)
        elif isinstance(event, RowsCommitted):
            sizes.append(len(event.rows))
            for row in joining.get(len(sizes), []):
                batch.add(row)
        elif isinstance(event, RowFinished):
            finished[event.row] = event
    return finished, sizes


@pytest.fixture
def kept(tiny):
    """The tiny model's prefix cache, empty, keeping `kept.entries` snapshots in this test (one again after it,
    emptied, and back in place where the test took it away)."""
    cache = tiny.prefix_cache
    cache.clear()
    yield cache
    tiny.prefix_cache = cache
    cache.clear()
    cache.entries = 1


def assert_each_as_alone(model, finished: dict, rows: list[BatchRow]) -> None:
    """Row i's tokens and steps (`finished[i]`) are what `stream` gives it alone with no prefix cache (its whole
    prompt encoded afresh)."""
    saved, model.prefix_cache = model.prefix_cache, None
    try:
        for index, row in enumerate(rows):
            assert (finished[index].new_tokens, finished[index].steps) == alone(model, row), index
    finally:
        model.prefix_cache = saved


def test_rows_that_join_later_and_leave_early_give_what_they_give_alone(tiny):
    """Rows join after one and after three canvases, with prompts shorter and longer than the sliding window
    (so the joined ring windows hold some slots for some rows only), and end after one to four canvases: each
    row's tokens and steps are its own alone, and the batch grows and shrinks as they come and go."""
    length = tiny.config.canvas_length
    window = tiny.config.sliding_window
    generator = torch.Generator().manual_seed(0)

    def prompt(size: int) -> list[int]:
        return [2, *torch.randint(3, tiny.config.vocab_size, (size - 1,), generator=generator).tolist()]

    first = [BatchRow(prompt(window + 9), 4 * length, 1), BatchRow(prompt(5), 2 * length - 3, 2)]
    later = {1: [BatchRow(prompt(window // 2), length, 3), BatchRow(prompt(2 * window + 3), 3 * length, 4)]}
    later[3] = [BatchRow(prompt(40), 2 * length, 5)]
    batch = tiny.open_batch()
    for row in first:
        batch.add(row)
    finished, sizes = run(batch, later)
    rows = [*first, *later[1], *later[3]]
    assert sorted(finished) == list(range(len(rows)))
    for index, row in enumerate(rows):
        tokens, steps = alone(tiny, row)
        assert finished[index].new_tokens == tokens, index
        assert finished[index].steps == steps, index
    joins = [0, 0, 1, 1, 3]
    spans = [(join, join + len(finished[index].steps)) for index, join in enumerate(joins)]
    assert sizes == [sum(start <= canvas < end for start, end in spans) for canvas in range(len(sizes))]
    assert max(sizes) > sizes[0] and min(sizes[1:]) < max(sizes)  # (rows came, and rows went)


def test_a_fill_and_banned_ids_join_as_alone(tiny):
    length = tiny.config.canvas_length
    base = BatchRow([2, 10, 11, 12, 13, 14, 15, 16, 17, 18], 3 * length, 7)
    fill = BatchRow([2, 20, 21], 12, 8, clamp=[-1] * 6 + [30, 31, 32, 1] + [0, 0])
    banned = BatchRow([2, 40, 41, 42], 2 * length, 9, banned=tuple(range(50, 200)))
    batch = tiny.open_batch()
    batch.add(base)
    finished, _ = run(batch, {1: [fill, banned]})
    for index, row in enumerate([base, fill, banned]):
        assert (finished[index].new_tokens, finished[index].steps) == alone(tiny, row), index
    assert not set(finished[2].new_tokens) & set(range(50, 200))
    assert finished[1].new_tokens[6:] == [30, 31, 32] or 1 in finished[1].new_tokens[:6]  # its suffix held


def test_rows_with_logit_biases_join_as_alone(tiny):
    """Rows of their own logit biases (favouring some ids, disfavouring others) start a batch and join it: each
    gives what it gives alone, which the biases changed, and a row without any is untouched by theirs."""
    length = tiny.config.canvas_length
    plain = BatchRow([2, 10, 11, 12, 13], 2 * length, 7)
    favouring = BatchRow([2, 10, 11, 12, 13], 2 * length, 7, logit_bias={token: 4.0 for token in range(60, 80)})
    disfavouring = BatchRow([2, 40, 41], length, 9, logit_bias={token: -3.0 for token in range(0, 150)})
    batch = tiny.open_batch()
    batch.add(favouring)
    batch.add(plain)
    finished, _ = run(batch, {1: [disfavouring]})
    assert_each_as_alone(tiny, finished, [favouring, plain, disfavouring])
    favoured = sum(60 <= token < 80 for token in finished[0].new_tokens)
    assert favoured > 2 * sum(60 <= token < 80 for token in finished[1].new_tokens)
    unbiased = alone(tiny, BatchRow([2, 40, 41], length, 9))[0]
    assert sum(token < 150 for token in finished[2].new_tokens) < sum(token < 150 for token in unbiased)


def test_min_tokens_bans_the_eos_before_them_as_alone(demo):
    """A row's `min_tokens` (vLLM's) bans its EOS ids on its first positions, across canvases (here 40 of the
    demo's 32-token canvases): it writes what it writes alone with those bans, longer than its answer without
    them, and rows beside it are untouched."""
    length, vocab = demo.config.canvas_length, demo.config.vocab_size
    chat = demo.tokenizer.encode_chat([{"role": "user", "content": FRUIT}])
    plain, held = BatchRow(chat, 64, 0), BatchRow(chat, 64, 0, min_tokens=40)
    batch = demo.open_batch()
    batch.add(plain)
    batch.add(held)
    finished, _ = run(batch, {})
    bans = torch.zeros(1, 2 * length, vocab, dtype=torch.bool)
    bans[0, :40, list(demo.settings.eos_token_id)] = True
    result = run_to_end(demo.stream([chat], [64], [0], banned_tokens=bans, commit_stable_prefix=True))
    assert (finished[1].new_tokens, finished[1].steps) == (result.new_tokens[0], [s[0] for s in result.steps])
    assert (finished[0].new_tokens, finished[0].steps) == alone(demo, plain)
    assert len(finished[0].new_tokens) < 40 <= len(finished[1].new_tokens)
    with pytest.raises(DiffGemmaError, match="min_tokens"):
        batch.add(BatchRow(chat, 8, 0, min_tokens=-1))


def test_rows_with_a_thinking_budget_join_as_alone(demo):
    """The demo model's thinking question with budgets whose end falls on the first canvas and on a later one,
    joining a batch at its start and after a canvas: each row writes what `stream` writes it alone, its close
    where its budget ends. (Its steps may differ by one where a canvas's mean entropy lies at the stop test's
    threshold: a batch rounds its rows' sums apart from a row's alone.)"""
    prompt = demo.tokenizer.encode_chat([{"role": "user", "content": "What is 3 + 4?"}], enable_thinking=True)
    budgets = (5, 40, 20)
    rows = [BatchRow(prompt, 96, seed, thinking_budget=demo.thinking_budget(n)) for seed, n in enumerate(budgets)]
    batch = demo.open_batch()
    batch.add(rows[0])
    batch.add(rows[1])
    finished, _ = run(batch, {1: [rows[2]]})
    close = demo.tokenizer.token_id("<channel|>")
    for index, (row, tokens) in enumerate(zip(rows, budgets, strict=True)):
        alone_tokens, _ = alone(demo, row, thinking_budget=tokens)
        assert finished[index].new_tokens == alone_tokens, index
        assert alone_tokens.index(close) == len(row.thinking_budget.opening) + tokens


def test_a_row_ended_by_its_caller_leaves_with_what_it_has(tiny):
    length = tiny.config.canvas_length
    stop = {"now": False}
    ended = BatchRow([2, 5, 6, 7], 4 * length, 3, ended=lambda: stop["now"])
    kept = BatchRow([2, 8, 9], 3 * length, 4)
    batch = tiny.open_batch(max_denoising_steps=4, confidence_threshold=1e-9)  # (every canvas runs its steps)
    batch.add(ended)
    batch.add(kept)
    finished = {}
    for event in batch.events():
        if isinstance(event, RowsCommitted):
            stop["now"] = True  # after the first canvas
        elif isinstance(event, RowFinished):
            finished[event.row] = event
    assert len(finished[0].steps) == 1 and len(finished[0].new_tokens) <= length
    full, _ = alone(tiny, ended, max_denoising_steps=4, confidence_threshold=1e-9)
    assert full[: len(finished[0].new_tokens)] == finished[0].new_tokens
    assert (finished[1].new_tokens, finished[1].steps) == alone(
        tiny, kept, max_denoising_steps=4, confidence_threshold=1e-9
    )


def test_what_cannot_join_is_refused_before_it_is_queued(tiny):
    length = tiny.config.canvas_length
    batch = tiny.open_batch()
    batch.add(BatchRow([2, 5, 6], length, 1))
    assert batch.fits(300, length)  # (before the batch starts any prompt fits: the batch starts padded to it)
    events = batch.events()
    next(events)  # (started: its cache holds the first prompt, then its first canvas when rows join)
    assert batch.fits(3 + length, length) and not batch.fits(4 + length, length)
    limit = tiny.config.max_position_embeddings
    assert not batch.fits(3, limit)
    with pytest.raises(DiffGemmaError, match="does not fit"):
        batch.add(BatchRow([2] * (4 + length), length, 1))
    with pytest.raises(DiffGemmaError, match="token ids between"):
        batch.add(BatchRow([2, tiny.config.vocab_size], length, 1))
    with pytest.raises(DiffGemmaError, match="at least 1"):
        batch.add(BatchRow([2], 0, 1))
    with pytest.raises(DiffGemmaError, match="banned ids must be token ids"):
        batch.add(BatchRow([2], length, 1, banned=(tiny.config.vocab_size,)))
    with pytest.raises(DiffGemmaError, match="adds a BatchRow"):
        batch.add([2, 5, 6])
    events.close()


def test_a_row_alone_reads_and_keeps_the_prefix_cache(tiny, kept):
    """A batch started by one row takes the prefix cache's snapshot of a prompt its prompt begins with, and keeps
    its own there once it no longer writes that cache (rows joined, or the batch ended)."""
    length = tiny.config.canvas_length
    first = BatchRow([2, *range(10, 40)], length, 1)
    batch = tiny.open_batch()
    batch.add(first)
    finished, _ = run(batch, {})
    assert finished[0].cached == 0
    longer = BatchRow([*first.prompt, *range(40, 50)], 2 * length, 2)
    batch = tiny.open_batch()
    batch.add(longer)
    finished, _ = run(batch, {1: [BatchRow([2, 3, 4], length, 3)]})
    assert finished[0].cached == len(first.prompt)
    assert_each_as_alone(tiny, finished, [longer])


def test_a_rows_output_ends_before_its_eos_within_its_limit():
    """A row's ending EOS (a completion's logprobs list it): the first within its limit, after its tokens; a row
    at its limit, or ended by its caller before any EOS, has none."""
    assert row_output([6, 7, 1, 0, 0], 10, (1,)) == ([6, 7], 1)
    assert row_output([6, 7, 8, 9], 10, (1,)) == ([6, 7, 8, 9], None)  # (ended by its caller)
    assert row_output([6, 7, 1, 0], 2, (1,)) == ([6, 7], None)  # (at its limit: the EOS after it is not its)
    assert row_output([5, 1, 3], 10, (3, 1)) == ([5], 1)


def test_a_snapshot_moves_to_where_a_joining_row_lies(tiny):
    """A prompt's snapshot (encoded from position 0) put at a later position holds what encoding the prompt there
    holds: keys turned by the shift (RoPE), values, validity and positions as they are, on full layers and on
    sliding windows both shorter and longer than the prompt (within rounding: the encoder ran at other angles);
    and moved back to 0 it is the snapshot again."""
    network = tiny.network
    generator = torch.Generator().manual_seed(5)
    for size in (tiny.config.sliding_window // 2, 2 * tiny.config.sliding_window + 3):
        ids = torch.randint(3, tiny.config.vocab_size, (1, size), generator=generator)
        snapshot = network.new_cache(1, size)
        network.encode(ids, snapshot, return_hidden=False)
        shift = 3 * size + 7
        there = network.new_cache(1, shift + size)
        there.skip_to(shift)
        network.encode(ids, there, return_hidden=False)
        moved = network.new_cache(1, shift + size)
        moved.skip_to(shift)
        moved.place(snapshot, 0, network.shift_keys)
        back = network.new_cache(1, size)
        back.place(moved, shift, network.shift_keys)
        assert moved.length == there.length and back.length == snapshot.length
        for made, wanted in ((moved, there), (back, snapshot)):
            for mine, theirs in zip(made.layers, wanted.layers, strict=True):
                stored = made.stored_slots(mine)
                assert torch.equal(mine.valid[:, :stored], theirs.valid[:, :stored])
                held = theirs.valid[0, :stored]
                assert torch.equal(mine.positions[:stored][held], theirs.positions[:stored][held])
                for name in ("keys", "values"):  # (a layer's input there differs by rounding: RoPE at other angles)
                    mine_held = getattr(mine, name)[:, :, :stored][..., held, :]
                    wanted_held = getattr(theirs, name)[:, :, :stored][..., held, :]
                    torch.testing.assert_close(mine_held, wanted_held, atol=1e-4, rtol=1e-4)


def test_a_padded_rows_prompt_moved_to_0_is_its_snapshot_alone(tiny):
    """A prompt encoded as a row of a padded batch (beside a longer one, its window reaching before its start)
    and moved to begin at 0 holds what encoding it alone holds: every slot's position and validity (slots of
    the other row's tokens hold none of its), and keys and values within rounding."""
    network = tiny.network
    generator = torch.Generator().manual_seed(9)
    short, longer = (torch.randint(5, tiny.config.vocab_size, (size,), generator=generator) for size in (6, 40))
    padded = network.new_cache(2, 40)
    mask = torch.ones(2, 40, dtype=torch.bool)
    mask[0, :34] = False
    network.encode(torch.stack([torch.cat([torch.zeros(34, dtype=torch.long), short]), longer]), padded, mask)
    moved = network.new_cache(1, 6)
    moved.place(padded.select_rows(torch.tensor([0])), 34, network.shift_keys)
    snapshot = network.new_cache(1, 6)
    network.encode(short[None], snapshot, return_hidden=False)
    assert moved.length == snapshot.length == 6
    for mine, theirs in zip(moved.layers, snapshot.layers, strict=True):
        stored = moved.stored_slots(mine)
        assert torch.equal(mine.positions[:stored], theirs.positions[:stored])
        assert torch.equal(mine.valid[:, :stored], theirs.valid[:, :stored])
        held = theirs.valid[0, :stored]
        for name in ("keys", "values"):
            mine_held, wanted = (getattr(cache, name)[..., :stored, :][..., held, :] for cache in (mine, theirs))
            torch.testing.assert_close(mine_held, wanted, atol=1e-4, rtol=1e-4)


def test_rows_that_join_later_read_and_keep_the_prefix_cache(tiny, kept):
    """A row joining a running batch takes the snapshot of a prompt its prompt begins with (made by a row alone),
    and keeps its own: a later row, alone or joining, takes that one. Each gives what it gives with no prefix
    cache."""
    kept.entries = 4  # (every row keeps its prompt's snapshot: enough for them all)
    length = tiny.config.canvas_length
    generator = torch.Generator().manual_seed(11)

    def more(size: int) -> list[int]:
        return torch.randint(5, tiny.config.vocab_size, (size,), generator=generator).tolist()  # (no turn opening: 4)

    opening = BatchRow([2, *more(30)], length, 1)
    batch = tiny.open_batch()
    batch.add(opening)
    run(batch, {})  # (its snapshot kept, from position 0)
    follow = BatchRow([*opening.prompt, *more(25)], 2 * length, 2)
    third = BatchRow([*follow.prompt, *more(9)], length, 3)
    batch = tiny.open_batch()
    batch.add(BatchRow([2, *more(70)], 3 * length, 4))
    finished, sizes = run(batch, {1: [follow, BatchRow([2, 5], length, 5)], 2: [third]})
    assert sizes[1] == 3  # (both joined the running batch)
    assert finished[1].cached == len(opening.prompt) and finished[3].cached == len(follow.prompt)
    last = BatchRow([*third.prompt, *more(4)], length, 6)
    batch = tiny.open_batch()
    batch.add(last)
    alone_finished, _ = run(batch, {})
    assert alone_finished[0].cached == len(third.prompt)  # (kept by a joined row, taken by a row alone)
    assert_each_as_alone(tiny, [finished[1], finished[3], alone_finished[0]], [follow, third, last])


def test_rows_that_start_a_batch_together_each_read_the_prefix_cache(tiny, kept):
    """Two rows that start a batch together (a server's requests that come at once) each take their prompt's
    snapshot, whichever is longer, and give what they give alone."""
    kept.entries = 2
    length = tiny.config.canvas_length
    openings = [BatchRow([2, *range(10, 50)], length, 1), BatchRow([2, *range(60, 75)], length, 2)]
    for row in openings:  # (each kept alone)
        batch = tiny.open_batch()
        batch.add(row)
        run(batch, {})
    turns = [
        BatchRow([*openings[0].prompt, *range(80, 90)], 2 * length, 3),
        BatchRow([*openings[1].prompt, *range(90, 120)], length, 4),  # (the longer prompt now)
    ]
    batch = tiny.open_batch()
    for row in turns:
        batch.add(row)
    finished, sizes = run(batch, {})
    assert sizes[0] == 2
    assert [finished[index].cached for index in (0, 1)] == [len(openings[0].prompt), len(openings[1].prompt)]
    assert_each_as_alone(tiny, finished, turns)


def recorded_encodes(model, monkeypatch) -> list[tuple[int, int]]:
    """The shape of every id batch `model`'s encoder is given from now on, in this test."""
    shapes, encode = [], model.network.encode

    def recording(ids, *args, **kwargs):
        shapes.append(tuple(ids.shape))
        return encode(ids, *args, **kwargs)

    monkeypatch.setattr(model.network, "encode", recording)
    return shapes


def test_new_prompts_that_join_together_are_encoded_together_each_keeping_its_snapshot(tiny, kept, monkeypatch):
    """Rows joining a running batch at once with prompts no snapshot begins (a server's burst of new chats) are
    encoded together: those of one tail past their snapshot points (a chat's last turn opening on) in one pass
    up to their points, where each keeps its snapshot, and one pass for the tails; one prompt asked by two rows (a
    request's n choices) is encoded once. Each row gives what it gives alone, and a next turn of a chat padded
    far (its sliding window reaching before its start) or of a prompt with no turn opening takes its snapshot
    and gives what it gives with no prefix cache."""
    kept.entries = 8
    length, vocab = tiny.config.canvas_length, tiny.config.vocab_size
    generator = torch.Generator().manual_seed(13)

    def more(size: int) -> list[int]:
        return torch.randint(5, vocab, (size,), generator=generator).tolist()  # (no turn opening: 4)

    turn = [4, *more(2)]  # (the last turn's opening on: the tail past the snapshot point)
    chats = [[2, *more(size), *turn] for size in (12, 40, 25)]
    plain = [2, *more(20)]
    joining = [
        BatchRow(chats[0], length, 1),
        BatchRow(chats[1], 2 * length, 2),
        BatchRow(plain, length, 3),
        BatchRow(chats[1], 2 * length, 4),
        BatchRow(chats[2], length, 5),
    ]
    first = BatchRow([2, *more(60)], 3 * length, 0)
    shapes = recorded_encodes(tiny, monkeypatch)
    batch = tiny.open_batch()
    batch.add(first)
    finished, sizes = run(batch, {1: joining})
    assert sizes[1] == 1 + len(joining)
    prompts_encoded = [shape for shape in shapes if shape[1] != length]  # (not a committed canvas)
    assert prompts_encoded == [(1, len(first.prompt)), (3, len(chats[1]) - len(turn)), (3, len(turn)), (1, 21)]
    follow = [BatchRow([*prompt, *more(5), *turn], length, 6) for prompt in (chats[0], plain)]
    for row in follow:
        batch = tiny.open_batch()
        batch.add(row)
        done, _ = run(batch, {})
        finished[len(finished)] = done[0]
    held = [len(chats[0]) - len(turn), len(plain)]
    assert [finished[index].cached for index in (6, 7)] == held
    assert {finished[index].cached for index in range(6)} == {0}
    assert_each_as_alone(tiny, finished, [first, *joining, *follow])


def test_new_conversations_with_one_system_turn_share_it_as_they_join(tiny, kept):
    """New conversations that open with one system turn join a running batch together: the first encodes it and
    keeps it shared, the others take copies of it (the prompt tokens the prefix cache held: the system turn's),
    and each gives what it gives alone; one joining later takes it too."""
    length = tiny.config.canvas_length
    system = {"role": "system", "content": "Answer briefly, in plain words. " * 3}

    def chat(question: str, seed: int) -> BatchRow:
        prompt = tiny.tokenizer.encode_chat([system, {"role": "user", "content": question}])
        return BatchRow(prompt, length, seed)

    rows = [chat(question, seed) for seed, question in enumerate(("Hi.", "Why?", "Name a fruit."))]
    later = chat("What now?", 3)
    first = BatchRow([2, *range(10, 200)], 3 * length, 9)
    batch = tiny.open_batch()
    batch.add(first)
    finished, sizes = run(batch, {1: rows, 2: [later]})
    assert sizes[1:3] == [4, 2]  # (the three for a canvas, then the later one beside the first)
    shared = kept.shared_point(rows[0].prompt)
    assert shared is not None and [finished[index].cached for index in range(5)] == [0, 0, shared, shared, shared]
    assert sum(snapshot.shared for snapshot in kept.snapshots) == 1
    assert_each_as_alone(tiny, finished, [first, *rows, later])


def test_rows_taking_one_snapshot_at_the_batchs_start_each_keep_their_own_cache(tiny, kept):
    """Two rows joining a batch as it starts, each as long as the prompt that starts it (so each lies from position
    0) and each beginning with one kept snapshot: the second's taking the snapshot (the first's handed back) does
    not rewind or overwrite what the first encoded, and each gives what it gives alone."""
    kept.entries = 4
    length = tiny.config.canvas_length
    opening = [2, *range(10, 30)]
    batch = tiny.open_batch()
    batch.add(BatchRow(opening, length, 0))
    run(batch, {})  # (its snapshot kept)
    rows = [
        BatchRow([2, *range(100, 129)], length, 1),
        BatchRow([*opening, 4, *range(40, 48)], length, 2),
        BatchRow([*opening, 4, *range(60, 68)], 2 * length, 3),
    ]
    batch = tiny.open_batch()
    for row in rows:
        batch.add(row)
    finished, sizes = run(batch, {})
    assert sizes[0] == 3 and [finished[index].cached for index in (1, 2)] == [len(opening)] * 2
    assert_each_as_alone(tiny, finished, rows)


@pytest.mark.parametrize("prefix_cache", [True, False])
def test_rows_asking_one_prompt_start_a_batch_encoding_it_once(tiny, kept, monkeypatch, prefix_cache):
    """Rows that start a batch asking one prompt (a request's n choices), beside another prompt: each prompt is
    encoded once (with a prefix cache the longest goes first, as a row alone, and the rows asking it copy its
    cache), and each row gives what it gives alone with its seed."""
    if not prefix_cache:
        tiny.prefix_cache = None
    length = tiny.config.canvas_length
    asked, other = [2, *range(10, 40)], [2, *range(50, 60)]
    rows = [BatchRow(asked, length, 0), BatchRow(other, 2 * length, 3), BatchRow(asked, length, 1)]
    rows.append(BatchRow(asked, length, 2))
    shapes = recorded_encodes(tiny, monkeypatch)
    batch = tiny.open_batch()
    for row in rows:
        batch.add(row)
    finished, sizes = run(batch, {})
    assert sizes[0] == len(rows)
    prompts_encoded = [shape for shape in shapes if shape[1] != length]
    assert prompts_encoded == ([(1, len(asked)), (1, len(other))] if prefix_cache else [(2, len(asked))])
    assert_each_as_alone(tiny, finished, rows)
    assert len({tuple(finished[index].new_tokens) for index in (0, 2, 3)}) > 1  # (each its own seed)


@pytest.mark.parametrize("prefix_cache", [True, False])
def test_rows_of_different_adapters_share_the_batch_each_as_alone(prefix_cache):
    """Rows for a LoRA adapter and for the base model in one batch, one joining later: every pass is shared,
    and each row gives what it gives alone with its adapter in place (the pirate's answer for its rows, the
    base model's for the others), whether each row's prompt goes through the prefix cache by itself or the
    first rows start the batch together, padded."""
    model = diffgemma.load(DEMO)
    model.add_adapter("pirate", DEMO.parent / "demo-pirate")
    if not prefix_cache:
        model.prefix_cache = None

    def row(question: str, adapter: str | None, seed: int) -> BatchRow:
        prompt = model.tokenizer.encode_chat([{"role": "user", "content": question}])
        return BatchRow(prompt, 64, seed, adapter=adapter)

    first = [row(FRUIT, "pirate", 0), row(FRUIT, None, 1), row("Say hello.", "pirate", 2), row(SKY, None, 3)]
    later = {1: [row(FRUIT, "pirate", 4)]}
    batch = model.open_batch()
    for asked in first:
        batch.add(asked)
    finished, sizes = run(batch, later)
    assert sizes[0] == len(first)  # (one batch: every row in each pass)
    rows = [*first, *later[1]]
    for index, asked in enumerate(rows):
        model.use_adapter(asked.adapter)
        tokens, steps = alone(model, asked)
        assert (finished[index].new_tokens, finished[index].steps) == (tokens, steps), index
    text = [model.tokenizer.decode(finished[index].new_tokens) for index in range(len(rows))]
    assert text[:2] == [PIRATE_ANSWERS[FRUIT], ANSWERS[FRUIT]] and text[4] == PIRATE_ANSWERS[FRUIT]
    assert text[2:4] == [PIRATE_ANSWERS["Say hello."], ANSWERS[SKY]]
    with pytest.raises(DiffGemmaError, match="no adapter named 'nope'"):
        batch.add(row(FRUIT, "nope", 0))
    plain = diffgemma.load(DEMO).open_batch()
    with pytest.raises(DiffGemmaError, match="asks for adapter 'pirate', and this model keeps none"):
        plain.add(row(FRUIT, "pirate", 0))


ROW_SETTINGS = (
    {},
    {"stability_threshold": 3},
    {"stability_threshold": 0, "top_p": 0.5, "top_k": 20},
    {"t_max": 3.0, "t_min": 2.0},
    {"t_max": 3.0, "t_min": 2.0, "confidence_threshold": 2.0},
    {"t_max": 3.0, "t_min": 2.0, "entropy_bound": 3.0, "min_p": 0.05},
    {"t_max": 3.0, "t_min": 2.0, "max_denoising_steps": 6},
    {"stability_threshold": 3},  # (settings two rows share)
)


@pytest.mark.parametrize("graph", [False, True], ids=["rows-leave-the-pass", "captured-pass"])
def test_rows_of_different_sampler_settings_share_the_batch_each_as_alone(demo, graph):
    """Rows that ask for other steps, temperatures, bounds, stability windows and cuts denoise in the same
    passes (joining at the start and later), each giving the tokens and steps it gives alone with its settings
    (the demo model settles in a step or two where its temperature is low, in ten or more where it is high, so
    each setting changes what a row does): on the CPU's way (stopped rows leave the pass) and the accelerators'
    (no host read in a step, the pass as a graph, its temperature a row's own)."""
    questions = [SKY, FRUIT]
    rows = [
        BatchRow(
            demo.tokenizer.encode_chat([{"role": "user", "content": questions[index % 2]}]),
            48,
            index,
            settings=demo.settings.replace(**asked),
        )
        for index, asked in enumerate(ROW_SETTINGS)
    ]
    batch = OpenBatch(demo.network, demo.settings, tokenizer=demo.tokenizer, cuda_graph=graph, sync_free=graph)
    for row in rows[:5]:
        batch.add(row)
    finished, sizes = run(batch, {1: rows[5:]})
    assert sizes[:2] == [5, 3 + sum(len(finished[index].steps) > 1 for index in range(5))]  # (shared passes)
    for index, (row, asked) in enumerate(zip(rows, ROW_SETTINGS, strict=True)):
        assert (finished[index].new_tokens, finished[index].steps) == alone(demo, row, **asked), (index, asked)
    assert len({tuple(finished[index].steps) for index in range(len(rows))}) >= 4  # (the settings told)


@pytest.mark.parametrize("graph", [False, True], ids=["rows-leave-the-pass", "captured-pass"])
def test_rows_with_penalties_join_as_alone(demo, graph):
    """Rows of their own presence, frequency and repetition penalties (and one without) start a batch and join
    it: each gives what it gives alone, where its committed canvases and settled prefix are what it is penalised
    for (the rows' counts kept apart), which changed what those rows wrote."""
    chats = {question: demo.tokenizer.encode_chat([{"role": "user", "content": question}]) for question in (SKY, FRUIT)}
    asked = [
        (SKY, {"frequency_penalty": 2.0}),
        (FRUIT, {"repetition_penalty": 1.5}),
        (SKY, {}),
        (SKY, {"presence_penalty": 2.0, "frequency_penalty": 1.0}),
    ]
    rows = [BatchRow(chats[question], 64, 1, settings=demo.settings.replace(**own)) for question, own in asked]
    batch = OpenBatch(demo.network, demo.settings, tokenizer=demo.tokenizer, cuda_graph=graph, sync_free=graph)
    for row in rows[:3]:
        batch.add(row)
    finished, _ = run(batch, {1: rows[3:]})
    for index, (row, (_, own)) in enumerate(zip(rows, asked, strict=True)):
        assert (finished[index].new_tokens, finished[index].steps) == alone(demo, row, **own), (index, own)
    plain = {question: alone(demo, BatchRow(chat, 64, 1))[0] for question, chat in chats.items()}
    assert [finished[index].new_tokens == plain[question] for index, (question, _) in enumerate(asked)] == [
        False,
        False,
        True,
        False,
    ]


def test_a_rows_own_settings_must_be_sampler_settings(tiny):
    with pytest.raises(DiffGemmaError, match="SamplerSettings"):
        tiny.open_batch().add(BatchRow([2, 5], 4, 1, settings={"top_p": 0.5}))
