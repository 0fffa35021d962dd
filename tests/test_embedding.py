"""Embeddings from the causal encoder: the mean of the reference encoder's final states, each text as alone."""

import pytest
import torch

from diffgemma import DiffGemmaError, embedding

TOLERANCE = 1e-4


def reference_mean_state(reference, ids: list[int], skip_first: bool) -> torch.Tensor:
    """The mean of the reference encoder's last hidden states over `ids` (the first left out if `skip_first`)."""
    canvas = torch.zeros(1, reference.config.canvas_length, dtype=torch.long)
    with torch.no_grad():
        hidden = reference(input_ids=torch.tensor([ids]), decoder_input_ids=canvas).encoder_last_hidden_state
    return hidden[0, int(skip_first) :].float().mean(0)


@pytest.mark.parametrize("which", ["A", "B", "C"])
def test_an_embedding_is_the_reference_encoders_mean_state_without_the_bos(ours, reference_models, which):
    model, reference = ours[which], reference_models[which]
    config = model.config
    generator = torch.Generator().manual_seed(ord(which))
    text = torch.randint(3, config.vocab_size, (2 * config.sliding_window + 5,), generator=generator).tolist()
    ids = [config.bos_token_id, *text]
    expected = reference_mean_state(reference, ids, skip_first=True)

    raw = model.embed(ids, normalize=False)
    assert raw.shape == (config.hidden_size,) and raw.dtype == torch.float32
    assert (raw - expected).abs().max().item() <= TOLERANCE * max(1.0, expected.abs().max().item())
    unit = model.embed(ids)
    assert torch.allclose(unit, expected / expected.norm(), atol=TOLERANCE)
    # without a leading BOS every token counts; a BOS alone is its own state
    plain = ids[1:]
    assert torch.allclose(
        model.embed(plain, normalize=False), reference_mean_state(reference, plain, False), atol=TOLERANCE
    )
    alone = reference_mean_state(reference, [config.bos_token_id], skip_first=False)
    assert torch.allclose(model.embed([config.bos_token_id], normalize=False), alone, atol=TOLERANCE)


def test_a_batch_embeds_each_row_as_alone_in_passes_and_chunks(ours, monkeypatch):
    """Rows of several lengths, read in passes of similar lengths (padded at their end) and chunks: each row's
    vector is its own, alone, in the order given."""
    model = ours["B"]
    generator = torch.Generator().manual_seed(3)
    lengths = (45, 3, 17, 1, 30, 17)
    rows = [torch.randint(0, model.config.vocab_size, (n,), generator=generator).tolist() for n in lengths]
    alone = torch.stack([model.embed(row) for row in rows])
    monkeypatch.setattr(embedding, "PREFILL_CHUNK", 8)
    monkeypatch.setattr(embedding, "EMBED_PASS_TOKENS", 40)
    groups = embedding.passes(list(lengths))
    assert sorted(i for group in groups for i in group) == list(range(len(rows))) and len(groups) > 2
    assert all(len(g) == 1 or len(g) * max(lengths[i] for i in g) <= 40 for g in groups)
    together = model.embed(rows)
    assert together.shape == (len(rows), model.config.hidden_size)
    assert torch.allclose(together, alone, atol=1e-5)
    assert torch.allclose(together.norm(dim=-1), torch.ones(len(rows)), atol=1e-5)


def test_dimensions_keep_the_first_values_at_unit_length(ours):
    model = ours["A"]
    ids = [2, 5, 9, 11]
    raw = model.embed(ids, normalize=False)
    cut = model.embed(ids, dimensions=5)
    assert cut.shape == (5,) and torch.allclose(cut, raw[:5] / raw[:5].norm(), atol=1e-6)
    assert torch.equal(model.embed(ids, normalize=False, dimensions=5), raw[:5])


def test_texts_that_share_words_are_closer(demo):
    question, close, far = demo.embed(["Why is the sky blue?", "Why is the sky so blue", "Name a fruit."])
    assert question @ close > question @ far
    assert torch.allclose(demo.embed("Name a fruit."), demo.embed(demo.tokenizer.encode("Name a fruit.")))


def test_bad_input_is_a_clear_error(ours):
    model = ours["A"]
    with pytest.raises(DiffGemmaError, match="nothing to embed: no tokens"):
        model.embed([])
    with pytest.raises(DiffGemmaError, match="outside the vocabulary"):
        model.embed([[2, 3], [2, model.config.vocab_size]])
    for dimensions in (0, model.config.hidden_size + 1, 2.5, "8"):
        with pytest.raises(DiffGemmaError, match="dimensions must be an integer from 1"):
            model.embed([2, 3], dimensions=dimensions)
    for bad in (torch.tensor([[2, 3]]), [2.5, 3], None, 5):
        with pytest.raises(DiffGemmaError, match="embed takes a text, or token ids"):
            model.embed(bad)
    for normalize in (torch.tensor([1, 0]), None, "yes"):
        with pytest.raises(DiffGemmaError, match="normalize must be True or False"):
            model.embed([2, 3], normalize=normalize)
