"""The generation loop: prefill -> canvases -> denoising steps -> commit, with events along the way.

    prompt ids --encode--> cache
    for each canvas:  random canvas (clamped positions fixed)
                      repeat: denoise -> temperature -> stats -> accept -> sample/renoise -> stop test
                      commit the argmax canvas (pad after EOS), encode it into the cache

`mode="reference"` draws random numbers exactly as the reference implementation does, so a seeded run
returns the same sequences. `mode="fast"` (the default) samples only accepted positions, from one
random stream per row, so a row's result does not depend on the other rows of its batch.
"""

from __future__ import annotations

import difflib
import hashlib
import math
import operator
import time
import warnings
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from . import sampling
from .cache import DecoderView, EncoderCache, PrefixCache
from .config import SamplerSettings, is_int
from .errors import DiffGemmaError
from .model import DiffusionGemma, ImageInputs
from .reply import StopStrings
from .tokenizer import Tokenizer
from .toolcalls import ToolCall

MODES = ("fast", "reference")

Messages = list[dict[str, Any]]  # a chat conversation: {"role": ..., "content": ...} messages
Prompt = str | Sequence[str] | Sequence[int] | Sequence[Sequence[int]] | torch.Tensor | Messages | Sequence[Messages]


@dataclass
class Draft:
    """After every denoising step: the argmax canvas so far and what the sampler decided."""

    canvas_index: int
    step: int  # 1-based within the canvas
    ids: torch.Tensor  # [B, C] argmax draft
    accepted: torch.Tensor  # [B, C] positions accepted this step
    mean_entropy: torch.Tensor  # [B]
    finished: torch.Tensor  # [B] rows whose canvas has stopped denoising
    tokenizer: Tokenizer | None = field(default=None, repr=False)
    settled: torch.Tensor | None = None  # [B] with commit_stable_prefix: length of the prefix now fixed
    entropy: torch.Tensor | None = None  # [B, C] per-position entropy of this step's distribution
    cached_tokens: int = 0  # prompt tokens the prefix cache held (a batch of one), not encoded again

    @property
    def text(self) -> list[str]:
        return _decode_rows(self.tokenizer, self.ids)


@dataclass
class CanvasCommit:
    """A canvas is finished: its committed tokens (pad after EOS) go into the sequence and the cache."""

    canvas_index: int
    ids: torch.Tensor  # [B, C]
    steps: list[int]  # denoising passes this canvas took, per row
    tokenizer: Tokenizer | None = field(default=None, repr=False)

    @property
    def text(self) -> list[str]:
        return _decode_rows(self.tokenizer, self.ids)


@dataclass
class GenerationResult:
    sequences: torch.Tensor  # [B, P + canvases * C], prompt then canvases, pad after a row's EOS
    prompt_length: int
    new_tokens: list[list[int]]  # per row: generated ids up to max_new_tokens, ending before EOS, no pad
    steps: list[list[int]]  # per canvas, per row: denoising passes
    tokens_per_forward: list[float]  # per row: generated non-pad tokens / decoder passes (reference's metric)
    wall_time: float
    text: str | list[str] | None = None  # one string per prompt (a list for a batch), None without tokenizer
    stopped: list[bool] = field(default_factory=list)  # per row: a stop string ended it (`StopStrings`)
    reached_limit: list[bool] = field(default_factory=list)  # per row: cut at max_new_tokens, no EOS before it
    cached_tokens: int = 0  # prompt tokens the prefix cache held (a batch of one), not encoded again

    @property
    def tokens_per_second(self) -> float:
        produced = sum(len(row) for row in self.new_tokens)
        return produced / self.wall_time if self.wall_time > 0 else 0.0


@dataclass
class Done:
    result: GenerationResult


@dataclass
class ChatResult:
    content: str
    reasoning: str
    result: GenerationResult
    tool_calls: tuple[ToolCall, ...] = ()  # the calls the model made, when it was offered tools
    parsed: Any = None  # the JSON answer's value, when one was asked for (`json_schema`) and it came whole


@dataclass
class InfillResult:
    text: str  # prefix + fill + suffix
    fill: str
    result: GenerationResult


def _decode_rows(tokenizer: Tokenizer | None, ids: torch.Tensor) -> list[str]:
    if tokenizer is None:
        raise DiffGemmaError("this checkpoint has no tokenizer, so there is no text; use the ids")
    return [tokenizer.decode(row) for row in ids.tolist()]


def prepare_prompts(
    prompt: Prompt, tokenizer: Tokenizer | None, pad_id: int, enable_thinking: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None, bool]:
    """Any prompt form -> (ids [B, P] left-padded, attention mask or None, whether the input was a batch)."""
    if isinstance(prompt, torch.Tensor):
        if prompt.ndim not in (1, 2) or prompt.dtype not in (torch.int64, torch.int32):
            raise DiffGemmaError("a prompt tensor must hold token ids, shaped [tokens] or [batch, tokens]")
        rows = prompt.tolist() if prompt.ndim == 2 else [prompt.tolist()]
        batched = prompt.ndim == 2
    elif isinstance(prompt, str):
        rows, batched = [_need_tokenizer(tokenizer).encode(prompt)], False
    elif is_conversation(prompt):
        rows, batched = [_need_tokenizer(tokenizer).encode_chat(list(prompt), enable_thinking)], False
    elif isinstance(prompt, Sequence) and prompt and all(is_conversation(p) for p in prompt):
        rows, batched = [_need_tokenizer(tokenizer).encode_chat(list(p), enable_thinking) for p in prompt], True
    elif isinstance(prompt, Sequence) and prompt and all(isinstance(p, str) for p in prompt):
        rows, batched = [_need_tokenizer(tokenizer).encode(p) for p in prompt], True
    elif isinstance(prompt, Sequence) and prompt and all(is_int(p) for p in prompt):
        rows, batched = [list(prompt)], False
    elif isinstance(prompt, Sequence) and prompt and all(_is_ids(p) for p in prompt):
        rows, batched = [list(p) for p in prompt], True
    else:
        raise DiffGemmaError(
            "prompt must be text, a list of texts, chat messages (or a list of conversations), token ids or a list "
            "of them"
        )
    if any(len(row) == 0 for row in rows):
        raise DiffGemmaError("a prompt has no tokens; give at least one (e.g. the BOS token)")
    longest = max(len(row) for row in rows)
    ids = torch.tensor([[pad_id] * (longest - len(row)) + row for row in rows], dtype=torch.long)
    if all(len(row) == longest for row in rows):
        return ids, None, batched
    mask = torch.tensor([[False] * (longest - len(row)) + [True] * len(row) for row in rows])
    return ids, mask, batched


def is_conversation(prompt: Any) -> bool:
    """Whether a prompt is one chat conversation: a non-empty list of message objects."""
    return isinstance(prompt, Sequence) and bool(prompt) and all(isinstance(message, dict) for message in prompt)


def _is_ids(row: Any) -> bool:
    return isinstance(row, Sequence) and not isinstance(row, str) and all(is_int(token) for token in row)


def _need_tokenizer(tokenizer: Tokenizer | None) -> Tokenizer:
    if tokenizer is None:
        raise DiffGemmaError("this checkpoint has no tokenizer; pass token ids instead of text")
    return tokenizer


def seed_int64(seed: int) -> int:
    """Any integer seed as a signed 64-bit one, wrapped around as torch's generators read it (so the seeds
    they take mean what they meant, and larger ones are taken too)."""
    try:
        value = operator.index(seed)
    except TypeError:
        raise DiffGemmaError(f"a seed must be an integer, got {seed!r}") from None
    return (value + 2**63) % 2**64 - 2**63


class RandomSource:
    """Random tokens and samples.

    Reference mode: one torch stream for the batch, consumed as the reference consumes it. Fast mode:
    counter-based draws keyed by (row seed, the row's draw number, position), so a row draws the same numbers
    whatever else is in its batch, and the whole batch is drawn in one vectorised operation. A row's draws are
    counted only while it draws for itself (`active`): a row that stopped its canvas early while others went on
    starts the next where it would alone.
    """

    def __init__(
        self,
        mode: str,
        batch: int,
        device: torch.device,
        seed: int | Sequence[int] | None,
        weights_dtype: torch.dtype = torch.float32,
    ) -> None:
        _validate_mode(mode)
        self.mode = mode
        self.device = device
        self.weights_dtype = weights_dtype
        self.counts: torch.Tensor | None = None  # [B] each row's draws so far (fast mode), on the device
        self.active: torch.Tensor | None = None  # [B] the rows whose draws count now (None: every row)
        # Draw without reading back from the device (every position at once); on the CPU reading is free.
        self.sync_free = device.type != "cpu"
        if mode == "reference":
            if isinstance(seed, Sequence):
                raise DiffGemmaError("reference mode draws from one stream for the batch: give one seed, not a list")
            self.shared = None if seed is None else torch.Generator(device).manual_seed(seed_int64(seed))
            return
        if isinstance(seed, Sequence):
            if len(seed) != batch:
                raise DiffGemmaError(f"got {len(seed)} seeds for a batch of {batch}")
            seeds = [seed_int64(one) for one in seed]
        else:
            base = int(torch.randint(0, 2**62, (1,)).item()) if seed is None else seed_int64(seed)
            seeds = [seed_int64(base + 1_000_003 * row) for row in range(batch)]
        self.seeds = torch.tensor(seeds, dtype=torch.long, device=device)

    def restart(self, seeds: Sequence[int], counts: Sequence[int]) -> None:
        """Fast mode: rows of these seeds, each with this many draws behind it (an open batch's rows, which join
        and leave)."""
        self.seeds = torch.tensor([seed_int64(seed) for seed in seeds], dtype=torch.long, device=self.device)
        self.counts = torch.tensor(list(counts), dtype=torch.long, device=self.device)
        self.active = None

    def _streams(self) -> torch.Tensor:
        """This draw's stream per row: a fresh one for every call of each row drawing (`active`)."""
        if self.counts is None:
            self.counts = torch.zeros_like(self.seeds)
        self.counts += 1 if self.active is None else self.active
        return sampling.mix64(self.seeds * 0x10001 + self.counts)

    def tokens(self, batch: int, length: int, vocab: int, ranges: torch.Tensor | None = None) -> torch.Tensor:
        """Uniform ids [B, C] below `vocab`, or each within its (low, high) of `ranges` [B, C, 2]."""
        if ranges is None:
            if self.mode == "reference":
                return torch.randint(0, vocab, (batch, length), device=self.device, generator=self.shared)
            positions = torch.arange(length, device=self.device)
            return sampling.counter_tokens(self._streams()[:batch, None], positions[None, :], vocab)
        low, span = ranges[..., 0], ranges[..., 1] - ranges[..., 0]
        if self.mode == "reference":
            # 62 random bits reduced modulo a span of at most the vocabulary: a bias below 2**-40.
            bits = torch.randint(0, 2**62, (batch, length), device=self.device, generator=self.shared)
            return low + bits % span
        positions = torch.arange(length, device=self.device)
        return low + sampling.counter_tokens(self._streams()[:batch, None], positions[None, :], span)

    def sample(self, probs: torch.Tensor, scratch: torch.Tensor | None = None) -> torch.Tensor:
        """Fast mode: one sample at every position [B, C] from `probs` [B, C, V] (see `inverse_cdf_sample`)."""
        batch, length, _ = probs.shape
        positions = torch.arange(length, device=self.device)
        uniform = sampling.counter_uniform(self._streams()[:batch, None], positions[None, :])
        return sampling.inverse_cdf_sample(probs, uniform, scratch)

    def sample_at(
        self, probs: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, scratch: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Fast mode: samples at the given positions only, with the same uniforms `sample` would use there.

        `scratch` (a free float32 tensor of probs' shape, e.g. the logits once read) takes the positions'
        distributions and their running sums in place: no new vocabulary-sized tensor, and no fresh memory
        for the CPU to fault in (on the 26B's vocabulary a step's accepted positions made 0.7 s of it)."""
        uniform = sampling.counter_uniform(self._streams()[rows], cols)
        if scratch is None:
            return sampling.inverse_cdf_sample(probs[rows, cols], uniform)
        vocab = probs.shape[-1]
        picked = scratch.view(-1, vocab)[: rows.numel()]
        torch.index_select(probs.view(-1, vocab), 0, rows * probs.shape[1] + cols, out=picked)
        return sampling.inverse_cdf_sample(picked, uniform, scratch=picked)


@dataclass
class StepOutput:
    canvas: torch.Tensor  # [B, C] next canvas: accepted samples, fresh noise elsewhere, clamps in place
    argmax: torch.Tensor  # [B, C] draft
    accept: torch.Tensor  # [B, C]
    entropy: torch.Tensor  # [B, C] (0 at clamped positions)
    probs: torch.Tensor  # [B, C, V] distribution: the next step's self-conditioning input


def sampler_step(
    logits: torch.Tensor,
    canvas: torch.Tensor,
    entropy_bound: float | torch.Tensor,
    rng: RandomSource,
    fixed_ids: torch.Tensor | None = None,
    probs_out: torch.Tensor | None = None,
    noise_ranges: torch.Tensor | None = None,
) -> StepOutput:
    """From temperature-scaled logits [B, C, V] to the next canvas.

    Reference mode draws as the reference does (multinomial over every position from its generator). Fast
    mode draws by inverse CDF from counter-based uniforms, using float32 `logits` as scratch once it has read
    them (so do not use them afterwards; no extra vocabulary-sized tensor): on accelerators at every position,
    keeping the accepted draws (no host synchronisation); on the CPU at the accepted positions only. Clamped
    positions (`fixed_ids` >= 0) have zero entropy (always accepted, free of the entropy budget) and always
    hold their given id. The fresh noise is drawn within `noise_ranges` [B, C, 2] (low, high) when given; a
    position limited to some ids must already hold `sampling.MASKED_LOGIT` elsewhere in `logits`.
    """
    if rng.mode == "reference":
        sampled = sampling.reference_sample(logits, rng.shared)
        argmax = sampling.last_dim_max(logits)[1]  # torch's argmax, faster on the CPU
        entropy = sampling.reference_entropy(logits)
        # The reference hands the next step its logits in the weights' dtype; softmax happens there.
        probs = torch.softmax(logits.to(rng.weights_dtype), dim=-1, dtype=torch.float32)
    else:
        probs, entropy, argmax = sampling.logit_stats(logits, probs_out)
    fixed = None if fixed_ids is None else fixed_ids >= 0
    if fixed is not None:
        entropy = entropy.masked_fill(fixed, 0.0)
    accept = sampling.entropy_bound_accept(entropy, entropy_bound)
    scratch = logits if logits.dtype == torch.float32 and logits.is_contiguous() else None
    if rng.mode == "fast" and not rng.sync_free:
        # A host read costs nothing on the CPU: draw only where accepted (the same draws, less work).
        rows, cols = accept.nonzero(as_tuple=True)
        sampled = canvas.clone()
        sampled[rows, cols] = rng.sample_at(probs, rows, cols, scratch)
    elif rng.mode == "fast":
        sampled = rng.sample(probs, scratch)
    batch, length = canvas.shape
    accepted = torch.where(accept, sampled, canvas)
    new_canvas = sampling.renoise(accepted, accept, rng.tokens(batch, length, logits.shape[-1], noise_ranges))
    if fixed is not None:
        new_canvas = torch.where(fixed, fixed_ids, new_canvas)
        argmax = torch.where(fixed, fixed_ids, argmax)
    return StepOutput(new_canvas, argmax, accept, entropy, probs)


def _truncation(settings: SamplerSettings) -> dict[str, Any]:
    return {"top_k": settings.top_k, "top_p": settings.top_p, "min_p": settings.min_p}


@dataclass
class RowSampling:
    """A batch's sampler settings as its loop reads them: one value for every row where the rows agree (a plain
    generation's rows do: the arithmetic is the one-setting loop's), a row's own where they differ (an open
    batch's rows, each a request of its own; rows of adapters saved with settings of their own). `steps`: the most
    steps a canvas takes (`row_steps` [B]: each row's own, where they differ; a row stops at its own);
    `temperatures`: the schedule, [steps], or [steps, B, 1, 1] where the rows' schedules differ (a row past its
    own last step keeps its last temperature); `entropy_bound`, `confidence_threshold`: a number, or [B];
    `window`: the drafts the stop test looks back over (`windows` [B]: each row's own, where they differ);
    `truncations`: the top-k / top-p / min-p cuts, one for all rows or one a row (where cuts or temperatures
    differ); `presence`, `frequency`, `repetition`: the penalties (`sampling.penalize`), a number or [B]."""

    steps: int
    row_steps: torch.Tensor | None
    temperatures: torch.Tensor
    entropy_bound: float | torch.Tensor
    confidence_threshold: float | torch.Tensor
    window: int
    windows: torch.Tensor | None
    truncations: list[dict[str, Any]]
    presence: float | torch.Tensor = 0.0
    frequency: float | torch.Tensor = 0.0
    repetition: float | torch.Tensor = 1.0
    penalized: bool = False  # whether any row has a penalty on

    @classmethod
    def of(cls, rows: Sequence[SamplerSettings], device: torch.device) -> RowSampling:
        """From each row's settings (all rows' the same: a plain generation)."""

        def per_row(name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor | None:
            """Each row's value [B], or None where every row's is the same."""
            values = [getattr(row, name) for row in rows]
            return None if len(set(values)) == 1 else torch.tensor(values, dtype=dtype, device=device)

        def shared_or_per_row(name: str) -> float | torch.Tensor:
            own = per_row(name)
            return getattr(rows[0], name) if own is None else own

        steps = max(row.max_denoising_steps for row in rows)
        schedules = {(row.max_denoising_steps, row.t_min, row.t_max) for row in rows}
        if len(schedules) == 1:
            temperatures = sampling.temperature_schedule(*next(iter(schedules)))
        else:
            own = [sampling.temperature_schedule(row.max_denoising_steps, row.t_min, row.t_max) for row in rows]
            padded = [torch.cat([one, one[-1:].expand(steps - len(one))]) for one in own]
            temperatures = torch.stack(padded, dim=1)[..., None, None]
        truncations = [_truncation(row) for row in rows]
        if len(schedules) == 1 and all(cut == truncations[0] for cut in truncations):
            truncations = truncations[:1]
        # A window as long as a row's steps is never met, as no longer one is: the history kept is no longer (a
        # window of a million steps would hold a million drafts a row).
        windows = [min(row.stability_threshold, row.max_denoising_steps) for row in rows]
        return cls(
            steps,
            per_row("max_denoising_steps", torch.long),
            temperatures.to(device),
            shared_or_per_row("entropy_bound"),
            shared_or_per_row("confidence_threshold"),
            max(windows),
            None if len(set(windows)) == 1 else torch.tensor(windows, dtype=torch.long, device=device),
            truncations,
            shared_or_per_row("presence_penalty"),
            shared_or_per_row("frequency_penalty"),
            shared_or_per_row("repetition_penalty"),
            any(row.penalized for row in rows),
        )


class Penalties:
    """What a generation's penalties (`sampling.penalize`) read, on the device: each row's tokens written for good
    so far (its answer's committed canvases, then the settled prefix of the canvas being denoised, where a stream
    commits it as it goes: `commit_stable_prefix`) and the tokens its prompt holds."""

    def __init__(
        self, rows: RowSampling, prompts: list[list[int]], answers: list[list[int]], vocab: int, device: torch.device
    ) -> None:
        self.rows = rows
        self.prompt_seen = torch.zeros(len(prompts), vocab, dtype=torch.bool)
        self.counts = torch.zeros(len(prompts), vocab)
        for row, (prompt, answer) in enumerate(zip(prompts, answers, strict=True)):
            self.prompt_seen[row, prompt] = True
            self.counts[row].index_add_(0, torch.tensor(answer, dtype=torch.long), torch.ones(len(answer)))
        self.prompt_seen, self.counts = self.prompt_seen.to(device), self.counts.to(device)
        self.now = self.counts  # with the settled prefix of the canvas under way

    def commit(self, committed: torch.Tensor) -> None:
        """A canvas [B, C] committed (a row it ended gets no more steps: its padding counts for nothing)."""
        self.counts = self.counts.scatter_add(1, committed, torch.ones_like(committed, dtype=self.counts.dtype))
        self.now = self.counts

    def settle(self, argmax: torch.Tensor, prefix: torch.Tensor) -> None:
        """The canvas's settled prefix now: `prefix` [B, C] marks it in the draft `argmax` [B, C]."""
        self.now = self.counts.scatter_add(1, argmax, prefix.to(self.counts.dtype))

    def apply(self, logits: torch.Tensor, scale: torch.Tensor | float, host_reads: bool) -> None:
        rows = self.rows
        seen = self.prompt_seen | (self.now > 0)
        penalties = (rows.presence, rows.frequency, rows.repetition)
        sampling.penalize(logits, self.now, seen, *penalties, scale=scale, host_reads=host_reads)


class StopCheck:
    """When the host learns that every row of a canvas has stopped. The stop condition itself is computed on
    the device every step (stopped rows freeze); only reading it costs a synchronisation. On the CPU that
    is free, so it is read every step. On CUDA each step starts a non-blocking copy of the flag into pinned
    memory and reads it once it has landed, and every `every` steps waits for it, so the loop never stalls
    on the device yet never runs far past a canvas's end."""

    def __init__(self, device: torch.device, every: int | None = None) -> None:
        self.every = every or (1 if device.type == "cpu" else 8)
        self.peek = device.type == "cuda"
        if self.peek:
            self.host = torch.zeros((), dtype=torch.bool).pin_memory()
            self.event = torch.cuda.Event()

    def __call__(self, finished: torch.Tensor, step: int) -> bool:
        if not self.peek:
            return step % self.every == 0 and bool(finished.all())
        self.host.copy_(finished.all(), non_blocking=True)
        self.event.record()
        if step % self.every == 0:
            self.event.synchronize()
            return bool(self.host)
        return self.event.query() and bool(self.host)


class RowSubset:
    """Decoder passes over the rows still denoising, once some rows of a canvas have stopped (fast mode, where
    the host reads the stop flags every step). The cache's rows are copied when the set changes (it only
    shrinks within a canvas); the self-conditioning input and the logits are moved within their own
    vocabulary-sized buffers (rows packed to the front, then back to their places), so no new one is made.
    A stopped row's logits are left stale: its canvas and draft are frozen and nothing reads them."""

    def __init__(self, cache: EncoderCache) -> None:
        self.cache = cache
        self.rows: list[int] = []
        self.index: torch.Tensor | None = None
        self.rows_cache: EncoderCache | None = None

    def reset(self) -> None:
        """A new canvas (the cache has grown): every row runs again until it stops."""
        self.rows, self.index, self.rows_cache = [], None, None

    def update(self, finished: torch.Tensor) -> bool:
        """Whether some rows have stopped (then the next pass runs the others alone)."""
        running = (~finished).nonzero().squeeze(1)
        if len(running) == len(finished) or len(running) == 0:
            return False
        if len(running) != len(self.rows):
            self.rows, self.index = running.tolist(), running
            self.rows_cache = self.cache.select_rows(running)
        return True

    def denoise(
        self,
        network: DiffusionGemma,
        canvas: torch.Tensor,
        self_conditioning: torch.Tensor | None,
        logits: torch.Tensor,
        scale: torch.Tensor,
    ) -> torch.Tensor:
        """Sampling logits of the running rows, written at their places in `logits` [B, C, V]."""
        count = len(self.rows)
        packed = None
        if self_conditioning is not None:
            for place, row in enumerate(self.rows):  # ascending rows: a row is read before it is overwritten
                if row != place:
                    self_conditioning[place].copy_(self_conditioning[row])
            packed = self_conditioning[:count]
        scale = scale if scale.dim() == 0 else scale[self.index]  # (a row's own temperature, where they differ)
        network.denoise(canvas[self.index], self.rows_cache, packed, logits_out=logits[:count], logit_scale=scale)
        for place in reversed(range(count)):  # descending: each row lands at or after where it was written
            row = self.rows[place]
            if row != place:
                logits[row].copy_(logits[place])
        return logits


class DecoderGraph:
    """The decoder pass captured once as a CUDA graph and replayed for every later step of a generation.

    Eagerly the host issues about a hundred kernels a layer; on an H100 that host work (about 3 ms a layer of
    the 26B shape) was several times the GPU's own (bench/RESULTS.md). The pass reads the cache through a
    `DecoderView` (fixed addresses, refreshed in place when a canvas has been encoded), the distribution buffer
    the sampler refills, and writes the logits buffer; the canvas and the temperature are copied into static
    tensors (the temperature one for all rows, or a row's own: `scale_shape`). A canvas's first step reads a
    zeroed distribution: its soft embedding is zero, and the self-conditioning MLP then adds exactly zero, as with
    no signal. The first call runs eagerly on a side stream (warming up what capture must not do: allocator
    growth, algorithm choice), the second captures.
    """

    def __init__(
        self,
        network: DiffusionGemma,
        cache,
        probs: torch.Tensor,
        logits: torch.Tensor,
        scale_shape: tuple[int, ...] = (),
    ) -> None:
        self.network, self.cache, self.probs, self.logits = network, cache, probs, logits
        self.view = DecoderView(cache, logits.shape[1])
        self.canvas = torch.zeros(logits.shape[:2], dtype=torch.long, device=logits.device)
        self.scale = torch.ones(scale_shape, device=logits.device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.output = logits
        self.warm = False
        self.uncapturable = False  # a capture failed: eager from then on

    def _run(self) -> torch.Tensor:
        return self.network.denoise(
            self.canvas, self.cache, self.probs, logits_out=self.logits, logit_scale=self.scale, view=self.view
        )

    def __call__(self, canvas: torch.Tensor, scale: torch.Tensor, first_step: bool = False) -> torch.Tensor:
        """Logits for `canvas` at inverse temperature `scale`; `first_step`: no self-conditioning signal."""
        if first_step:
            self.probs.zero_()
        self.canvas.copy_(canvas)
        self.scale.copy_(scale)
        self.view.refresh(self.cache)
        if self.canvas.device.type != "cuda" or self.uncapturable:  # (on the CPU: how the tests check the pass)
            return self._run()
        if not self.warm:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self._run()
            torch.cuda.current_stream().wait_stream(side)
            self.warm = True
            return self.logits
        if self.graph is None:
            graph = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(graph):
                    self.output = self._run()  # the logits buffer itself, or a tensor in the graph's own pool
            except RuntimeError as err:
                # Something in the pass cannot be captured on this GPU or build (a host read, a kernel that
                # refuses capture): the generation goes on eagerly rather than fail.
                message = str(err).splitlines()[0] if str(err) else type(err).__name__
                warnings.warn(f"CUDA graph capture failed ({message}); the decoder runs eagerly", stacklevel=2)
                self.uncapturable = True
                return self._run()
            self.graph = graph
        self.graph.replay()
        return self.output


class DecoderPass:
    """How every step of a generation runs the decoder, chosen once for it.

    Fast mode keeps two vocabulary-sized buffers for every step: the logits, with the temperature folded into
    the head (sampling logits, see `head`), and the distribution, which the next step reads as its
    self-conditioning input before the sampler overwrites it. There the pass is a CUDA graph replayed
    (`DecoderGraph`: on CUDA by default, or as `cuda_graph` says); else, where the host reads the stop flags
    every step anyway (the CPU), rows that stopped leave the decoder's batch (`RowSubset`), so a batch no
    longer pays for its slowest row's steps on every row. Reference mode divides fresh logits by the
    temperature, as the reference does. Either way the logits come back with what a position may not draw
    cut (`MASKED_LOGIT`): its excluded ids, then what top-k / top-p / min-p leave out (`sampling.truncate`, at
    temperature 1: in reference mode before the division, as the reference runs transformers' warpers).
    `adapters`, where rows run with LoRA adapters of their own (`AdapterBank.for_rows`), puts the rows' adapters
    in place before each pass, given the rows it runs (None: all of them). Rows of other temperatures or cuts
    (`RowSampling`) are each scaled and cut by their own. `bias` ([B, V]; None: none) is added to each row's
    logits first, in the units of the head's logits (before the temperature, as OpenAI's `logit_bias`); then
    `penalties` (None: none) for what each row has written already.
    """

    def __init__(
        self,
        network: DiffusionGemma,
        cache: EncoderCache,
        mode: str,
        batch: int,
        rows: RowSampling,
        cuda_graph: bool | None,
        sync_free: bool,
        adapters: Callable[[list[int] | None], None] | None = None,
        bias: torch.Tensor | None = None,
        penalties: Penalties | None = None,
    ) -> None:
        self.network, self.cache = network, cache
        self.adapters = adapters or (lambda rows: None)
        self.bias = None if bias is None else bias.to(network.device)[:, None, :]  # (every position's)
        self.penalties = penalties
        # The whole schedule up front, on the device: no host-to-device copy inside the loop.
        self.temperatures = rows.temperatures
        self.inverse_temperatures = self.temperatures.reciprocal()
        self.truncations = rows.truncations
        # fast mode: the cuts' cheaper forms (`sampling.truncate`), host reads where they are free
        self.arithmetic = {"reference_arithmetic": mode == "reference", "host_reads": not sync_free}
        self.logits: torch.Tensor | None = None
        self.probs: torch.Tensor | None = None  # the distribution buffer (fast mode), for the sampler to fill
        self.graph: DecoderGraph | None = None
        self.subset: RowSubset | None = None
        if mode != "fast":
            return
        shape = (batch, network.config.canvas_length, network.config.vocab_size)
        self.logits = torch.empty(shape, device=network.device)
        self.probs = torch.empty(shape, device=network.device)
        if (network.device.type == "cuda") if cuda_graph is None else cuda_graph:
            scale_shape = tuple(self.temperatures.shape[1:])
            self.graph = DecoderGraph(network, cache, self.probs, self.logits, scale_shape)  # one for every canvas
        elif not sync_free:
            self.subset = RowSubset(cache)

    def __call__(
        self,
        canvas: torch.Tensor,
        self_conditioning: torch.Tensor | None,
        step: int,
        finished: torch.Tensor,
        excluded: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Sampling logits [B, C, V] for `canvas` at `step` (from 1) of its canvas; `finished` [B]: rows stopped;
        `excluded` ([B, C, V] booleans): ids each position may not draw."""
        temperature = self.temperatures[step - 1]
        subset = self.subset is not None and self.subset.update(finished)
        self.adapters(self.subset.rows if subset else None)
        if self.logits is None:
            logits = self.network.denoise(canvas, self.cache, self_conditioning)
            return self._cut(logits, excluded, 1.0).div_(temperature)
        scale = self.inverse_temperatures[step - 1]
        if self.graph is not None:
            logits = self.graph(canvas, scale, first_step=self_conditioning is None)
        elif subset:
            logits = self.subset.denoise(self.network, canvas, self_conditioning, self.logits, scale)
        else:
            logits = self.network.denoise(
                canvas, self.cache, self_conditioning, logits_out=self.logits, logit_scale=scale
            )
        return self._cut(logits, excluded, temperature)

    def _cut(self, logits: torch.Tensor, excluded: torch.Tensor | None, scale: torch.Tensor | float) -> torch.Tensor:
        if self.bias is not None:  # (fast mode's logits are over the temperature already: so is the bias)
            logits.add_(self.bias / scale)
        if self.penalties is not None:
            self.penalties.apply(logits, scale, self.arithmetic["host_reads"])
        if excluded is not None:
            logits.masked_fill_(excluded, sampling.MASKED_LOGIT)
        if len(self.truncations) == 1:
            return sampling.truncate(logits, scale=scale, **self.truncations[0], **self.arithmetic)
        for row, truncation in enumerate(self.truncations):  # (each row's own cuts, at its own temperature)
            own_scale = scale[row] if isinstance(scale, torch.Tensor) and scale.dim() else scale
            sampling.truncate(logits[row], scale=own_scale, **truncation, **self.arithmetic)
        return logits

    def end_canvas(self) -> None:
        """The canvas is committed (the cache grows): every row runs again on the next."""
        if self.subset is not None:
            self.subset.reset()


@dataclass
class CanvasDenoiser:
    """How a generation denoises each canvas: its decoder pass, random source and rows' sampler settings, and how the
    loop reads them (the host's stop check; settled prefixes committed, with the ids that end a row)."""

    decoder: DecoderPass
    rng: RandomSource
    rows: RowSampling
    mode: str
    stop_check: StopCheck
    commit_stable_prefix: bool
    ending_ids: torch.Tensor
    tokenizer: Tokenizer | None

    def canvas(
        self,
        canvas_index: int,
        rows_done: torch.Tensor,
        passes: torch.Tensor,
        wanted: torch.Tensor,
        excluded: torch.Tensor | None = None,
        user_ids: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
        first: torch.Tensor | None = None,
        check_allowed: bool = False,
        reused: int = 0,
        start: torch.Tensor | None = None,
    ) -> Generator[Draft, None, tuple[torch.Tensor, torch.Tensor]]:
        """One canvas denoised from random tokens, a `Draft` after every step; returns its final draft [B, C] and
        each row's steps on it [B]. `rows_done` [B]: rows an earlier canvas ended; `passes` [B] counts each row's
        decoder passes (in place); `wanted` [B]: the positions each row's output can hold; `excluded` [B, C, V],
        `user_ids` [B, C] (-1 free), `noise` [B, C, 2] and `first` [B, C, V]: the canvas's constraints
        (`denoising_loop`); `check_allowed`: check each free position keeps an id; `reused`: prompt tokens the
        prefix cache held, for the drafts; `start` [B, C]: ids the canvas starts from in place of its random ones
        (-1: keep those)."""
        decoder, rng, rows = self.decoder, self.rng, self.rows
        batch, length = wanted.shape[0], decoder.network.config.canvas_length
        vocab, device = decoder.network.config.vocab_size, wanted.device
        rng.active = ~rows_done  # (rows an earlier canvas ended draw nothing of their own)
        canvas = rng.tokens(batch, length, vocab, noise)
        if start is not None:
            canvas = torch.where(start >= 0, start, canvas)
        fixed_ids, fixed = user_ids, None if user_ids is None else user_ids >= 0
        if fixed is not None:
            canvas = torch.where(fixed, user_ids, canvas)
        if check_allowed:
            _check_some_allowed(excluded, fixed, canvas_index * length)
        free_count = length - (fixed.sum(-1) if fixed is not None else 0)
        settled = torch.zeros(batch, dtype=torch.long, device=device)
        argmax = canvas
        self_conditioning = None
        if first is not None:
            # into the distribution buffer: the loop moves rows within it (`RowSubset`) and refills it
            self_conditioning = first if decoder.probs is None else decoder.probs.copy_(first)
        # Rows already done (an earlier canvas ended them) ride along frozen. The reference keeps denoising
        # them, which reference mode must reproduce; fast mode lets the canvas stop without them.
        finished = rows_done.clone() if self.mode == "fast" else torch.zeros_like(rows_done)
        history = torch.full((rows.window, batch, length), -1, dtype=torch.long, device=device)
        canvas_steps = torch.zeros(batch, dtype=torch.long, device=device)
        for step in range(1, rows.steps + 1):
            active = ~(finished | rows_done)
            passes += active
            canvas_steps += ~finished
            logits = decoder(canvas, self_conditioning, step, finished, excluded)
            rng.active = ~finished  # (a row that stopped draws no more of its own: it goes on alone as it would)
            out = sampler_step(logits, canvas, rows.entropy_bound, rng, fixed_ids, decoder.probs, noise)
            new_canvas, new_argmax, accept, entropy = out.canvas, out.argmax, out.accept, out.entropy
            # Rows that already stopped keep their canvas and draft (they ride along in the batch).
            new_argmax = torch.where(finished[:, None], argmax, new_argmax)
            new_canvas = torch.where(finished[:, None], canvas, new_canvas)
            mean_entropy = entropy.sum(-1) / free_count if fixed is not None else entropy.mean(-1)
            stop = sampling.stable_and_confident(
                history, new_argmax, mean_entropy, rows.confidence_threshold, rows.windows
            )
            if rows.row_steps is not None:  # (a row of fewer steps than others stops at its own last)
                stop = stop | (rows.row_steps <= step)
            if self.commit_stable_prefix:
                settled = sampling.stable_prefix(
                    settled, history, new_argmax, entropy, rows.entropy_bound, rows.windows
                )
                prefix = torch.arange(length, device=device)[None, :] < settled[:, None]
                fixed_ids = torch.where(prefix, new_argmax, -1 if user_ids is None else user_ids)
                if decoder.penalties is not None:  # (what has settled is written for good: penalised from now)
                    decoder.penalties.settle(new_argmax, prefix)
                # A row whose settled prefix holds all it will give (its limit, or an EOS) is done: what
                # follows could not change its output.
                stop = stop | (settled >= wanted)
                if self.ending_ids.numel():
                    stop = stop | (torch.isin(new_argmax, self.ending_ids) & prefix).any(-1)
            history = sampling.push_history(history, new_argmax)
            finished = finished | stop
            canvas, argmax, self_conditioning = new_canvas, new_argmax, out.probs
            yield Draft(
                canvas_index,
                step,
                argmax,
                accept,
                mean_entropy,
                finished | rows_done,
                self.tokenizer,
                settled if self.commit_stable_prefix else None,
                entropy,
                reused,
            )
            if self.stop_check(finished, step):
                break
        return argmax, canvas_steps


def _validate_mode(mode: str) -> None:
    if mode not in MODES:
        raise DiffGemmaError(f"mode must be one of {MODES}, got {mode!r}")


# As a decorator on a generator, no_grad holds only while the loop runs, not across its yields: a `with` block
# inside would leave gradients off in the caller between events, and two interleaved loops would restore the
# mode out of order.
@torch.no_grad()
def denoising_loop(
    network: DiffusionGemma,
    settings: SamplerSettings,
    ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    mode: str = "fast",
    seed: int | Sequence[int] | None = None,
    clamp: torch.Tensor | None = None,
    stop_at_eos: bool = True,
    tokenizer: Tokenizer | None = None,
    row_limits: Sequence[int] | None = None,
    commit_stable_prefix: bool = False,
    stop_check_every: int | None = None,
    sync_free: bool | None = None,
    cuda_graph: bool | None = None,
    token_ranges: torch.Tensor | None = None,
    banned_tokens: torch.Tensor | None = None,
    first_self_conditioning: torch.Tensor | None = None,
    noise_ranges: torch.Tensor | None = None,
    end_rows: Callable[[list[list[int]]], Sequence[bool]] | None = None,
    prefix_cache: PrefixCache | None = None,
    images: ImageInputs | None = None,
    predictions: Sequence[Sequence[int]] | None = None,
    thinking_budget: ThinkingBudget | None = None,
    adapters: Callable[[list[int] | None], None] | None = None,
    row_settings: Sequence[SamplerSettings] | None = None,
    logit_bias: torch.Tensor | None = None,
) -> Iterator[Draft | CanvasCommit | Done]:
    """The whole generation as a stream of events; closing the iterator stops the work at once.

    `clamp` [B, L] fixes generated positions (L <= canvases * C) to given ids; -1 leaves a position free.
    `row_limits` gives each row its own max_new_tokens (at most the settings' value). With
    `commit_stable_prefix`, a canvas's leading positions are fixed as soon as they settle (argmax stable
    over the stability window, entropy below the entropy bound), so a stream can send them early and never
    take them back; a row stops its canvas once they hold all it will give (its limit, or an EOS).
    `stop_check_every` sets how often the host waits to learn whether a canvas is done (see `StopCheck`; every
    step on the CPU, every 8 with non-blocking peeks on CUDA). `sync_free` forces the
    accelerator way of sampling (no host read in a step) on or off; by default it is on off the CPU.
    `cuda_graph` (fast mode; by default on CUDA) replays the decoder pass as one CUDA graph for every step
    (`DecoderGraph`; asked for off CUDA, the same pass runs uncaptured).
    `token_ranges` [B, L, 2] (L <= canvases * C) limits each generated position to the ids in its half-open
    (low, high) range: samples, drafts and re-noising stay inside it (a constrained vocabulary per position,
    e.g. a sudoku cell's nine digits). It costs a [B, C, V] boolean mask per canvas. `banned_tokens`
    [B, L, V] (L <= canvases * C, booleans) names ids a generated position must never take: samples and drafts
    avoid them, while the re-noising may still draw them (noise stands for any token, as in training; a
    sudoku cell never samples a digit a given among its peers holds); [B, V] bans the same ids at every
    position (a view, no [B, L, V] mask is made). Every free position must keep an id.
    `first_self_conditioning` [B, L, V] (L <= canvases * C, probabilities) is each canvas's first-step
    self-conditioning input in place of no signal: what is known before the first pass (a sudoku model
    trained with it reads its givens and candidates there). `noise_ranges` [B, L, 2] (L <= canvases * C) sets
    where a position's first canvas token and its re-noising draw from instead of `token_ranges` (or the whole
    vocabulary): one id there makes the noise a mask (a sudoku model trained on masked cells re-noises a cell
    to its empty token).
    `end_rows`, called when a canvas is committed with every row's generated ids so far (as `new_tokens` gives
    them), names the rows that end there, as EOS would end them (a stop string; a client that went away); when
    every row has ended, no further canvas is denoised.
    `prefix_cache` (fast mode, a batch of one): a prompt that begins with the one it kept encodes only the rest,
    and this prompt's cache is kept there when the generation ends. `images`: images' soft tokens in the prompt
    (`ImageInputs`); the prefix cache tells prompts with other pictures apart (`PromptReuse`).
    `predictions` (one id list a row; -1: no prediction there; empty: none) are what each row's output is
    expected to be, mostly (OpenAI's predicted outputs): each canvas starts from its part of it instead of random
    tokens (`predicted_start`: after the first, the part that follows what the row has written, so an answer
    that added or left out text finds the rest of the prediction where it now goes). The denoiser reads a canvas
    that is mostly right as one nearly denoised, so the positions the output shares with it settle in a step or
    two, and the rest are rewritten (the random numbers drawn are the same; clamped ids still win).
    `thinking_budget`: the most tokens of thought each row's reply (one that thinks) writes (`ThinkingBudget`).
    `adapters` puts each row's LoRA adapter in place before every pass, given the rows it runs (None: all;
    `AdapterBank.for_rows`), so that the rows of one generation may each run with their own, and generations
    interleaved (streams stepped in turn) with others. `row_settings` (one a row) denoise each row with its own
    sampler settings (`RowSampling`: rows of adapters with settings of their own); `settings`' token limit, EOS and
    padding ids hold for all. `logit_bias` [B, V] (finite numbers) is added to every position's logits before the
    temperature, top-k / top-p / min-p and the entropy bound read them (OpenAI's `logit_bias`: a large one makes
    a token all but certain, a negative one rare); the re-noising is left as it is.
    """
    _validate_mode(mode)
    started = time.perf_counter()
    config = network.config
    device = network.device
    batch, prompt_length = ids.shape
    length, vocab = config.canvas_length, config.vocab_size
    canvases = math.ceil(settings.max_new_tokens / length)
    limits = [settings.max_new_tokens] * batch if row_limits is None else list(row_limits)
    if len(limits) != batch or not all(0 < limit <= settings.max_new_tokens for limit in limits):
        raise DiffGemmaError(f"max_new_tokens: give one a row ({batch}), each between 1 and {settings.max_new_tokens}")
    row_canvases = torch.tensor([math.ceil(limit / length) for limit in limits], device=device)
    if bool(((ids < 0) | (ids >= vocab)).any()):  # (once, before the loop: an embedding would fail obscurely)
        raise DiffGemmaError(f"prompt token ids must be between 0 and {vocab - 1} (the vocabulary)")
    given = _Constraints(clamp, token_ranges, noise_ranges, banned_tokens, first_self_conditioning)
    constraints = given.checked(batch, canvases * length, vocab, device)
    bias = None if logit_bias is None else checked_bias(logit_bias, batch, vocab)
    if prompt_length + canvases * length > config.max_position_embeddings:
        raise DiffGemmaError(
            f"prompt ({prompt_length}) plus {canvases} canvas(es) of {length} exceeds the model's "
            f"{config.max_position_embeddings} positions"
        )
    ids = ids.to(device)
    eos = torch.tensor(settings.eos_token_id, dtype=torch.long, device=device)
    ending_ids = eos if stop_at_eos else eos[:0]  # the ids that end a row
    pad = settings.pad_token_id
    rng = RandomSource(mode, batch, device, seed, network.dtype)
    if sync_free is not None:
        rng.sync_free = sync_free
    stop_check = StopCheck(device, stop_check_every)

    capacity = prompt_length + canvases * length
    every_row = adapters or (lambda rows: None)
    every_row(None)  # (before the prefix cache is looked in: its snapshots are per adapter)
    prompt = PromptReuse(network, prefix_cache, ids, attention_mask, mode, images)
    cache = prompt.new_cache(network, batch, capacity)
    rows = RowSampling.of(row_settings or [settings], device)
    penalties = None
    if rows.penalized:
        real = torch.ones_like(ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        prompts = [row[keep].tolist() for row, keep in zip(ids.cpu(), real.cpu(), strict=True)]
        penalties = Penalties(rows, prompts, [[] for _ in prompts], vocab, device)
    decoder = DecoderPass(network, cache, mode, batch, rows, cuda_graph, rng.sync_free, adapters, bias, penalties)
    denoiser = CanvasDenoiser(decoder, rng, rows, mode, stop_check, commit_stable_prefix, ending_ids, tokenizer)
    sequences = ids
    rows_done = torch.zeros(batch, dtype=torch.bool, device=device)
    passes = torch.zeros(batch, dtype=torch.long, device=device)
    steps_per_canvas: list[list[int]] = []
    with prompt:
        prompt.encode(network, ids, attention_mask, cache)
        for canvas_index in range(canvases):
            span = slice(canvas_index * length, (canvas_index + 1) * length)
            excluded = constraints.excluded(span, vocab)
            user_ids, noise, first = constraints.on_canvas(span)
            start = None
            # (the host learns the canvas committed before: it waited for it)
            reading = predictions is not None or thinking_budget is not None
            written = sequences[:, prompt_length:].tolist() if reading else []
            if predictions is not None:
                starts = [predicted_start(row, done, length) for row, done in zip(predictions, written, strict=True)]
                start = torch.tensor(starts, dtype=torch.long, device=device)
            if thinking_budget is not None:
                held = [thinking_budget.held(canvas_index, done, length) for done in written]
                user_ids = with_held(user_ids, held, length, device)
            # the positions of this canvas each row's output can hold (its limit may end inside it)
            wanted = (torch.tensor(limits, device=device) - canvas_index * length).clamp(max=length)
            argmax, canvas_steps = yield from denoiser.canvas(
                canvas_index,
                rows_done,
                passes,
                wanted,
                excluded,
                user_ids,
                noise,
                first,
                constraints.banned_tokens is not None,
                prompt.reused,
                start,
            )
            decoder.end_canvas()
            committed, done_now = committed_canvas(argmax, rows_done, row_canvases <= canvas_index + 1, ending_ids, pad)
            if penalties is not None:
                penalties.commit(committed)
            sequences = torch.cat([sequences, committed], dim=1)
            steps_per_canvas.append(canvas_steps.tolist())
            if end_rows is not None:
                generated = _new_tokens(sequences, limits, settings.eos_token_id, prompt_length, stop_at_eos)
                ended = _ended_by_caller(end_rows, generated, rows_done.tolist())
                for row in range(batch):
                    if ended[row]:  # what it has so far is all it gets
                        limits[row] = min(limits[row], (canvas_index + 1) * length)
                done_now |= torch.tensor(ended, device=device)
            yield CanvasCommit(canvas_index, committed, canvas_steps.tolist(), tokenizer)
            rows_done |= done_now
            if bool(rows_done.all()):
                break
            every_row(None)
            network.encode(committed, cache, return_hidden=False)

    new_tokens = _new_tokens(sequences, limits, settings.eos_token_id, prompt_length, stop_at_eos)
    generated = sequences[:, prompt_length:]
    valid = (generated != pad).sum(-1) if pad is not None else torch.full_like(passes, generated.shape[1])
    per_forward = (valid.float() / passes.clamp_min(1).float()).tolist()
    result = GenerationResult(
        sequences=sequences.cpu(),
        prompt_length=prompt_length,
        new_tokens=new_tokens,
        steps=steps_per_canvas,
        tokens_per_forward=per_forward,
        wall_time=time.perf_counter() - started,
        stopped=[False] * batch,
        reached_limit=[len(tokens) >= limit for tokens, limit in zip(new_tokens, limits, strict=True)],
        cached_tokens=prompt.reused,
    )
    yield Done(result)


class PromptReuse:
    """A generation's use of the prefix cache (fast mode, a batch of one, no padding; otherwise none): the kept
    snapshot its prompt begins with, if any, the snapshot it makes of its own prompt, and handing that back
    to the prefix cache when the generation ends, however it ends (until then the cache is the generation's
    alone). Used as a context around the generation. A prompt with pictures is matched by its ids with each
    picture's run of image ids standing for that picture (`_prompt_key`), so another picture is another prompt.

    `start`: the prompt's first position in a cache of its own (a row joining an open batch: its prompt ends where
    the batch's cache ends, perhaps at its own length, from 0). There the snapshot taken is copied into place (its
    keys turned to their new positions) and handed back as it was, and the one made is a copy moved to begin at 0,
    as every kept snapshot does: the row's cache is never a kept snapshot's, which another row joining with it
    may take and rewind. None: the generation's cache is the snapshot's own, from 0."""

    def __init__(
        self,
        network: DiffusionGemma,
        prefix_cache: PrefixCache | None,
        ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        mode: str,
        images: ImageInputs | None = None,
        start: int | None = None,
    ) -> None:
        usable = ids.shape[0] == 1 and attention_mask is None and mode == "fast"
        # (a batch's rows are padded apart; reference mode encodes as the reference does)
        self.prefix_cache = prefix_cache if usable else None
        self.images = images
        self.start = start
        self.prompt_ids: list[int] = _prompt_key(ids[0], images) if self.prefix_cache is not None else []
        self.taken = self.prefix_cache.take(network, self.prompt_ids) if self.prefix_cache is not None else None
        # the one handed back: the taken one (a shared one's copy is not), unless the generation makes a longer one
        self.snapshot = None if self.taken is not None and self.taken.shared else self.taken
        self.reused = len(self.taken.ids) if self.taken is not None else 0  # prompt tokens not encoded again

    def new_cache(self, network: DiffusionGemma, batch: int, capacity: int) -> EncoderCache:
        """The generation's encoder cache: the taken snapshot's, grown now to its final size (a decoder graph's
        view needs that), or a new one (beginning at `start`, the snapshot copied in)."""
        if self.taken is None or self.start is not None:
            cache = network.new_cache(batch, capacity)
            if self.start:
                cache.skip_to(self.start)
            if self.taken is not None:
                cache.place(self.taken.cache, 0, network.shift_keys)
            return cache
        self.taken.cache.ensure_capacity(capacity - self.reused, exact=True)
        return self.taken.cache

    def encode(
        self, network: DiffusionGemma, ids: torch.Tensor, attention_mask: torch.Tensor | None, cache: EncoderCache
    ) -> None:
        """Encode the prompt past what the cache holds: up to the end of its opening system turns where no
        snapshot held them (a shared snapshot kept there, a copy), up to the prefix cache's snapshot point,
        snapshot it there, then the rest. (No cut falls inside a picture's run: a snapshot ends at a turn's
        opening or a prompt's end, and a run is always followed by its end-of-image id.)"""
        prompt_length = ids.shape[1]
        prefix_cache = self.prefix_cache
        point = prefix_cache.point(self.prompt_ids) if prefix_cache is not None else prompt_length
        shared = prefix_cache.shared_point(self.prompt_ids) if prefix_cache is not None else None

        def encode_part(start: int, end: int) -> None:
            images = self.images.columns(start, end) if self.images is not None else None
            network.encode(ids[:, start:end], cache, attention_mask, return_hidden=False, images=images)

        done = self.reused
        if shared is not None and done < shared:
            encode_part(done, shared)
            done = shared
            copied = self._copy(network, cache, shared)
            prefix_cache.keep(prefix_cache.snapshot_of(network, self.prompt_ids[:shared], copied, shared=True))
        if done < point:
            encode_part(done, point)
            done = point
            if prefix_cache is not None:
                kept = cache if self.start is None else self._copy(network, cache, point)
                self.snapshot = prefix_cache.snapshot_of(network, self.prompt_ids[:point], kept)
        if done < prompt_length:
            encode_part(done, prompt_length)

    def _copy(self, network: DiffusionGemma, cache: EncoderCache, length: int) -> EncoderCache:
        """The prompt's first `length` tokens that `cache` holds now, in a cache of their own beginning at 0."""
        kept = network.new_cache(1, length)
        kept.place(cache, self.start or 0, network.shift_keys)
        return kept

    def __enter__(self) -> PromptReuse:
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self.prefix_cache is not None and self.snapshot is not None:
            self.prefix_cache.keep(self.snapshot)


def _prompt_key(row: torch.Tensor, images: ImageInputs | None) -> list[int]:
    """A prompt's ids as the prefix cache matches them: each picture's run of image ids made a run of one
    negative number drawn from its soft tokens, so prompts that differ in a picture differ there."""
    key = row.tolist()
    if images is None:
        return key
    index, blocks = images.index[0].tolist(), images.blocks[0].tolist()
    for block in sorted(set(blocks) - {-1}):
        spots = [i for i, b in enumerate(blocks) if b == block]
        soft = images.features[[index[i] for i in spots]].float().cpu().numpy().tobytes()
        fingerprint = -1 - int.from_bytes(hashlib.blake2b(soft, digest_size=8).digest(), "big") // 2
        for spot in spots:
            key[spot] = fingerprint
    return key


@dataclass
class _Constraints:
    """What a caller fixes or limits on the generated positions (see `denoising_loop`), checked, padded with
    "no effect" to every position the generation can reach, and on the device; None where not given."""

    clamp: torch.Tensor | None  # [B, L] ids, -1 free
    token_ranges: torch.Tensor | None  # [B, L, 2]
    noise_ranges: torch.Tensor | None  # [B, L, 2]: the token ranges past those given
    banned_tokens: torch.Tensor | None  # [B, L, V] booleans (a view where one set holds for every position)
    first_self_conditioning: torch.Tensor | None  # [B, L, V] probabilities

    def checked(self, batch: int, positions: int, vocab: int, device: torch.device) -> _Constraints:
        """These constraints as given, checked for `batch` rows of `positions` generated positions, padded, on
        `device`."""
        clamp, token_ranges, noise_ranges = self.clamp, self.token_ranges, self.noise_ranges
        banned_tokens, first_self_conditioning = self.banned_tokens, self.first_self_conditioning
        if clamp is not None:
            if clamp.dtype.is_floating_point or clamp.dtype.is_complex or clamp.dtype == torch.bool:
                raise DiffGemmaError(f"clamp must hold integer token ids, got {clamp.dtype}")
            if clamp.ndim != 2 or clamp.shape[0] != batch or clamp.shape[1] > positions:
                raise DiffGemmaError(f"clamp must be [batch={batch}, at most {positions}] token ids (-1 = free)")
            if bool(((clamp < -1) | (clamp >= vocab)).any()):
                raise DiffGemmaError(f"clamp must hold -1 (free) or token ids below {vocab}")
            clamp = torch.nn.functional.pad(clamp, (0, positions - clamp.shape[1]), value=-1).to(device)
        if token_ranges is not None:
            token_ranges = _checked_ranges(token_ranges, batch, positions, vocab).to(device)
        if noise_ranges is not None:
            checked = _checked_ranges(noise_ranges, batch, positions, vocab, "noise_ranges").to(device)
            given = noise_ranges.shape[1]  # past the positions given, the noise follows the token ranges
            noise_ranges = (
                checked if token_ranges is None else torch.cat([checked[:, :given], token_ranges[:, given:]], 1)
            )
        elif token_ranges is not None:
            noise_ranges = token_ranges
        if banned_tokens is not None:
            if banned_tokens.dtype != torch.bool:
                raise DiffGemmaError(f"banned_tokens must be booleans, got {banned_tokens.dtype}")
            if banned_tokens.ndim == 2 and banned_tokens.shape == (batch, vocab):  # every position's
                banned_tokens = banned_tokens.to(device)[:, None, :].expand(batch, positions, vocab)
            else:
                banned_tokens = _checked_per_position(
                    banned_tokens, "banned_tokens", "booleans", batch, positions, vocab, False
                ).to(device)
        if first_self_conditioning is not None:
            first_self_conditioning = _checked_per_position(
                first_self_conditioning.float(),
                "first_self_conditioning",
                "probabilities",
                batch,
                positions,
                vocab,
                0.0,
            ).to(device)
        return _Constraints(clamp, token_ranges, noise_ranges, banned_tokens, first_self_conditioning)

    def excluded(self, span: slice, vocab: int) -> torch.Tensor | None:
        """[B, C, V] booleans: the ids a canvas's positions may not take (outside their range, or banned)."""
        excluded = None
        if self.token_ranges is not None:
            excluded = sampling.outside_ranges(self.token_ranges[:, span], vocab)
        if self.banned_tokens is not None:
            excluded = self.banned_tokens[:, span] if excluded is None else excluded | self.banned_tokens[:, span]
        return excluded

    def on_canvas(self, span: slice) -> tuple[torch.Tensor | None, ...]:
        """A canvas's part of the clamp, the noise ranges and the first self-conditioning (None where not given)."""
        return tuple(
            None if given is None else given[:, span]
            for given in (self.clamp, self.noise_ranges, self.first_self_conditioning)
        )


def predicted_start(prediction: Sequence[int], written: Sequence[int], length: int) -> list[int]:
    """A canvas's start from a prediction of the output (-1 where it has none): the `length` ids of it that follow
    what the row has `written` so far. The two are aligned (their longest common runs) and the prediction is
    read on from where its last run shared with the writing ends, as far past it as the writing went on: text
    the answer added or left out moves the rest of the prediction to where it now goes."""
    at = 0
    if written:
        runs = difflib.SequenceMatcher(None, written, prediction, autojunk=False).get_matching_blocks()
        shared = [run for run in runs if run.size]
        at = len(written) if not shared else shared[-1].b + len(written) - shared[-1].a
    part = list(prediction[at : at + length])
    return part + [-1] * (length - len(part))


@dataclass(frozen=True)
class ThinkingBudget:
    """The most tokens of thought a reply that thinks may write: its thinking channel (`opening`, the reply's
    first ids, then the thought) is closed (`close`) right after `tokens` of thought. Block diffusion writes a
    canvas at once, so the close is held in place on the canvas it falls in (`held`), from that canvas's start,
    wherever the reply is still thinking there: the model sees where its thought must end and writes one that
    ends there (not a thought cut off mid-sentence, as a budget that forces the close token by token gives),
    with the answer after it. A reply that closed its thinking sooner is left alone; 0 tokens: the empty
    thinking channel of a reply that does not think."""

    tokens: int
    opening: tuple[int, ...]
    close: int

    def held(self, canvas_index: int, generated: Sequence[int], length: int) -> list[int] | None:
        """Ids to hold in place on canvas `canvas_index` ([length], -1 free) of a row that has `generated` these
        ids so far; None where it holds none. On the first canvas the opening is held too (a reply that thinks
        begins with it, and the close is not to land in an answer)."""
        close_at = len(self.opening) + self.tokens - canvas_index * length  # (on this canvas)
        if not 0 <= close_at < length:
            return None
        if canvas_index > 0 and (tuple(generated[: len(self.opening)]) != self.opening or self.close in generated):
            return None  # not thinking, or done with it
        ids = [-1] * length
        if canvas_index == 0:
            ids[: len(self.opening)] = self.opening
        ids[close_at] = self.close
        return ids


def with_held(
    user_ids: torch.Tensor | None, held: Sequence[list[int] | None], length: int, device: torch.device
) -> torch.Tensor | None:
    """A canvas's clamp ([B, C] ids, -1 free; None: none) with each row's `held` ids (`ThinkingBudget.held`; None:
    none) put in where the clamp leaves a position free."""
    if all(ids is None for ids in held):
        return user_ids
    extra = torch.tensor([ids or [-1] * length for ids in held], dtype=torch.long, device=device)
    return extra if user_ids is None else torch.where(user_ids >= 0, user_ids, extra)


def banned_mask(ids: Sequence, batch: int, vocab: int, device: torch.device) -> torch.Tensor:
    """Token ids banned at every position, for every row (a list of ids) or per row (a list of lists), as a
    [B, V] boolean mask (`denoising_loop` reads a 2-D mask as every position's)."""
    rows = list(ids) if ids and all(isinstance(row, list | tuple) for row in ids) else [list(ids)] * batch
    ids_only = all(is_int(t) and 0 <= t < vocab for row in rows for t in row)
    if len(rows) != batch or not ids_only:
        raise DiffGemmaError(
            f"banned_tokens must be a boolean tensor, or token ids below {vocab}: a list, or {batch} lists (one a row)"
        )
    mask = torch.zeros(batch, vocab, dtype=torch.bool, device=device)
    for row, banned in enumerate(rows):
        mask[row, list(banned)] = True
    return mask


def logit_bias_rows(given: Any, batch: int, vocab: int) -> torch.Tensor | None:
    """A logit bias as `generate` takes it, as [B, V] float32 (None: none): a dict (token id: bias) for every
    row, a list of them (one a row; None or empty: none), or a float tensor ([V]: every row's, or [B, V])."""
    if given is None:
        return None
    if isinstance(given, torch.Tensor):
        return checked_bias(given, batch, vocab)
    if isinstance(given, dict):
        given = [given] * batch
    if not isinstance(given, list | tuple) or len(given) != batch:
        raise DiffGemmaError(
            f"logit_bias must be a dict of token id to bias, or one (or None) a row ({batch}), got {given!r:.60}"
        )
    if not any(given):
        return None
    rows = torch.zeros(batch, vocab)
    for row, biases in enumerate(given):
        if not biases:
            continue
        if not isinstance(biases, dict):
            raise DiffGemmaError(f"logit_bias must be a dict of token id to bias, got {biases!r:.60}")
        ids, values = list(biases), list(biases.values())
        if not all(is_int(token) and 0 <= token < vocab for token in ids):
            raise DiffGemmaError(f"logit_bias's keys must be token ids below {vocab}, got {ids!r:.80}")
        if not all(isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in values):
            raise DiffGemmaError(f"logit_bias's values must be finite numbers, got {values!r:.80}")
        rows[row, ids] = torch.tensor(values, dtype=torch.float32)
    return rows


def checked_bias(bias: torch.Tensor, batch: int, vocab: int) -> torch.Tensor:
    """A [B, V] logit bias tensor ([V]: every row's), checked: float32, finite."""
    if not isinstance(bias, torch.Tensor) or not bias.dtype.is_floating_point:
        given = bias.dtype if isinstance(bias, torch.Tensor) else type(bias).__name__
        raise DiffGemmaError(f"logit_bias must be a float tensor [{vocab}] or [batch={batch}, {vocab}], got {given}")
    if bias.ndim == 1:
        bias = bias[None].expand(batch, -1)
    if bias.shape != (batch, vocab):
        raise DiffGemmaError(f"logit_bias must be [{vocab}] or [batch={batch}, {vocab}], got {list(bias.shape)}")
    if not bool(bias.isfinite().all()):
        raise DiffGemmaError("logit_bias must hold finite numbers (ban a token with banned_tokens)")
    return bias.float()


def _checked_ranges(
    ranges: torch.Tensor, batch: int, positions: int, vocab: int, name: str = "token_ranges"
) -> torch.Tensor:
    """[B, L, 2] (low, high) ranges, checked, padded to every generated position with the whole vocabulary."""
    if ranges.ndim != 3 or ranges.shape[0] != batch or ranges.shape[1] > positions or ranges.shape[2] != 2:
        raise DiffGemmaError(f"{name} must be [batch={batch}, at most {positions}, 2] (low, high) id pairs")
    low, high = ranges[..., 0], ranges[..., 1]
    if bool(((low < 0) | (high > vocab) | (low >= high)).any()):
        raise DiffGemmaError(f"each of {name}'s ranges (low, high) must satisfy 0 <= low < high <= {vocab}")
    fill = torch.tensor([0, vocab], dtype=torch.long).expand(batch, positions - ranges.shape[1], 2)
    return torch.cat([ranges.long().cpu(), fill], dim=1)


def _checked_per_position(
    values: torch.Tensor, name: str, what: str, batch: int, positions: int, vocab: int, fill: bool | float
) -> torch.Tensor:
    """[B, L, V] per-position values over the vocabulary (`what` they are), checked and padded with `fill` (no
    effect) to every generated position."""
    if values.ndim != 3 or values.shape[0] != batch or values.shape[1] > positions or values.shape[2] != vocab:
        raise DiffGemmaError(
            f"{name} must be {what} [batch={batch}, at most {positions}, {vocab}], got {list(values.shape)}"
        )
    return torch.nn.functional.pad(values, (0, 0, 0, positions - values.shape[1]), value=fill)


def _check_some_allowed(excluded: torch.Tensor, fixed: torch.Tensor | None, offset: int) -> None:
    """Every free position of a canvas keeps at least one id once the ranges and the bans are applied."""
    empty = excluded.all(dim=-1)
    if fixed is not None:
        empty &= ~fixed
    if bool(empty.any()):
        row, position = (int(v) for v in empty.nonzero()[0])
        where = f"row {row}, generated position {offset + position}"
        raise DiffGemmaError(f"{where}: every token is banned or out of range")


def committed_canvas(
    argmax: torch.Tensor, rows_done: torch.Tensor, at_limit: torch.Tensor, eos: torch.Tensor, pad: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """A finished canvas as it enters the sequences, and the rows it ends ([B]: `at_limit`, or an id of `eos` on
    it). With a pad id, once any row has ended, rows ended before are all padding and each row pads after its
    first EOS."""
    done_now = at_limit | torch.isin(argmax, eos).any(dim=-1) if eos.numel() else at_limit
    committed = argmax.clone()
    if pad is not None and bool((rows_done | done_now).any()):
        committed[rows_done] = pad
        if eos.numel():
            committed = torch.where(rows_done[:, None], committed, sampling.pad_after_eos(committed, eos, pad)[0])
    return committed, done_now


def _ended_by_caller(
    end_rows: Callable[[list[list[int]]], Sequence[bool]], generated: list[list[int]], rows_done: list[bool]
) -> list[bool]:
    """The rows `end_rows` ends after a canvas, among those still going (it sees every row's output so far)."""
    named = list(end_rows(generated))
    if len(named) != len(generated):
        raise DiffGemmaError(f"end_rows must return one answer for each of the {len(generated)} rows, got {named}")
    return [bool(name) and not done for name, done in zip(named, rows_done, strict=True)]


def _new_tokens(
    sequences: torch.Tensor, limits: list[int], eos: tuple[int, ...], prompt_length: int, stop_at_eos: bool
) -> list[list[int]]:
    """Each row's generated ids as the user asked for them: at most its limit, ending before EOS."""
    ending = eos if stop_at_eos else ()
    rows = zip(sequences.tolist(), limits, strict=True)
    return [row_output(row[prompt_length:], limit, ending)[0] for row, limit in rows]


def row_output(generated: list[int], limit: int, eos_ids: tuple[int, ...]) -> tuple[list[int], int | None]:
    """A row's committed ids as its output: those within its limit before its first EOS, and that EOS (None where
    none came within the limit: it ended at its limit, or was ended by its caller)."""
    tokens = generated[:limit]
    end = next((index for index, token in enumerate(tokens) if token in eos_ids), None)
    return (tokens, None) if end is None else (tokens[:end], tokens[end])


def run_to_end(
    events: Iterator[Draft | CanvasCommit | Done], progress: Callable[[Draft], None] | None = None
) -> GenerationResult:
    """The result the events end with; `progress`, if given, is called with each draft on the way."""
    for event in events:
        if isinstance(event, Done):
            return event.result
        if progress is not None and isinstance(event, Draft):
            progress(event)
    raise RuntimeError("generation ended without a result")  # pragma: no cover - the loop always yields Done


def cut_at_stops(result: GenerationResult, stops: StopStrings) -> GenerationResult:
    """Each row's tokens through the one that completed its first stop string (rows without one: as they are)."""
    for row, tokens in enumerate(result.new_tokens):
        through = stops.tokens_through(tokens)
        result.stopped[row] = through is not None
        result.new_tokens[row] = tokens if through is None else tokens[:through]
        result.reached_limit[row] = result.reached_limit[row] and through is None
    return result


def attach_text(
    result: GenerationResult, tokenizer: Tokenizer | None, batched: bool, stops: StopStrings | None = None
) -> GenerationResult:
    if tokenizer is not None:
        texts = [
            stops.text_before(tokenizer.decode, row) if stopped and stops is not None else tokenizer.decode(row)
            for row, stopped in zip(result.new_tokens, result.stopped, strict=True)
        ]
        result.text = texts if batched else texts[0]
    return result


def infill_clamp(
    tokenizer: Tokenizer,
    prefix: str,
    suffix: str,
    length: int,
    canvas_length: int,
    eos: int,
    pad: int,
    warn: bool = True,
) -> tuple[list[int], list[int]]:
    """(prompt ids, canvas clamp) for fill-in-the-middle: `length` free slots, then the suffix, then EOS.

    A suffix that does not fit in the canvas after the free slots is cut at its end, with a warning unless
    `warn` is False (a caller that cuts it by design).
    """
    if not isinstance(prefix, str) or not isinstance(suffix, str):
        kinds = f"{type(prefix).__name__} and {type(suffix).__name__}"
        raise DiffGemmaError(f"infill prefix and suffix must be texts, got {kinds}")
    if not is_int(length) or not 0 < length <= canvas_length:
        raise DiffGemmaError(
            f"infill length must be an integer from 1 to the canvas length ({canvas_length}), got {length!r}"
        )
    prompt = tokenizer.encode(prefix) if prefix else tokenizer.encode("")
    suffix_ids = tokenizer.encode(suffix, add_special_tokens=False) if suffix else []
    room = canvas_length - length
    if len(suffix_ids) > room and warn:
        warnings.warn(
            f"infill: the suffix is {len(suffix_ids)} tokens but only {room} fit after {length} free positions "
            f"in a {canvas_length}-token canvas; dropped its last {len(suffix_ids) - room} tokens",
            stacklevel=4,
        )
    suffix_ids = suffix_ids[:room]
    tail = [eos] + [pad] * (room - len(suffix_ids) - 1) if room > len(suffix_ids) else []
    return prompt, [-1] * length + suffix_ids + tail
