"""A deeper copy of a trained network computes what it did, and saves as a checkpoint both implementations load."""

import pytest
import torch
from reference import load_reference

import diffgemma
from diffgemma import DiffGemmaError
from diffgemma.train.grow import deepen


def test_a_deeper_copy_computes_what_the_model_did(ours, tmp_path):
    model = ours["B"]
    have = model.config.num_hidden_layers
    deeper = deepen(model, 2 * have)
    types = model.config.layer_types
    assert deeper.config.layer_types == types + types  # a repeat is of the kind it copies
    generator = torch.Generator().manual_seed(11)
    prompt = torch.randint(0, model.config.vocab_size, (2, 7), generator=generator)
    canvas = torch.randint(0, model.config.vocab_size, (2, model.config.canvas_length), generator=generator)
    conditioning = torch.randn(2, model.config.canvas_length, model.config.vocab_size, generator=generator) * 4
    expected = model.denoise_logits(prompt, canvas, conditioning)
    assert expected.abs().max() > 1.0
    assert (deeper.denoise_logits(prompt, canvas, conditioning) - expected).abs().max() <= 1e-5
    # the repeats hold the weights they copy, their residual branches switched off by zero post-norm scales
    first, repeat = model.network.layers[0], deeper.network.layers[have]
    assert torch.equal(repeat.self_attn.q_proj.weight, first.self_attn.q_proj.weight)
    assert not repeat.post_attention_layernorm.weight.any() and not repeat.post_feedforward_layernorm.weight.any()
    assert first.post_attention_layernorm.weight.any()  # the model itself is left as it was

    folder = deeper.save(tmp_path / "deeper")
    assert diffgemma.load(folder).config.layer_types == deeper.config.layer_types
    reference = load_reference(folder)
    with torch.no_grad():
        theirs = reference(input_ids=prompt, decoder_input_ids=canvas, self_conditioning_logits=conditioning).logits
    assert (theirs - expected).abs().max() <= 1e-4


def test_deepening_needs_more_layers_and_a_full_attention_layer_last(ours):
    model = ours["A"]  # sliding, sliding, full, full
    with pytest.raises(DiffGemmaError, match="already has 4 layers"):
        deepen(model, 4)
    with pytest.raises(DiffGemmaError, match=r"give one of \[7, 8, 11, 12\]"):
        deepen(model, 5)  # would end on a repeat of layer 0, a sliding one
    assert deepen(model, 7).config.layer_types[-1] == "full_attention"
