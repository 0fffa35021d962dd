"""Reference mode reproduces the reference `generate` exactly: same sequences, same denoising steps."""

import pytest
import torch

EOS_SET = [1, 7, 19, 33, 48, 52, 60, 75, 88, 90, 101, 117, 130, 142, 155, 168, 181, 199, 211, 240]


def run_both(pair, prompt, seed, attention_mask=None, reference_extra=None, truncation=None, **settings):
    ours, reference = pair
    calls = []
    forward = reference.forward

    def counting_forward(*args, **kwargs):
        calls.append(1)
        return forward(*args, **kwargs)

    reference.forward = counting_forward
    try:
        torch.manual_seed(seed)
        extra = {} if attention_mask is None else {"attention_mask": attention_mask}
        extra.update(reference_extra or {})
        expected = reference.generate(prompt, **extra, **settings)
    finally:
        reference.forward = forward
    torch.manual_seed(seed)
    prompt_arg = (
        prompt
        if attention_mask is None
        else [row[mask].tolist() for row, mask in zip(prompt, attention_mask, strict=True)]
    )
    got = ours.generate(prompt_arg, mode="reference", **settings, **(truncation or {}))
    return expected, got, len(calls)


@pytest.mark.parametrize("which", ["A", "B", "C"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_reference_mode_equals_reference_generate(generation_pairs, which, seed):
    ours, _ = generation_pairs[which]
    config = ours.config
    length = config.canvas_length
    generator = torch.Generator().manual_seed(100 + seed)
    prompt = torch.randint(3, config.vocab_size, (2, 2 * config.sliding_window + 3), generator=generator)
    max_new = 2 * length + 5  # not a multiple of the canvas length
    expected, got, reference_passes = run_both(generation_pairs[which], prompt, seed, max_new_tokens=max_new)
    assert got.sequences.shape == expected.sequences.shape == (2, prompt.shape[1] + 3 * length)
    assert torch.equal(got.sequences, expected.sequences)
    assert got.tokens_per_forward == pytest.approx(expected.tokens_per_forward.tolist())
    assert sum(max(rows) for rows in got.steps) == reference_passes


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_reference_mode_with_eos_and_early_stopping(generation_pairs, seed):
    """Many EOS ids and a loose confidence threshold: rows stop early, on their own, and pad after EOS."""
    ours, _ = generation_pairs["A"]
    config = ours.config
    generator = torch.Generator().manual_seed(200 + seed)
    prompt = torch.randint(3, config.vocab_size, (2, 5), generator=generator)
    settings = dict(
        max_new_tokens=4 * config.canvas_length, eos_token_id=EOS_SET, confidence_threshold=3.2, stability_threshold=0
    )
    expected, got, reference_passes = run_both(generation_pairs["A"], prompt, seed, **settings)
    assert torch.equal(got.sequences, expected.sequences)
    assert got.tokens_per_forward == pytest.approx(expected.tokens_per_forward.tolist())
    assert sum(max(rows) for rows in got.steps) == reference_passes


def test_early_stopping_and_eos_paths_are_exercised(generation_pairs):
    ours, _ = generation_pairs["A"]
    config = ours.config
    torch.manual_seed(0)
    prompt = torch.randint(3, config.vocab_size, (2, 5))
    result = ours.generate(
        prompt,
        max_new_tokens=4 * config.canvas_length,
        mode="reference",
        eos_token_id=EOS_SET,
        confidence_threshold=3.2,
        stability_threshold=0,
    )
    assert min(min(rows) for rows in result.steps) < ours.settings.max_denoising_steps  # a canvas stopped early
    generated = result.sequences[:, prompt.shape[1] :]
    assert (generated == config.pad_token_id).any()  # something was padded after an EOS


def test_reference_mode_left_padded_batch(generation_pairs):
    ours, _ = generation_pairs["B"]
    config = ours.config
    generator = torch.Generator().manual_seed(7)
    prompt = torch.randint(3, config.vocab_size, (2, config.sliding_window + 6), generator=generator)
    mask = torch.ones_like(prompt, dtype=torch.bool)
    mask[1, :9] = False
    prompt[1, :9] = config.pad_token_id
    expected, got, _ = run_both(generation_pairs["B"], prompt, 3, attention_mask=mask, max_new_tokens=30)
    assert torch.equal(got.sequences, expected.sequences)


@pytest.mark.parametrize(
    ("top_k", "top_p", "min_p"), [(5, 1.0, 0), (0, 0.6, 0), (40, 0.3, 0), (3, 0.8, 0.2), (0, 1, 0.1)]
)
@pytest.mark.parametrize("seed", [0, 1])
def test_truncation_as_the_reference_with_transformers_warpers(generation_pairs, top_k, top_p, min_p, seed):
    """top_k / top_p / min_p cut the logits as transformers' warpers do when the reference's generate is given
    them (ahead of its temperature schedule): same sequences, same steps. (Its top-p and min-p warpers read
    [batch, vocab] scores, so here they are handed the canvas's positions as the batch.)"""
    from transformers import LogitsProcessorList, MinPLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    def per_position(warper):
        return lambda ids, scores, **_: warper(ids, scores.view(-1, scores.shape[-1])).view_as(scores)

    ours, _ = generation_pairs["A"]
    config = ours.config
    generator = torch.Generator().manual_seed(300 + seed)
    prompt = torch.randint(3, config.vocab_size, (2, 9), generator=generator)
    warpers = LogitsProcessorList(
        ([TopKLogitsWarper(top_k)] if top_k else [])
        + ([per_position(TopPLogitsWarper(top_p))] if top_p < 1 else [])
        + ([per_position(MinPLogitsWarper(min_p))] if min_p else [])
    )
    expected, got, reference_passes = run_both(
        generation_pairs["A"],
        prompt,
        seed,
        reference_extra={"logits_processor": warpers},
        truncation={"top_k": top_k, "top_p": top_p, "min_p": min_p},
        max_new_tokens=2 * config.canvas_length,
    )
    plain = ours.generate(prompt, mode="reference", seed=seed, max_new_tokens=2 * config.canvas_length)
    assert torch.equal(got.sequences, expected.sequences)
    assert sum(max(rows) for rows in got.steps) == reference_passes
    assert not torch.equal(got.sequences, plain.sequences)  # the cut changed what was drawn
