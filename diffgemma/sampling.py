"""The sampler's math: pure tensor functions, no modules and no state.

One denoising step, given the decoder's logits [B, C, V]:
  temperature (linear schedule) -> per-position statistics (distribution, entropy, argmax)
  -> entropy-bound acceptance (lowest-entropy positions whose summed entropy, less the largest, stays
  within the bound) -> accepted positions take a sample, the rest are re-noised uniformly
  -> stop when the argmax canvas has been stable and the mean entropy is tiny.

Two ways to get the statistics and samples. `reference_*` reproduces the reference implementation's
operations and random draws exactly (a sample for every position, via `torch.multinomial` over the
whole [B*C, V] tensor). The fast path computes softmax, entropy and argmax from one shifted exponential
and samples only the accepted positions, which is the same distribution for far less work and memory.
"""

from __future__ import annotations

import math

import torch


def temperature_schedule(max_steps: int, t_min: float, t_max: float) -> torch.Tensor:
    """The temperature of every step of a canvas, first to last [max_steps]: linear over the steps still to run,
    t_max on the first step, falling towards t_min.

    The steps left count down from `max_steps` (first step) to 1 (last step), as in the reference, int32 as
    its are, and each value is computed in float32 the way the reference computes it.
    """
    steps_left = torch.arange(max_steps, 0, -1, dtype=torch.int32)
    return t_min + (t_max - t_min) * (steps_left / max_steps)


# Where the distribution's exponential is floored (logits less their maximum): a token that far below the
# likeliest is nothing drawable (its probability at most e^-50, 2e-22, over the likeliest's), and every
# probability stays far inside float32's normal range even divided by the 26B's vocabulary (7e-28), and so do its
# products with the embedding in the soft embedding. Below that range a CPU's exp takes a slow path (ten to thirty
# times the time), and a CPU's matrix product meets numbers there a hundred times slower (at -87, the first floor,
# a distribution with tokens cut by top-k, top-p or min-p made bench-90m's whole step 8 to 27 times as long).
EXP_FLOOR = -50.0
# What a position's excluded tokens get (`outside_ranges`): below any capped logit at any usable temperature, and
# finite, so that (floored) probability times logit stays a harmless 1e-18 a token in the entropy.
MASKED_LOGIT = -1e4


ARGMAX_BLOCK = 256


def last_dim_max(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(max, index of its first occurrence) along the last dimension, as `x.max(dim=-1)`.

    A CPU finds a maximum with its index in a scalar loop (bench-90m's [256, 32768] logits: 9 ms) but a plain
    maximum in vector registers, so on the CPU the vocabulary is cut into blocks: the vectorised maximum of
    every block, the first block holding the overall maximum, then the first index within that block (1.6 ms,
    the same values and indices, ties and NaN included).
    """
    vocab = x.shape[-1]
    if x.device.type != "cpu" or not x.is_contiguous() or vocab % ARGMAX_BLOCK or vocab < 4 * ARGMAX_BLOCK:
        return x.max(dim=-1)
    blocks = x.view(*x.shape[:-1], vocab // ARGMAX_BLOCK, ARGMAX_BLOCK)
    block_max = blocks.amax(dim=-1)
    best = block_max.argmax(dim=-1, keepdim=True)
    within = blocks.gather(-2, best[..., None].expand(*best.shape, ARGMAX_BLOCK)).squeeze(-2).argmax(dim=-1)
    return block_max.gather(-1, best).squeeze(-1), best.squeeze(-1) * ARGMAX_BLOCK + within


def logit_stats(
    logits: torch.Tensor, out: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(probabilities, entropy, argmax) of temperature-scaled logits [..., V], in float32.

    One max pass gives the argmax and the shift; one exponential gives the distribution; the entropy
    uses H = log Z - sum(p * (x - max)), so no log-probability tensor is made. Besides the input, the only
    vocabulary-sized tensor is the returned distribution (written into `out` when given).
    """
    shift, argmax = last_dim_max(logits)
    shift = shift.unsqueeze(-1)
    # (floored: a CPU's exp, and its products with what comes of it, slow down far below 1: `EXP_FLOOR`)
    probs = torch.sub(logits, shift, out=out).clamp_min_(EXP_FLOOR).exp_()
    total = probs.sum(dim=-1, keepdim=True)
    probs.div_(total)
    # sum_v p_v * (x_v - max) as a batched dot product (no [.., V] temporary)
    expected_shifted = torch.einsum("...v,...v->...", probs, logits) - shift.squeeze(-1)
    entropy = (total.squeeze(-1).log() - expected_shifted).clamp_min_(0.0)
    return probs, entropy, argmax


# Positions truncated together: their sort's values, indices and running sums stay a fraction of one
# vocabulary-sized tensor (16 positions of the 26B's vocabulary: 116 MiB at the peak).
TRUNCATE_CHUNK = 1 << 22
# How many of the likeliest tokens the CPU's fast top-p looks for a row's nucleus among, first and then, for rows
# whose nucleus reaches past those, next, before it sorts a whole row (`_nucleus_among_likeliest`; a count is
# skipped where it is over a quarter of the vocabulary, whose sort then costs little more). On [256, 262144] logits
# the 1,024 likeliest took 0.11 s, the 16,384 likeliest 0.34, a sort 2.3 (two cores).
NUCLEUS_CANDIDATES = (1024, 16384)


def truncate(
    logits: torch.Tensor,
    top_k: int = 0,
    top_p: float = 1.0,
    scale: torch.Tensor | float = 1.0,
    min_p: float = 0.0,
    reference_arithmetic: bool = True,
    host_reads: bool = False,
) -> torch.Tensor:
    """Top-k, top-p (nucleus), then min-p truncation of contiguous logits [..., V], in place: the tokens cut
    get `MASKED_LOGIT`, so nothing samples them and they add nothing to the entropy or the distribution.

    Top-k keeps the k largest logits (0: all; a tie with the k-th is kept). Top-p keeps the likeliest tokens
    whose probabilities reach `top_p` (1: all; 0: the likeliest alone): a token goes when it and every less
    likely token together hold at most 1 - top_p; the likeliest always stays. Min-p keeps the tokens at least
    `min_p` times as likely as the likeliest (0: all). All are measured at temperature 1, as transformers'
    warpers are when given to the reference's generate (they run ahead of its temperature schedule; vLLM cuts
    this model's logits there too): `scale` turns these logits into the temperature-1 ones (logits already
    divided by a temperature pass that temperature). With `reference_arithmetic`, the reference's operations:
    top-p sorts every position's vocabulary, min-p compares probabilities. Without (the fast sampler's way), the
    same cuts up to float rounding, cheaper: top-p sorts only what top-k kept, or, given `host_reads` (free on the
    CPU), looks among the likeliest tokens first (`NUCLEUS_CANDIDATES`); min-p compares logits with the
    likeliest's less log(1 / min_p), no softmax. Without `host_reads` nothing here waits for the device.
    """
    vocab = logits.shape[-1]
    if top_k <= 0 or top_k >= vocab:
        top_k = 0
    if not top_k and top_p >= 1.0 and min_p <= 0.0:
        return logits
    rows = logits.view(-1, vocab)
    chunk = max(1, TRUNCATE_CHUNK // vocab)
    for start in range(0, rows.shape[0], chunk):
        part = rows[start : start + chunk]
        whole_row_nucleus = top_p < 1.0
        if top_k:
            kept = torch.topk(part, top_k, dim=-1, sorted=False).values
            part.masked_fill_(part < kept.amin(dim=-1, keepdim=True), MASKED_LOGIT)
            if whole_row_nucleus and not reference_arithmetic:  # the nucleus among the k kept
                ascending = kept.sort(dim=-1).values
                first_kept = _outside_nucleus(ascending, top_p, scale).sum(-1, keepdim=True).clamp_(max=top_k - 1)
                part.masked_fill_(part < ascending.gather(-1, first_kept), MASKED_LOGIT)
                whole_row_nucleus = False
        if whole_row_nucleus and not reference_arithmetic and host_reads:
            _nucleus_among_likeliest(part, top_p, scale)
        elif whole_row_nucleus:
            _cut_outside_nucleus(part, top_p, scale)
        if min_p > 0.0 and reference_arithmetic:
            probs = torch.softmax(_at_temperature_one(part, scale), dim=-1)
            part.masked_fill_(probs < min_p * probs.amax(dim=-1, keepdim=True), MASKED_LOGIT)
        elif min_p > 0.0:  # p / p_max < min_p, in logits at temperature 1: (logit - max) * scale < log(min_p)
            part.masked_fill_(part < part.amax(dim=-1, keepdim=True) + math.log(min_p) / scale, MASKED_LOGIT)
    return logits


def penalize(
    logits: torch.Tensor,
    counts: torch.Tensor,
    seen: torch.Tensor,
    presence: float | torch.Tensor = 0.0,
    frequency: float | torch.Tensor = 0.0,
    repetition: float | torch.Tensor = 1.0,
    scale: torch.Tensor | float = 1.0,
    host_reads: bool = False,
) -> torch.Tensor:
    """Penalties for what is written already, on logits [B, C, V], in place, every position of a row alike: a
    token the prompt or the answer holds (`seen` [B, V]) has its logit divided by `repetition` where positive and
    multiplied by it where not (transformers' and vLLM's repetition penalty; 1: off); then each token loses
    `frequency` times its count in the answer (`counts` [B, V]), and `presence` once it is there at all (OpenAI's
    penalties; 0: off). Each a number, or one a row [B]. `scale`: as `truncate`'s (the frequency and presence
    penalties are in temperature-1 logits, as OpenAI's are). Given `host_reads` (free on the CPU), the repetition
    penalty reads and writes the seen tokens' logits alone (a few hundred of a vocabulary, mostly); without, it
    goes over every logit a few positions at a time, and nothing here waits for the device."""
    batch, vocab = counts.shape
    rows = logits.view(batch, -1, vocab)
    if isinstance(repetition, torch.Tensor) or repetition != 1.0:
        if host_reads:
            for row in range(batch):
                ids = seen[row].nonzero().squeeze(1)
                own = float(repetition[row]) if isinstance(repetition, torch.Tensor) else repetition
                columns = rows[row][:, ids]
                rows[row][:, ids] = torch.where(columns > 0, columns / own, columns * own)
        else:
            factor = torch.where(seen, per_row(repetition, counts), 1.0)[:, None, :]
            chunk = max(1, TRUNCATE_CHUNK // (batch * vocab))  # (positions at a time: temporaries a few chunks)
            for start in range(0, rows.shape[1], chunk):
                part = rows[:, start : start + chunk]
                part.copy_(torch.where(part > 0, part / factor, part * factor))
    if isinstance(presence, torch.Tensor) or isinstance(frequency, torch.Tensor) or presence or frequency:
        lost = per_row(frequency, counts) * counts + per_row(presence, counts) * (counts > 0)
        rows.sub_(lost[:, None, :] / scale)
    return logits


def _cut_outside_nucleus(rows: torch.Tensor, top_p: float, scale: torch.Tensor | float) -> None:
    """Top-p over whole rows of logits [N, V], in place: each sorted, the likeliest always kept."""
    ascending, order = torch.sort(rows, dim=-1)
    cut = _outside_nucleus(ascending, top_p, scale, in_place=True)
    cut[:, -1] = False
    rows.masked_fill_(torch.zeros_like(cut).scatter_(-1, order, cut), MASKED_LOGIT)


def _nucleus_among_likeliest(
    rows: torch.Tensor, top_p: float, scale: torch.Tensor | float, candidates: tuple[int, ...] | None = None
) -> None:
    """Top-p over rows of logits [N, V] on the CPU, in place, without sorting whole rows where it need not: a
    row's nucleus is found among its likeliest tokens (the first count of `candidates`, by default
    `NUCLEUS_CANDIDATES`) when they hold at least `top_p` of its probability (a token stays while the likelier ones
    hold less than `top_p`); the other rows look among the next count's, and are sorted whole when none is left.
    Which rows those are is read on the host (on the CPU, a read that costs nothing)."""
    vocab = rows.shape[-1]
    usable = [count for count in (NUCLEUS_CANDIDATES if candidates is None else candidates) if 4 * count <= vocab]
    if not usable:
        _cut_outside_nucleus(rows, top_p, scale)
        return
    count, later = usable[0], tuple(usable[1:])
    log_total = torch.logsumexp(_at_temperature_one(rows, scale), dim=-1, keepdim=True)
    likeliest = torch.topk(rows, count, dim=-1).values  # descending
    probs = torch.exp_(_at_temperature_one(likeliest, scale) - log_total)
    held = probs.cumsum(-1)
    kept = (held - probs < top_p).sum(-1, keepdim=True).clamp_(min=1)
    beyond = held[:, -1] < top_p  # rows whose nucleus reaches past the candidates
    if bool(beyond.all()):
        _nucleus_among_likeliest(rows, top_p, scale, later)
        return
    threshold = likeliest.gather(-1, kept - 1).masked_fill_(beyond[:, None], -math.inf)
    rows.masked_fill_(rows < threshold, MASKED_LOGIT)
    if bool(beyond.any()):
        wide = beyond.nonzero().squeeze(-1)
        rest = rows[wide]
        _nucleus_among_likeliest(rest, top_p, scale, later)
        rows[wide] = rest


def _outside_nucleus(
    ascending: torch.Tensor, top_p: float, scale: torch.Tensor | float, in_place: bool = False
) -> torch.Tensor:
    """For logits sorted ascending: True where a token and every less likely one together hold at most
    1 - top_p of the probability at temperature 1 (`in_place`: `ascending` may be overwritten)."""
    mass_up_to = torch.softmax(_at_temperature_one(ascending, scale, in_place), dim=-1).cumsum_(-1)
    return mass_up_to <= 1.0 - top_p


def _at_temperature_one(logits: torch.Tensor, scale: torch.Tensor | float, in_place: bool = False) -> torch.Tensor:
    if isinstance(scale, float) and scale == 1.0:
        return logits
    return logits.mul_(scale) if in_place else logits * scale


def reference_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy computed with the same operations as the reference (`Categorical(logits=...).entropy()`)."""
    normalized = logits - logits.logsumexp(dim=-1, keepdim=True)
    probs = torch.softmax(normalized, dim=-1)
    return -(normalized.clamp(min=torch.finfo(normalized.dtype).min) * probs).sum(dim=-1)


def reference_sample(logits: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One sample per position [B, C] from the whole [B, C, V] tensor, drawing random numbers as the reference."""
    batch, length, vocab = logits.shape
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
    return torch.multinomial(probs.view(-1, vocab), num_samples=1, generator=generator).view(batch, length)


_GOLDEN = 0x9E3779B97F4A7C15 - 2**64  # splitmix64 constants, as signed 64-bit integers
_MIX_1 = 0xBF58476D1CE4E5B9 - 2**64
_MIX_2 = 0x94D049BB133111EB - 2**64


def _shift_right(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def mix64(x: torch.Tensor) -> torch.Tensor:
    """splitmix64's finaliser on int64 tensors (wrapping arithmetic): a counter -> 64 well-mixed bits."""
    x = x + _GOLDEN
    x = (x ^ _shift_right(x, 30)) * _MIX_1
    x = (x ^ _shift_right(x, 27)) * _MIX_2
    return x ^ _shift_right(x, 31)


def counter_bits(stream: torch.Tensor, position: torch.Tensor, index: torch.Tensor | int = 0) -> torch.Tensor:
    """Random bits that depend only on (stream, position, index): counter-based, so every row of a batch
    draws exactly what it would draw alone, with no generator state and no loop over rows."""
    return mix64(mix64(stream + position * 0x100000) + index)


def counter_tokens(stream: torch.Tensor, positions: torch.Tensor, vocab: int) -> torch.Tensor:
    """Uniform token ids, one per (stream, position)."""
    return _shift_right(counter_bits(stream, positions), 1) % vocab


def counter_uniform(stream: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
    """One uniform in (0, 1) per (stream, position), float32 (24 random bits, never exactly 0 or 1)."""
    bits = counter_bits(stream, position, 1)
    return (_shift_right(bits, 40).float() + 0.5) * 2.0**-24


def inverse_cdf_sample(probs: torch.Tensor, uniform: torch.Tensor, scratch: torch.Tensor | None = None) -> torch.Tensor:
    """One sample per position [...] from `probs` [..., V] by inverting the running sum at `uniform` [...].

    The running sum goes into `scratch` (any float32 tensor of probs' shape that is free, e.g. the logits
    once read, or `probs` itself, which is then overwritten), so sampling adds no vocabulary-sized tensor,
    and every position is drawn at once with no host synchronisation. Token v is drawn when
    cdf[v-1] <= u * total < cdf[v]."""
    cdf = torch.cumsum(probs, dim=-1, out=scratch)
    target = (uniform * cdf[..., -1]).unsqueeze(-1).contiguous()
    drawn = torch.searchsorted(cdf, target, right=True).squeeze(-1)
    return drawn.clamp_(max=probs.shape[-1] - 1)


def per_row(value: float | torch.Tensor, like: torch.Tensor) -> float | torch.Tensor:
    """A setting for every row: a number as it is, or one value a row ([B]) shaped to broadcast over `like`
    [B, ...]."""
    if isinstance(value, torch.Tensor):
        return value.view(-1, *[1] * (like.dim() - 1))
    return value


def entropy_bound_accept(entropy: torch.Tensor, bound: float | torch.Tensor) -> torch.Tensor:
    """Accept mask [B, C]: the k lowest-entropy positions with sum(entropy) - max(entropy) <= bound (one for
    all rows, or a row's own [B]).

    Sorted ascending, the running sum less the current (largest so far) entropy only grows, so the
    accepted set is a prefix of the sorted order. Ties keep their canvas order (stable sort).
    """
    sorted_entropy, order = torch.sort(entropy, dim=-1, stable=True)
    keep = torch.cumsum(sorted_entropy, dim=-1) - sorted_entropy <= per_row(bound, entropy)
    return torch.zeros_like(keep).scatter(-1, order, keep)


def outside_ranges(ranges: torch.Tensor, vocab: int) -> torch.Tensor:
    """[B, C, V] mask, True where a token lies outside its position's half-open (low, high) range [B, C, 2]."""
    ids = torch.arange(vocab, device=ranges.device)
    return (ids < ranges[..., :1]) | (ids >= ranges[..., 1:])


def renoise(canvas: torch.Tensor, keep: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Positions not kept take the fresh uniform `noise` tokens."""
    return torch.where(keep, canvas, noise)


def agrees_with_history(
    history: torch.Tensor, argmax: torch.Tensor, windows: torch.Tensor | None = None
) -> torch.Tensor:
    """[window, B, C]: where the argmax canvas [B, C] equals each of the last `window` ones (`history`
    [window, B, C], -1 where there is no such step yet). `windows` [B]: how far back each row looks, if less
    than the whole history for some (older drafts then agree)."""
    same = history == argmax[None]
    if windows is not None:
        depth = history.shape[0]
        unseen = torch.arange(depth, device=history.device)[:, None] < depth - windows[None, :]
        same |= unseen[..., None]
    return same


def stable_and_confident(
    history: torch.Tensor,
    argmax: torch.Tensor,
    mean_entropy: torch.Tensor,
    confidence_threshold: float | torch.Tensor,
    windows: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-row stop test [B]: the argmax canvas equals each of the last `window` ones (`agrees_with_history`)
    and the mean entropy is below the threshold (one for all rows, or a row's own [B]). With a window of 0 only
    confidence counts."""
    stable = agrees_with_history(history, argmax, windows).all(dim=-1).all(dim=0)
    return stable & (mean_entropy < confidence_threshold)


def push_history(history: torch.Tensor, argmax: torch.Tensor) -> torch.Tensor:
    """Drop the oldest argmax canvas from the window and append the newest."""
    if history.shape[0] == 0:
        return history
    return torch.cat([history[1:], argmax[None]], dim=0)


def stable_prefix(
    committed: torch.Tensor,
    history: torch.Tensor,
    argmax: torch.Tensor,
    entropy: torch.Tensor,
    threshold: float | torch.Tensor,
    windows: torch.Tensor | None = None,
) -> torch.Tensor:
    """Length [B] of each row's settled prefix: from the canvas start, positions whose argmax equals the
    last `window` drafts (`agrees_with_history`, before this step is pushed) and whose entropy is below
    `threshold` (one for all rows, or a row's own [B]). Never shorter than `committed` [B], the prefix settled
    before."""
    length = argmax.shape[-1]
    ready = agrees_with_history(history, argmax, windows).all(dim=0) & (entropy < per_row(threshold, entropy))
    ready |= torch.arange(length, device=argmax.device)[None, :] < committed[:, None]
    gaps = ~ready
    first_gap = torch.where(gaps.any(dim=-1), gaps.int().argmax(dim=-1), length)
    return torch.maximum(committed, first_gap)


def pad_after_eos(tokens: torch.Tensor, eos_ids: torch.Tensor, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Replace everything after each row's first EOS by pad. Returns (tokens, row has an EOS)."""
    is_eos = torch.isin(tokens, eos_ids)
    seen = is_eos.cumsum(dim=-1)
    after_first = (seen > 0) & ~((seen == 1) & is_eos)
    return tokens.masked_fill(after_first, pad_id), is_eos.any(dim=-1)
