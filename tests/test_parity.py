"""denoise_logits equals the reference decoder's logits (float32, CPU)."""

import pytest
import torch

from diffgemma.config import SLIDING

TOLERANCE = 1e-4


def reference_logits(model, prompt, canvas, sc_logits):
    with torch.no_grad():
        return model(input_ids=prompt, decoder_input_ids=canvas, self_conditioning_logits=sc_logits).logits


@pytest.mark.parametrize("which", ["A", "B", "C"])
@pytest.mark.parametrize("prompt_kind", ["shorter", "longer"])
@pytest.mark.parametrize("self_conditioning", [False, True])
def test_denoise_logits_match_reference(ours, reference_models, which, prompt_kind, self_conditioning):
    model, reference = ours[which], reference_models[which]
    config = model.config
    window = config.sliding_window
    prompt_length = window - 3 if prompt_kind == "shorter" else 3 * window + 5
    generator = torch.Generator().manual_seed(hash((which, prompt_kind, self_conditioning)) % 2**31)
    prompt = torch.randint(0, config.vocab_size, (2, prompt_length), generator=generator)
    canvas = torch.randint(0, config.vocab_size, (2, config.canvas_length), generator=generator)
    sc_logits = None
    if self_conditioning:
        sc_logits = torch.randn(2, config.canvas_length, config.vocab_size, generator=generator) * 4

    expected = reference_logits(reference, prompt, canvas, sc_logits)
    got = model.denoise_logits(prompt, canvas, sc_logits)

    assert got.shape == expected.shape == (2, config.canvas_length, config.vocab_size)
    assert got.dtype == torch.float32
    assert expected.abs().max() > 1.0  # the weights are large enough for the comparison to mean something
    assert (got - expected).abs().max().item() <= TOLERANCE
    # the two rows differ, so the batch is not collapsed
    assert not torch.allclose(got[0], got[1])


def test_configs_exercise_both_layer_kinds_and_shapes(ours):
    a, b = ours["A"].config, ours["B"].config
    for config in (a, b):
        assert SLIDING in config.layer_types and config.layer_types[-1] == "full_attention"
    assert (a.head_dim, a.num_experts, a.top_k_experts) != (b.head_dim, b.num_experts, b.top_k_experts)
    assert a.layer_types != b.layer_types


def test_self_conditioning_changes_the_logits(ours):
    model = ours["A"]
    config = model.config
    prompt = torch.randint(0, config.vocab_size, (1, 5))
    canvas = torch.randint(0, config.vocab_size, (1, config.canvas_length))
    plain = model.denoise_logits(prompt, canvas)
    conditioned = model.denoise_logits(prompt, canvas, torch.randn(1, config.canvas_length, config.vocab_size) * 4)
    assert (plain - conditioned).abs().max() > 1e-2
