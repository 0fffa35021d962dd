"""The sampler's pure functions: hand-computed cases, agreement with the reference's classes, and the fast
path's sampling distribution against reference mode."""

import math

import pytest
import torch
from transformers.models.diffusion_gemma.generation_diffusion_gemma import (
    EntropyBoundSampler,
    EntropyBoundSamplerConfig,
    LinearTemperatureScheduleLogitsProcessor,
    StableAndConfidentStoppingCriteria,
)

from diffgemma import sampling
from diffgemma.generate import RandomSource, sampler_step


def test_temperature_schedule_hand_values_and_reference():
    schedule = sampling.temperature_schedule(48, 0.4, 0.8)
    assert schedule.shape == (48,) and schedule.dtype == torch.float32
    assert float(schedule[0]) == pytest.approx(0.8)  # the first step: 48 left
    assert float(schedule[-1]) == pytest.approx(0.4 + 0.4 / 48)  # the last: 1 left
    assert float(schedule[24]) == pytest.approx(0.6)
    processor = LinearTemperatureScheduleLogitsProcessor(t_min=0.4, t_max=0.8, max_denoising_steps=12)
    logits = torch.randn(2, 5, 11)
    schedule = sampling.temperature_schedule(12, 0.4, 0.8)
    for step, steps_left in enumerate(range(12, 0, -1)):
        expected = processor(None, logits, cur_step=torch.tensor(steps_left, dtype=torch.int32))
        assert torch.equal(logits / schedule[step], expected)


def test_logit_stats_hand_cases():
    logits = torch.tensor([[[0.0, 0.0, 0.0, 0.0], [50.0, 0.0, 0.0, 0.0], [math.log(3.0), 0.0, -1e9, -1e9]]])
    probs, entropy, argmax = sampling.logit_stats(logits)
    assert torch.allclose(probs.sum(-1), torch.ones(1, 3))
    assert entropy[0, 0].item() == pytest.approx(math.log(4))
    assert entropy[0, 1].item() == pytest.approx(0.0, abs=1e-6)
    # p = (3/4, 1/4): H = -(.75 ln .75 + .25 ln .25)
    assert entropy[0, 2].item() == pytest.approx(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)), rel=1e-5)
    assert argmax.tolist() == [[0, 0, 0]]
    assert probs[0, 2, :2].tolist() == pytest.approx([0.75, 0.25])


def test_logit_stats_of_masked_and_widely_spread_logits():
    """Tokens outside a position's range hold MASKED_LOGIT: the statistics are those of the range alone. Logits
    spread past exp's floor keep their exact distribution to float32's resolution."""
    generator = torch.Generator().manual_seed(3)
    logits = torch.randn(3, 5, 40, generator=generator) * 4
    ranges = torch.tensor([[[2, 9], [0, 40], [39, 40], [10, 12], [5, 30]]]).expand(3, 5, 2)
    masked = logits.masked_fill(sampling.outside_ranges(ranges, 40), sampling.MASKED_LOGIT)
    probs, entropy, argmax = sampling.logit_stats(masked)
    for position, (low, high) in enumerate(ranges[0].tolist()):
        inside = torch.distributions.Categorical(logits=logits[:, position, low:high])
        assert torch.allclose(entropy[:, position], inside.entropy(), atol=1e-5)
        assert torch.allclose(probs[:, position, low:high], inside.probs, atol=1e-6)
        assert bool(((argmax[:, position] >= low) & (argmax[:, position] < high)).all())
    assert float(probs.sum(-1).sub(1).abs().max()) < 1e-5
    wide = torch.randn(2, 4, 50, generator=generator) * 60
    probs, entropy, argmax = sampling.logit_stats(wide)
    assert torch.allclose(probs, wide.softmax(-1), atol=1e-7) and torch.equal(argmax, wide.argmax(-1))
    # (log Z - E[x - max] loses a few units of float32 rounding on near-zero entropies)
    assert torch.allclose(entropy, sampling.reference_entropy(wide), atol=5e-5)


def test_logit_stats_match_reference_entropy_and_softmax():
    logits = torch.randn(3, 17, 301, generator=torch.Generator().manual_seed(1)) * 4
    probs, entropy, argmax = sampling.logit_stats(logits)
    # float32 rounding of log Z and of the expectation (observed up to 4e-5 over 300 seeds)
    reference = torch.distributions.Categorical(logits=logits).entropy()
    assert torch.allclose(entropy, reference, atol=1e-4)
    assert torch.allclose(entropy, sampling.reference_entropy(logits), atol=1e-4)
    assert torch.allclose(probs, torch.softmax(logits, -1), atol=1e-6)
    assert torch.equal(argmax, logits.argmax(-1))


@pytest.mark.parametrize("vocab", [1024, 4096, 1000, 300])
def test_last_dim_max_is_torch_max_ties_and_nan_included(vocab):
    """The blocked maximum (vocabularies of whole blocks) and the fallback (others) give torch's values and
    first indices: a maximum repeated in several blocks, a whole row tied, a NaN, a non-contiguous view."""
    generator = torch.Generator().manual_seed(vocab)
    logits = torch.randn(3, 7, vocab, generator=generator)
    logits[0, 0, [vocab - 1, 5, 2 * vocab // 3]] = 9.0  # the first of three equal maxima, in different blocks
    logits[0, 1] = 1.5  # all tied
    logits[1, 2, vocab // 2] = float("nan")
    logits[2, 3] = torch.randint(0, 3, (vocab,), generator=generator).float()
    for x in (logits, logits.transpose(0, 1)):
        values, indices = sampling.last_dim_max(x)
        expected_values, expected_indices = x.max(dim=-1)
        assert torch.equal(indices, expected_indices)
        assert torch.equal(values.isnan(), expected_values.isnan())
        assert torch.equal(values.nan_to_num(), expected_values.nan_to_num())
    assert sampling.last_dim_max(logits)[1][0, 0] == 5 and sampling.last_dim_max(logits)[1][0, 1] == 0


def test_entropy_bound_accept_hand_cases():
    entropy = torch.tensor([[0.5, 0.125, 2.0, 0.25]])
    # sorted 0.125, 0.25, 0.5, 2.0 -> sum before each: 0, 0.125, 0.375, 0.875
    assert sampling.entropy_bound_accept(entropy, 0.375).tolist() == [[True, True, False, True]]
    assert sampling.entropy_bound_accept(entropy, 0.124).tolist() == [[False, True, False, False]]
    # the lowest-entropy position is always accepted, however small the bound
    assert sampling.entropy_bound_accept(torch.tensor([[3.0, 9.0]]), 1e-9).tolist() == [[True, False]]
    # ties keep canvas order: with room for two of three equal entropies, the first two are taken
    assert sampling.entropy_bound_accept(torch.tensor([[0.25, 0.25, 0.25]]), 0.25).tolist() == [[True, True, False]]


def test_entropy_bound_accept_matches_reference_sampler():
    torch.manual_seed(0)
    for bound in (0.1, 0.5, 2.0):
        logits = torch.randn(4, 32, 50) * 3
        reference = EntropyBoundSampler(EntropyBoundSamplerConfig(entropy_bound=bound), 32, 50, 10)
        canvas = torch.randint(0, 50, (4, 32))
        reference.accept_canvas(canvas, canvas, logits, 1)
        mine = sampling.entropy_bound_accept(sampling.logit_stats(logits)[1], bound)
        assert torch.equal(mine, reference.accepted_token_mask)


def test_stable_and_confident_window():
    history = torch.full((2, 1, 3), -1)
    canvas = torch.tensor([[4, 5, 6]])
    confident = torch.tensor([0.001])
    results = []
    for _ in range(3):
        results.append(sampling.stable_and_confident(history, canvas, confident, 0.005).item())
        history = sampling.push_history(history, canvas)
    assert results == [False, False, True]  # stable only once the last two drafts equal this one
    assert not sampling.stable_and_confident(history, canvas, torch.tensor([0.01]), 0.005).item()
    assert not sampling.stable_and_confident(history, torch.tensor([[4, 5, 7]]), confident, 0.005).item()
    empty = torch.empty(0, 1, 3, dtype=torch.long)
    assert sampling.stable_and_confident(empty, canvas, confident, 0.005).item()  # window 0: confidence alone


def test_stopping_matches_reference_criteria():
    torch.manual_seed(1)
    for window in (0, 1, 3):
        reference = StableAndConfidentStoppingCriteria(stability_threshold=window, confidence_threshold=2.5)
        history = torch.full((window, 2, 6), -1)
        base = torch.randint(0, 5, (2, 6))
        for step in range(8):
            logits = torch.randn(2, 6, 5) * (step + 1)
            argmax = base if step % 3 else torch.randint(0, 5, (2, 6))
            expected = reference(argmax, logits)
            mean_entropy = sampling.logit_stats(logits)[1].mean(-1)
            assert torch.equal(sampling.stable_and_confident(history, argmax, mean_entropy, 2.5), expected)
            history = sampling.push_history(history, argmax)


def test_per_row_bounds_thresholds_and_windows_are_each_rows_own():
    """A row's own entropy bound, confidence threshold and stability window (rows of a batch asking for other
    settings) give what that row gets alone with them as the batch's."""
    torch.manual_seed(2)
    bounds, thresholds, windows = [0.1, 2.0, 0.5], [2.5, 0.5, 1.0], [0, 1, 3]
    depth = max(windows)
    history = torch.full((depth, 3, 6), -1)
    base = torch.randint(0, 5, (3, 6))
    settled = torch.zeros(3, dtype=torch.long)
    for step in range(8):
        logits = torch.randn(3, 6, 5) * (step + 1)
        argmax = base if step % 3 else torch.randint(0, 5, (3, 6))
        entropy = sampling.logit_stats(logits)[1]
        accept = sampling.entropy_bound_accept(entropy, torch.tensor(bounds))
        stop = sampling.stable_and_confident(
            history, argmax, entropy.mean(-1), torch.tensor(thresholds), torch.tensor(windows)
        )
        prefix = sampling.stable_prefix(settled, history, argmax, entropy, torch.tensor(bounds), torch.tensor(windows))
        for row, (bound, threshold, window) in enumerate(zip(bounds, thresholds, windows, strict=True)):
            own = history[depth - window :, row : row + 1]
            assert torch.equal(accept[row : row + 1], sampling.entropy_bound_accept(entropy[row : row + 1], bound))
            alone = sampling.stable_and_confident(
                own, argmax[row : row + 1], entropy[row : row + 1].mean(-1), threshold
            )
            assert stop[row] == alone.item(), (step, row)
            own_prefix = sampling.stable_prefix(
                settled[row : row + 1], own, argmax[row : row + 1], entropy[row : row + 1], bound
            )
            assert prefix[row] == own_prefix.item(), (step, row)
        history = sampling.push_history(history, argmax)
        settled = prefix
    assert settled.tolist() != [settled[0].item()] * 3  # (the rows' settings told)


def test_pad_after_eos():
    tokens = torch.tensor([[5, 1, 6, 1, 7], [5, 6, 7, 8, 9], [9, 9, 9, 9, 2]])
    padded, found = sampling.pad_after_eos(tokens, torch.tensor([1, 2]), 0)
    assert padded.tolist() == [[5, 1, 0, 0, 0], [5, 6, 7, 8, 9], [9, 9, 9, 9, 2]]
    assert found.tolist() == [True, False, True]


def test_renoise_keeps_accepted_positions():
    canvas = torch.tensor([[1, 2, 3]])
    noise = torch.tensor([[7, 8, 9]])
    assert sampling.renoise(canvas, torch.tensor([[True, False, True]]), noise).tolist() == [[1, 8, 3]]


def chi_square_rejects(counts_a: torch.Tensor, counts_b: torch.Tensor, alpha_z: float = 3.09) -> bool:
    """Two-sample chi-square test of equal distributions (Wilson-Hilferty critical value, one-sided z)."""
    keep = (counts_a + counts_b) > 0
    a, b = counts_a[keep].double(), counts_b[keep].double()
    n_a, n_b = a.sum(), b.sum()
    statistic = (((a * (n_b / n_a).sqrt() - b * (n_a / n_b).sqrt()) ** 2) / (a + b)).sum().item()
    df = int(keep.sum()) - 1
    critical = df * (1 - 2 / (9 * df) + alpha_z * math.sqrt(2 / (9 * df))) ** 3
    return statistic > critical


def accepted_token_counts(mode: str, logits: torch.Tensor, draws: int, seed: int) -> torch.Tensor:
    """Histogram of the token placed at each accepted position, over many sampler steps on fixed logits."""
    vocab = logits.shape[-1]
    counts = torch.zeros(logits.shape[1], vocab, dtype=torch.long)
    torch.manual_seed(seed)
    rng = RandomSource(mode, logits.shape[0], torch.device("cpu"), seed)
    canvas = torch.zeros(logits.shape[:2], dtype=torch.long)
    for _ in range(draws):
        out = sampler_step(logits.clone(), canvas, 0.6, rng)
        assert out.accept.any()
        positions = out.accept[0].nonzero().squeeze(-1)
        counts[positions, out.canvas[0, positions]] += 1
    return counts


def test_fast_mode_samples_the_reference_distribution():
    generator = torch.Generator().manual_seed(5)
    logits = torch.randn(1, 6, 12, generator=generator) * 2.5
    fast = accepted_token_counts("fast", logits, 3000, seed=11)
    reference = accepted_token_counts("reference", logits, 3000, seed=12)
    # acceptance is deterministic, so the same positions were accepted in both modes
    assert torch.equal(fast.sum(-1) > 0, reference.sum(-1) > 0)
    for position in (fast.sum(-1) > 0).nonzero().squeeze(-1).tolist():
        assert not chi_square_rejects(fast[position], reference[position])
    # and the test has power: a slightly different distribution (temperature 1.3) is rejected
    skewed = accepted_token_counts("fast", logits / 1.3, 3000, seed=13)
    rejected = [
        chi_square_rejects(skewed[p], reference[p]) for p in (reference.sum(-1) > 0).nonzero().squeeze(-1).tolist()
    ]
    assert any(rejected)


def test_the_cpu_way_draws_what_the_accelerator_way_draws_at_accepted_positions():
    """The CPU samples only the accepted positions (in the logits' memory, once read), the accelerator way every
    position: the same counter uniforms and running sums, so the same tokens, clamps and masked ids included."""
    generator = torch.Generator().manual_seed(3)
    logits = torch.randn(3, 40, 500, generator=generator) * 3
    logits[:, ::3, 11] += 25.0  # a third of the positions nearly certain: many accepted at once
    fixed = torch.full((3, 40), -1)
    fixed[1, 5] = 42
    canvas = torch.randint(0, 500, (3, 40), generator=generator)
    outputs = []
    for sync_free in (False, True):
        rng = RandomSource("fast", 3, torch.device("cpu"), 9)
        rng.sync_free = sync_free
        outputs.append(sampler_step(logits.clone(), canvas, 2.0, rng, fixed, torch.empty_like(logits)))
    cpu, accelerator = outputs
    assert int(cpu.accept.sum()) > 40
    assert torch.equal(cpu.accept, accelerator.accept)
    assert torch.equal(cpu.canvas, accelerator.canvas)
    assert torch.equal(cpu.probs, accelerator.probs)


def warped(logits: torch.Tensor, top_k: int, top_p: float, min_p: float) -> torch.Tensor:
    """transformers' top-k, top-p then min-p warpers on every position (they read [rows, vocab] scores)."""
    from transformers import MinPLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    scores = logits.reshape(-1, logits.shape[-1]).clone()
    if top_k:
        scores = TopKLogitsWarper(top_k)(None, scores)
    if top_p < 1:
        scores = TopPLogitsWarper(top_p)(None, scores)
    if min_p:
        scores = MinPLogitsWarper(min_p)(None, scores)
    return scores.view_as(logits)


@pytest.mark.parametrize(
    ("top_k", "top_p", "min_p"),
    [(1, 1.0, 0), (7, 1.0, 0), (0, 0.5, 0), (0, 0.95, 0), (20, 0.8, 0), (0, 0.0, 0), (0, 1, 0.05), (30, 0.9, 0.2)],
)
def test_truncate_keeps_what_transformers_warpers_keep(top_k, top_p, min_p):
    seed = top_k + int(100 * top_p) + int(100 * min_p)
    logits = torch.randn(2, 9, 300, generator=torch.Generator().manual_seed(seed)) * 3
    got = sampling.truncate(logits.clone(), top_k, top_p, min_p=min_p)
    kept = got != sampling.MASKED_LOGIT
    assert torch.equal(kept, warped(logits, top_k, top_p, min_p).isfinite())
    assert torch.equal(got[kept], logits[kept])  # what stays is untouched
    assert 9 * 2 <= int(kept.sum()) < kept.numel()
    # logits already divided by a temperature, given it: the same cut, measured at temperature 1
    scaled = sampling.truncate(logits / 0.6, top_k, top_p, scale=torch.tensor(0.6), min_p=min_p)
    assert torch.equal(scaled != sampling.MASKED_LOGIT, kept)


@pytest.mark.parametrize(("top_k", "top_p"), [(5, 0.5), (40, 0.9), (40, 0.0), (200, 0.97)])
def test_the_fast_way_finds_the_nucleus_among_what_top_k_kept(top_k, top_p):
    """After top-k, the fast sampler's top-p sorts only the k kept: the same cut as sorting whole rows."""
    logits = torch.randn(3, 17, 1000, generator=torch.Generator().manual_seed(top_k)) * 4
    for scale in (1.0, torch.tensor(0.6)):
        whole = sampling.truncate(logits / scale, top_k, top_p, scale=scale, min_p=0.01)
        among_kept = sampling.truncate(
            logits / scale, top_k, top_p, scale=scale, min_p=0.01, reference_arithmetic=False
        )
        assert torch.equal(among_kept, whole)
        assert top_k * 3 * 17 > int((whole != sampling.MASKED_LOGIT).sum()) >= 3 * 17


def test_truncate_off_and_in_chunks(monkeypatch):
    logits = torch.randn(3, 20, 50, generator=torch.Generator().manual_seed(1))
    for top_k, top_p in ((0, 1.0), (50, 1.0), (80, 1.0)):
        assert torch.equal(sampling.truncate(logits.clone(), top_k, top_p, min_p=0.0), logits)
    whole = sampling.truncate(logits.clone(), 12, 0.7, min_p=0.1)
    monkeypatch.setattr(sampling, "TRUNCATE_CHUNK", 7 * 50)  # 7 positions at a time: the last chunk is short
    assert torch.equal(sampling.truncate(logits.clone(), 12, 0.7, min_p=0.1), whole)
    assert (whole == sampling.MASKED_LOGIT).any()


@pytest.mark.parametrize("sync_free", [False, True])
def test_fast_mode_draws_only_what_truncation_kept(sync_free):
    logits = torch.randn(2, 64, 40, generator=torch.Generator().manual_seed(4)) * 2
    kept = sampling.truncate(logits.clone(), 0, 0.6) != sampling.MASKED_LOGIT
    temperature = torch.tensor(0.7)
    sampling_logits = sampling.truncate(logits / temperature, 0, 0.6, scale=temperature)
    rng = RandomSource("fast", 2, torch.device("cpu"), 3)
    rng.sync_free = sync_free
    canvas = torch.zeros(2, 64, dtype=torch.long)
    for _ in range(20):
        out = sampler_step(sampling_logits.clone(), canvas, 1e9, rng)  # every position accepted
        assert bool(out.accept.all())
        assert bool(kept.gather(-1, out.canvas[..., None]).all())
        floor = math.exp(sampling.EXP_FLOOR) * (1 + 1e-6)  # (nothing drawable: at most the floor, in float32)
        assert float(out.probs.masked_select(~kept).max()) <= floor


def test_the_cpu_finds_a_nucleus_among_the_likeliest_tokens_or_sorts_the_row(monkeypatch):
    """The fast sampler's top-p on the CPU: rows whose nucleus lies among their likeliest tokens (the first of
    NUCLEUS_CANDIDATES) are cut there, the others look among the next count's, and those beyond every count are
    sorted whole; the same cut as sorting every row, up to float rounding (a token at the boundary), which a
    float64 reference settles."""
    monkeypatch.setattr(sampling, "NUCLEUS_CANDIDATES", (64, 512))
    generator = torch.Generator().manual_seed(5)
    logits = torch.randn(4, 6, 3000, generator=generator) * torch.tensor([0.2, 1.0, 3.0, 6.0]).view(4, 1, 1)
    logits[0, 0] = sampling.MASKED_LOGIT  # a row held to a few tokens (the rest excluded)
    logits[0, 0, :5] = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    calls = []
    whole_rows = sampling._cut_outside_nucleus
    monkeypatch.setattr(
        sampling, "_cut_outside_nucleus", lambda rows, *a: calls.append(len(rows)) or whole_rows(rows, *a)
    )
    for top_p in (0.0, 0.5, 0.9):
        for scale in (1.0, torch.tensor(0.7)):
            exact = sampling.truncate(logits.double(), 0, top_p) != sampling.MASKED_LOGIT
            calls.clear()
            fast = sampling.truncate(logits / scale, 0, top_p, scale=scale, reference_arithmetic=False, host_reads=True)
            kept = fast != sampling.MASKED_LOGIT
            assert (kept != exact).sum(-1).max() <= 1  # at most the boundary token, by rounding
            assert (kept != exact).sum() <= 2
            sizes = kept.sum(-1)
            assert bool((sizes >= 1).all())
            if top_p == 0.9:  # every way taken: nuclei within 64, within 512, and the flat rows' past both
                assert sizes.min() <= 64 and bool(((sizes > 64) & (sizes <= 512)).any())
                assert 0 < sum(calls) == int((sizes > 512).sum())  # (only the rows past 512 sorted whole)
            assert torch.equal(fast[kept], (logits / scale)[kept])  # what stays is untouched
    # where a host read would wait for an accelerator, every row is sorted
    calls.clear()
    sampling.truncate(logits.clone(), 0, 0.9, reference_arithmetic=False)
    assert calls == [24]


@pytest.mark.parametrize("min_p", [0.01, 0.1, 0.5, 1.0])
def test_the_fast_way_cuts_min_p_in_logits_as_the_reference_does_in_probabilities(min_p):
    """Min-p without a softmax (a token stays while its logit is within log(1 / min_p) of the likeliest's, at
    temperature 1): the cut the reference's arithmetic makes."""
    logits = torch.randn(3, 11, 500, generator=torch.Generator().manual_seed(int(min_p * 100))) * 4
    for scale in (1.0, torch.tensor(0.7)):
        reference = sampling.truncate(logits / scale, min_p=min_p, scale=scale)
        fast = sampling.truncate(logits / scale, min_p=min_p, scale=scale, reference_arithmetic=False)
        assert torch.equal(fast, reference)
        kept = (fast != sampling.MASKED_LOGIT).sum(-1)
        assert bool((kept >= 1).all()) and (min_p == 1.0 or int(kept.max()) > 1)


def test_penalize_is_transformers_repetition_penalty_then_openais_frequency_and_presence(monkeypatch):
    """A token the prompt or the answer holds: its logit over the repetition penalty where positive, times it where
    not (transformers' `RepetitionPenaltyLogitsProcessor` on every position); then the frequency penalty times its
    count in the answer, and the presence penalty once, off every position (in temperature-1 logits: over `scale`
    where the temperature is divided in already); each row its own values; the same in chunks of positions, and
    by the seen tokens' columns alone."""
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    vocab, length = 11, 5
    prompts, answers = [[1, 4], [0]], [[4, 4, 7], [10]]
    counts, seen = torch.zeros(2, vocab), torch.zeros(2, vocab, dtype=torch.bool)
    for row, (prompt, answer) in enumerate(zip(prompts, answers, strict=True)):
        for token in answer:
            counts[row, token] += 1
        seen[row, prompt + answer] = True
    logits = torch.randn(2, length, vocab, generator=torch.Generator().manual_seed(0)) * 3
    repetition, frequency, presence = torch.tensor([1.3, 2.0]), torch.tensor([0.5, 0.0]), torch.tensor([0.25, -1.0])
    scale = 0.5  # (logits at temperature 0.5: the additive penalties count double)
    expected = logits.clone()
    for row in range(2):
        written = torch.tensor([prompts[row] + answers[row]])
        processor = RepetitionPenaltyLogitsProcessor(float(repetition[row]))
        for position in range(length):
            expected[row, position] = processor(written, expected[row, position][None].clone())[0]
        expected[row] -= (frequency[row] * counts[row] + presence[row] * (counts[row] > 0)) / scale
    got = sampling.penalize(logits.clone(), counts, seen, presence, frequency, repetition, scale)
    assert torch.allclose(got, expected, atol=1e-6)
    monkeypatch.setattr(sampling, "TRUNCATE_CHUNK", 2 * vocab)  # (one position of both rows at a time)
    assert torch.equal(sampling.penalize(logits.clone(), counts, seen, presence, frequency, repetition, scale), got)
    at_seen = sampling.penalize(logits.clone(), counts, seen, presence, frequency, repetition, scale, host_reads=True)
    assert torch.equal(at_seen, got)  # (the CPU's way: the seen tokens' columns alone)
    assert torch.equal(sampling.penalize(logits.clone(), counts, seen), logits)  # (all off: as they were)
    one = sampling.penalize(logits.clone(), counts, seen, 0.25, 0.5, 1.3, scale)  # (numbers: every row's)
    assert torch.allclose(one[0], expected[0], atol=1e-6) and not torch.allclose(one[1], expected[1])


def test_no_probability_is_small_enough_to_slow_a_cpus_products():
    """Cut tokens (top-k, top-p, min-p, bans: `MASKED_LOGIT`) and far-off ones keep a probability far inside
    float32's normal range, and so do its products with embedding weights in the next step's soft embedding: a
    CPU's matrix product meets numbers below that range a hundred times slower."""
    vocab = 262_144  # (the 26B's)
    logits = torch.randn(2, 8, vocab, generator=torch.Generator().manual_seed(0)) * 3
    logits[..., 40:] = sampling.MASKED_LOGIT  # (a top-k of 40)
    logits[1, :, 20:40] -= 200.0  # (far below the likeliest)
    probs, _, _ = sampling.logit_stats(logits)
    smallest_normal = torch.finfo(torch.float32).tiny
    assert float(probs.min()) * 1e-6 > smallest_normal  # (times a weight of 1e-6: still normal)
    assert float(probs[..., 40:].sum(-1).max()) < 1e-15  # (the cut tokens: nothing drawable)
