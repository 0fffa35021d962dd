"""Scoring text with the causal encoder equals the reference encoder's next-token log-probabilities."""

import math

import pytest
import torch

from diffgemma import DiffGemmaError, scoring

TOLERANCE = 1e-4


def reference_logprobs(reference, ids: torch.Tensor) -> torch.Tensor:
    """log-softmax of the reference's head over its encoder's last hidden states: [T, V]."""
    canvas = torch.zeros(1, reference.config.canvas_length, dtype=torch.long)
    with torch.no_grad():
        hidden = reference(input_ids=ids, decoder_input_ids=canvas).encoder_last_hidden_state
        cap = reference.config.text_config.final_logit_softcapping
        logits = torch.tanh(reference.lm_head(hidden).float() / cap) * cap
    return torch.log_softmax(logits[0], dim=-1)


@pytest.mark.parametrize("which", ["A", "B", "C"])
def test_scores_match_the_reference_encoder(ours, reference_models, which):
    model, reference = ours[which], reference_models[which]
    config = model.config
    generator = torch.Generator().manual_seed(ord(which))
    ids = torch.randint(0, config.vocab_size, (1, 3 * config.sliding_window + 7), generator=generator)
    expected = reference_logprobs(reference, ids)

    scores = model.score(ids[0].tolist(), top=3)

    assert scores.ids == ids[0].tolist()
    assert scores.logprobs[0] is None and scores.top[0] == []  # the first token has no context
    want = expected[:-1].gather(1, ids[0, 1:, None])[:, 0]
    got = torch.tensor(scores.logprobs[1:])
    assert want.min() < -1.0  # random weights: most tokens are unlikely, so the comparison means something
    assert (got - want).abs().max().item() <= TOLERANCE
    best = expected[:-1].topk(3, dim=-1)
    for position, alternatives in enumerate(scores.top[1:]):
        assert [token for token, _ in alternatives] == best.indices[position].tolist()
        values = torch.tensor([value for _, value in alternatives])
        assert (values - best.values[position]).abs().max().item() <= TOLERANCE
    assert scores.total == pytest.approx(want.sum().item(), abs=1e-3)
    assert scores.perplexity == pytest.approx(math.exp(-want.mean().item()), rel=1e-4)


def test_scores_are_the_same_in_slices_and_chunks(ours, monkeypatch):
    """A long text goes through the encoder in chunks and the head a few positions at a time: same scores."""
    model = ours["B"]
    ids = torch.randint(0, model.config.vocab_size, (70,), generator=torch.Generator().manual_seed(5)).tolist()
    whole = model.score(ids, top=2)
    monkeypatch.setattr(scoring, "PREFILL_CHUNK", 16)
    monkeypatch.setattr(scoring, "SCORE_LOGITS_BYTES", 3 * 4 * model.config.vocab_size)  # 3 positions a slice
    pieces = model.score(ids, top=2)
    assert len(pieces.logprobs) == len(whole.logprobs) == 70
    assert torch.allclose(torch.tensor(pieces.logprobs[1:]), torch.tensor(whole.logprobs[1:]), atol=1e-5)
    assert [[t for t, _ in top] for top in pieces.top] == [[t for t, _ in top] for top in whole.top]


def test_a_batch_scores_each_row_as_alone(ours, demo):
    """Rows of several lengths in one pass (the shorter padded at their end, which a causal encoder never
    shows them): each row's scores are its own, alone."""
    model = ours["B"]
    generator = torch.Generator().manual_seed(9)
    rows = [torch.randint(0, model.config.vocab_size, (n,), generator=generator).tolist() for n in (30, 3, 17)]
    together = model.score(rows, top=2)
    assert isinstance(together, list) and len(together) == 3
    for row, scores in zip(rows, together, strict=True):
        alone = model.score(row, top=2)
        assert scores.ids == row and len(scores.logprobs) == len(row)
        assert torch.allclose(torch.tensor(scores.logprobs[1:]), torch.tensor(alone.logprobs[1:]), atol=1e-5)
        assert [[t for t, _ in top] for top in scores.top] == [[t for t, _ in top] for top in alone.top]
    texts = demo.score(["Why is the sky blue?", "Hi"])
    assert [len(t.ids) for t in texts] == [len(demo.tokenizer.encode(x)) for x in ("Why is the sky blue?", "Hi")]


def test_a_text_is_scored_as_its_tokens_and_the_likely_scores_higher(demo):
    tokenizer = demo.tokenizer
    text = demo.score("Why is the sky blue?")
    assert text.ids == tokenizer.encode("Why is the sky blue?") and len(text.logprobs) == len(text.ids)
    assert all(value <= 0 for value in text.logprobs[1:])
    # the demo model learned its canned answer: after its question, the answer it was taught is likelier
    question = tokenizer.encode_chat([{"role": "user", "content": "Why is the sky blue?"}])
    taught = tokenizer.encode("Air scatters blue sunlight more than red", add_special_tokens=False)
    other = tokenizer.encode("Grass grows green under a yellow sun", add_special_tokens=False)
    assert demo.score(question + taught).total > demo.score(question + other).total


def test_bad_input_is_a_clear_error(ours):
    model = ours["A"]
    with pytest.raises(DiffGemmaError, match="no tokens"):
        model.score([])
    with pytest.raises(DiffGemmaError, match="outside the vocabulary"):
        model.score([2, model.config.vocab_size])
    for top in (21, -1, 1.5, "3", None):
        with pytest.raises(DiffGemmaError, match="top must be an integer between 0 and 20"):
            model.score([2, 3], top=top)
    for bad in (torch.tensor([[2, 3]]), [2.5, 3], [2, "a"], [[2, "a"]], None, 5):
        with pytest.raises(DiffGemmaError, match="a text, or token ids"):
            model.score(bad)
    assert model.score(torch.tensor([2, 3, 4])).logprobs == model.score([2, 3, 4]).logprobs
