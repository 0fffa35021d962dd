"""A batch that rows join and leave between canvases: a server's engine for requests that come one at a time.

A `denoising_loop` batch is fixed when it starts: a request that comes a moment later runs beside it, a pass of
its own for each step, or waits for it to end. An `OpenBatch` takes new rows whenever a canvas has been committed:
a row's prompt is encoded to end where the batch's cache ends (its slots before that hold nothing, which its
attention never reads), and from then on the row shares every decoder pass; a row that has ended leaves at the
same point, its cache rows dropped. A pass reads every weight whatever the rows (a canvas touches every expert),
so on a GPU rows that share passes come nearly free. A row whose prompt is longer than the batch's cache cannot
join it (its positions would not fit before the cache's end); `fits` says so beforehand.

Fast mode only, each row with its own seed, limit, sampler settings, ids held in place on its generated positions
(a fill) and ids it never draws; each canvas's settled prefix is committed early (`commit_stable_prefix`), as a
server streams it. A row draws the random numbers it would draw alone (its draws counted while it draws for
itself). A prompt is encoded once however many rows ask it (a request's n choices). With a prefix cache the
longest of the first rows starts the batch as `denoising_loop` would, the others join it at once as later rows
join: a prompt that begins with a kept snapshot by itself (the snapshot copied to where the row's prompt lies, its
keys turned to those positions), so a chat's next turn skips its history whenever it comes, as does a prompt that
opens with system turns (so that they are kept shared, or a shared copy taken: `PrefixCache.shared_point`), and
the other new prompts together, each keeping its own snapshot. Without one, the first rows start the batch
together, padded, and rows that come together join together.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from .cache import EncoderCache, PrefixCache
from .config import SamplerSettings, is_int
from .errors import DiffGemmaError
from .generate import (
    CanvasDenoiser,
    DecoderPass,
    Draft,
    Penalties,
    PromptReuse,
    RandomSource,
    RowSampling,
    StopCheck,
    ThinkingBudget,
    banned_mask,
    committed_canvas,
    logit_bias_rows,
    predicted_start,
    prepare_prompts,
    row_output,
    with_held,
)
from .model import DiffusionGemma, ImageInputs
from .tokenizer import Tokenizer


@dataclass
class BatchRow:
    """A row asked of an open batch: its prompt's ids, its token limit and seed; `clamp`: ids held in place on its
    generated positions (-1 free; a fill between prompt and suffix), `banned`: ids it never draws, `ended`: asked
    when a canvas has been committed, true ends the row there (a client gone, a stop string met). `images`: the
    soft tokens of each picture its prompt holds, in order (`DiffGemma.image_prompt` writes their runs of image
    ids into the prompt, `DiffGemma.image_features` makes them). `prediction`: what its output is expected to be,
    mostly: each canvas starts from its part of it (`predicted_start`; -1: none there), as `denoising_loop`'s
    `predictions`. `thinking_budget`: the most tokens of thought its reply writes (`ThinkingBudget`). `adapter`: the
    LoRA adapter its passes run with (`DiffGemma.add_adapter`; None: the base model), whatever the other rows'.
    `settings`: its own sampler settings (`SamplerSettings.replace`; None: the batch's, or its adapter's own:
    `OpenBatch.defaults`), the denoising ones (steps, temperatures, entropy and confidence bounds, stability window,
    top-k / top-p / min-p), whatever the other rows'; the batch's EOS and padding ids hold for every row.
    `logit_bias`: token id -> what is added to its logits at every position of the row (`denoising_loop`'s).
    `min_tokens`: the row draws no EOS id before this many tokens (vLLM's `min_tokens`)."""

    prompt: list[int]
    max_new_tokens: int
    seed: int
    clamp: list[int] | None = None
    banned: tuple[int, ...] = ()
    ended: Callable[[], bool] | None = None
    images: tuple[torch.Tensor, ...] = ()
    prediction: list[int] | None = None
    thinking_budget: ThinkingBudget | None = None
    adapter: str | None = None
    settings: SamplerSettings | None = None
    logit_bias: dict[int, float] | None = None
    min_tokens: int = 0


@dataclass
class RowsStep:
    """A denoising step of the batch: its rows (ids, in batch order), each row's canvas (counted from its first)
    and prompt tokens the prefix cache held, and the step's draft, a row of it for each."""

    rows: list[int]
    canvases: list[int]
    cached: list[int]
    draft: Draft


@dataclass
class RowsCommitted:
    """A canvas committed: each row's ids on it (padding after an EOS), and its steps there."""

    rows: list[int]
    ids: list[list[int]]
    steps: list[int]


@dataclass
class RowFinished:
    """A row's end: its new tokens (within its limit, before its EOS), its steps a canvas, the EOS right after
    them (None: it ended otherwise), the prompt tokens the prefix cache held, seconds from join to end."""

    row: int
    new_tokens: list[int]
    steps: list[int]
    eos: int | None
    cached: int
    wall_time: float


@dataclass
class _Running:
    id: int
    asked: BatchRow
    joined: float
    generated: list[int] = field(default_factory=list)
    steps: list[int] = field(default_factory=list)
    cached: int = 0  # prompt tokens the prefix cache held
    draws: int = 0  # its random draws so far (`RandomSource.counts`)

    @property
    def canvas(self) -> int:
        """This row's canvases so far: the index of the one it is on."""
        return len(self.steps)


class OpenBatch:
    """Rows denoised together, joining (`add`) and leaving between canvases; iterate `events()` to run it."""

    def __init__(
        self,
        network: DiffusionGemma,
        settings: SamplerSettings,
        prefix_cache: PrefixCache | None = None,
        tokenizer: Tokenizer | None = None,
        cuda_graph: bool | None = None,
        sync_free: bool | None = None,
        stop_check_every: int | None = None,
        adapters: Callable[[list[str | None]], Callable[[list[int] | None], None]] | None = None,
        adapter_defaults: Callable[[str], SamplerSettings] | None = None,
    ) -> None:
        """`tokenizer`: the drafts' (`Draft.text`). `adapters`: given each row's adapter, what puts them in place
        for a pass of those rows, or of some of them (`AdapterBank.for_rows`; None: no adapters kept).
        `adapter_defaults`: the settings of a row of an adapter that brings none (`DiffGemma.sampler_defaults`;
        None: the batch's `settings`)."""
        self.network, self.settings, self.prefix_cache = network, settings, prefix_cache
        self.adapter_defaults = adapter_defaults
        self.adapters = adapters
        # what puts the current rows' adapters in place (kept: a decoder graph captured with them reads their
        # rows' indices)
        self._rows_adapters: Callable[[list[int] | None], None] | None = None
        self.tokenizer = tokenizer
        self.cuda_graph = cuda_graph
        device = network.device
        self.rng = RandomSource("fast", 0, device, [], network.dtype)  # (its rows' seeds set as they join)
        if sync_free is not None:
            self.rng.sync_free = sync_free
        self.stop_check = StopCheck(device, stop_check_every)
        self.ending_ids = torch.tensor(settings.eos_token_id, dtype=torch.long, device=device)
        self.cache: EncoderCache | None = None
        self.denoiser: CanvasDenoiser | None = None
        self.rows: list[_Running] = []  # in the batch, in its order
        self.waiting: list[_Running] = []  # to join at the next canvas boundary
        self._next_id = 0
        self._reuse: PromptReuse | None = None  # the prefix cache's part in the cache now in use

    @property
    def size(self) -> int:
        """Rows in the batch and waiting to join it."""
        return len(self.rows) + len(self.waiting)

    def fits(self, prompt_length: int, max_new_tokens: int) -> bool:
        """Whether a row of this prompt length and limit can join at the next canvas boundary: its prompt ends
        where the batch's cache will end then (the canvas under way encoded; if no row goes on, the rows waiting
        start the batch anew, where any prompt fits), and its canvases stay within the model's positions."""
        config = self.network.config
        if self.cache is None:
            length = max(prompt_length, self._longest_waiting())
        else:
            length = self.cache.length + config.canvas_length
        canvases = math.ceil(max_new_tokens / config.canvas_length)
        return prompt_length <= length and length + canvases * config.canvas_length <= config.max_position_embeddings

    def add(self, row: BatchRow) -> int:
        """Queue a row to join at the next canvas boundary (or to start the batch); its id in the events."""
        config = self.network.config
        if not isinstance(row, BatchRow):
            raise DiffGemmaError(f"an open batch adds a BatchRow (its prompt's ids, limit, seed...), got {row!r:.60}")
        if not row.prompt or any(not 0 <= token < config.vocab_size for token in row.prompt):
            raise DiffGemmaError(f"a row's prompt must be token ids between 0 and {config.vocab_size - 1}")
        if row.max_new_tokens < 1:
            raise DiffGemmaError(f"a row's max_new_tokens must be at least 1, got {row.max_new_tokens}")
        if not is_int(row.min_tokens) or row.min_tokens < 0:
            raise DiffGemmaError(f"a row's min_tokens must be a whole number, 0 or more, got {row.min_tokens!r}")
        if not self.fits(len(row.prompt), row.max_new_tokens):
            raise DiffGemmaError("this row does not fit the batch (its prompt is longer than the batch's cache)")
        reach = math.ceil(row.max_new_tokens / config.canvas_length) * config.canvas_length  # (its canvases)
        clamp = row.clamp or []
        if len(clamp) > reach or any(not -1 <= token < config.vocab_size for token in clamp):
            raise DiffGemmaError(f"a row's clamp must be at most {reach} ids, each -1 (free) or a token id")
        if any(not -1 <= token < config.vocab_size for token in row.prediction or []):
            raise DiffGemmaError("a row's prediction must be token ids (or -1: none there)")
        if any(not 0 <= token < config.vocab_size for token in row.banned):
            raise DiffGemmaError(f"a row's banned ids must be token ids between 0 and {config.vocab_size - 1}")
        if row.images:
            held = row.prompt.count(config.vision.image_token_id) if config.vision is not None else 0
            if held != sum(picture.shape[0] for picture in row.images):
                raise DiffGemmaError(
                    f"a row's prompt holds {held} image ids for {sum(p.shape[0] for p in row.images)} soft tokens "
                    "of its pictures (`DiffGemma.image_prompt` writes their runs)"
                )
        if row.settings is not None and not isinstance(row.settings, SamplerSettings):
            given = f"{row.settings!r:.60}"
            raise DiffGemmaError(f"a row's settings are SamplerSettings (settings.replace(...)), got {given}")
        logit_bias_rows([row.logit_bias], 1, config.vocab_size)  # (checked now, not when its row joins)
        if row.adapter is not None and self.adapters is None:
            raise DiffGemmaError(f"a row asks for adapter {row.adapter!r}, and this model keeps none (add_adapter)")
        if self.adapters is not None:
            self.adapters([row.adapter])  # (an adapter not kept is refused now, not when its row joins)
        running = _Running(self._next_id, row, time.perf_counter())
        self._next_id += 1
        self.waiting.append(running)
        return running.id

    def defaults(self, adapter: str | None) -> SamplerSettings:
        """The sampler settings of a row of `adapter` that brings none of its own: the batch's, or the adapter's
        (`adapter_defaults`)."""
        if adapter is None or self.adapter_defaults is None:
            return self.settings
        return self.adapter_defaults(adapter)

    def _longest_waiting(self) -> int:
        return max((len(waiting.asked.prompt) for waiting in self.waiting), default=0)

    @torch.no_grad()
    def events(self) -> Iterator[RowsStep | RowsCommitted | RowFinished]:
        """Run the batch: canvases until no row is left, rows waiting joining between them. Closing the iterator
        stops the work at once."""
        try:
            while self.waiting or self.rows:
                self._admit()
                yield from self._canvas()
        finally:
            self._release()

    def _canvas(self) -> Iterator[RowsStep | RowsCommitted | RowFinished]:
        length = self.network.config.canvas_length
        device = self.network.device
        rows = self.rows
        ids, canvases = [row.id for row in rows], [row.canvas for row in rows]
        limits = torch.tensor([row.asked.max_new_tokens for row in rows], device=device)
        starts = torch.tensor(canvases, device=device) * length
        wanted = (limits - starts).clamp(max=length)
        user_ids = self._clamp(rows)
        start = self._predicted(rows)
        excluded = self._banned(rows)
        rows_done = torch.zeros(len(rows), dtype=torch.bool, device=device)
        passes = torch.zeros(len(rows), dtype=torch.long, device=device)
        cached = [row.cached for row in rows]
        steps = self.denoiser.canvas(
            min(canvases),
            rows_done,
            passes,
            wanted,
            excluded,
            user_ids,
            None,
            None,
            excluded is not None,
            max(cached),
            start,
        )
        while True:
            try:
                draft = next(steps)
            except StopIteration as finished:
                argmax, canvas_steps = finished.value
                break
            yield RowsStep(ids, canvases, cached, draft)
        self.denoiser.decoder.end_canvas()
        at_limit = starts + length >= limits
        committed, done_now = committed_canvas(argmax, rows_done, at_limit, self.ending_ids, self.settings.pad_token_id)
        committed_ids, step_counts, draws = committed.tolist(), canvas_steps.tolist(), self.rng.counts.tolist()
        yield RowsCommitted(ids, committed_ids, step_counts)
        ending = done_now.tolist()
        for index, row in enumerate(rows):
            row.generated.extend(committed_ids[index])
            row.steps.append(step_counts[index])
            row.draws = draws[index]
            ending[index] = ending[index] or bool(row.asked.ended and row.asked.ended())
        for index, row in enumerate(rows):
            if ending[index]:
                yield self._finished(row)
        kept = [index for index, end in enumerate(ending) if not end]
        self.rows = [rows[index] for index in kept]
        if not self.rows:  # rows still to come start anew
            self._release()
            self.cache, self.denoiser = None, None
            return
        if len(kept) < len(rows):
            self._use(self._kept_rows(kept))
        elif self.denoiser.decoder.penalties is not None:
            self.denoiser.decoder.penalties.commit(committed)
        if self._rows_adapters is not None:  # (the batcher may have run another batch's passes since this one's)
            self._rows_adapters(None)
        self.network.encode(committed[kept], self.cache, return_hidden=False)

    def _finished(self, row: _Running) -> RowFinished:
        new_tokens, eos = row_output(row.generated, row.asked.max_new_tokens, self.settings.eos_token_id)
        return RowFinished(row.id, new_tokens, row.steps, eos, row.cached, time.perf_counter() - row.joined)

    def _predicted(self, rows: list[_Running]) -> torch.Tensor | None:
        """[B, C] the ids each row's canvas starts from (`predicted_start`; -1: random), or None where no row has
        a prediction."""
        if not any(row.asked.prediction for row in rows):
            return None
        length = self.network.config.canvas_length
        starts = [predicted_start(row.asked.prediction or [], row.generated, length) for row in rows]
        return torch.tensor(starts, dtype=torch.long, device=self.network.device)

    def _clamp(self, rows: list[_Running]) -> torch.Tensor | None:
        """[B, C] the ids each row holds in place on this canvas (-1 free: its fill's, then its thinking budget's),
        or None where no row holds any."""
        length, device = self.network.config.canvas_length, self.network.device
        parts, held = [], []
        for row in rows:
            given = (row.asked.clamp or [])[row.canvas * length : (row.canvas + 1) * length]
            parts.append(given + [-1] * (length - len(given)))
            budget = row.asked.thinking_budget
            held.append(budget.held(row.canvas, row.generated, length) if budget is not None else None)
        clamp = None
        if any(value >= 0 for part in parts for value in part):
            clamp = torch.tensor(parts, dtype=torch.long, device=device)
        return with_held(clamp, held, length, device)

    def _banned(self, rows: list[_Running]) -> torch.Tensor | None:
        """[B, C, V] the ids each row's positions on this canvas never draw (a view of [B, V]: its bans; made
        whole where a row's `min_tokens` reaches the canvas, its EOS ids banned before them), or None where no
        row bans any."""
        length, vocab = self.network.config.canvas_length, self.network.config.vocab_size
        early = [max(0, min(length, row.asked.min_tokens - row.canvas * length)) for row in rows]
        if not any(row.asked.banned for row in rows) and not any(early):
            return None
        mask = banned_mask([list(row.asked.banned) for row in rows], len(rows), vocab, self.network.device)
        banned = mask[:, None, :].expand(len(rows), length, vocab)
        if any(early):
            banned = banned.clone()
            eos = list(self.settings.eos_token_id)
            for index, before in enumerate(early):
                banned[index, :before, eos] = True
        return banned

    def _admit(self) -> None:
        """The waiting rows join: the first ones start the batch; later ones are encoded to end where its cache
        ends and join its rows (`_joining_parts`). A prompt is encoded once, however many rows ask it (the same
        ids and adapter, no pictures: a request's n choices). With a prefix cache the longest prompt starts the
        batch as a row alone, and the others join it at once."""
        joining, self.waiting = self.waiting, []
        if not joining:
            return
        network = self.network
        starters: list[_Running] = []
        if self.cache is None:
            if self.prefix_cache is not None:
                starters = [max(joining, key=lambda row: len(row.asked.prompt))]
            else:
                starters = [same[0] for same in _by_prompt(joining).values()]
            ids, mask, images = self._prompts(starters)
            capacity = max(ids.shape[1] + self._room(row) for row in joining)
            self._put_adapters(starters)  # (before the prefix cache is looked in: its snapshots are per adapter)
            self._reuse = PromptReuse(network, self.prefix_cache, ids, mask, "fast", images)
            self.cache = self._reuse.new_cache(network, len(starters), capacity)
            self._reuse.encode(network, ids, mask, self.cache)
            for row in starters:
                row.cached = self._reuse.reused
        others = [row for row in joining if all(row is not starter for starter in starters)]
        cache = self.cache
        if others:
            length = cache.length
            others, parts = self._joining_parts(length, others, starters)
            joining = [*starters, *others]
            cache = cache.joined(parts, max(length + self._room(row) for row in [*self.rows, *joining]))
        self.rows = [*self.rows, *joining]
        for row in joining:
            row.joined = time.perf_counter()
        self._use(cache)

    def _joining_parts(
        self, length: int, rows: list[_Running], starters: list[_Running]
    ) -> tuple[list[_Running], list[EncoderCache]]:
        """Caches of `rows`' prompts encoded to end at `length`, to join the batch, and the rows in the order they
        hold them. A row asking a starter's prompt copies the starter's row; of the other prompts, without a
        prefix cache all are encoded together, padded; with one, a prompt that begins with a kept snapshot goes by
        itself (`_encoded_to`: the snapshot put in place), as does one with pictures, and the rest, those of one
        adapter and one tail past their snapshot point, are encoded together (`_encoded_fresh`)."""
        device = self.network.device
        same = _by_prompt(rows)
        starter_row = {_prompt_of(starter): index for index, starter in enumerate(starters)}
        order, parts = [], []
        for key, copies in same.items():
            if key in starter_row:
                parts.append(self.cache.select_rows(torch.tensor([starter_row[key]] * len(copies), device=device)))
                order.extend(copies)
                for copy in copies:
                    copy.cached = starters[starter_row[key]].cached
        asked = [copies[0] for key, copies in same.items() if key not in starter_row]
        for group, fresh in self._encoding_groups(asked):
            part = self._encoded_fresh(length, group) if fresh else self._encoded_to(length, group)
            index = [at for at, row in enumerate(group) for _ in same[_prompt_of(row)]]
            parts.append(part if len(index) == len(group) else part.select_rows(torch.tensor(index, device=device)))
            for row in group:
                order.extend(same[_prompt_of(row)])
                for copy in same[_prompt_of(row)]:
                    copy.cached = row.cached
        return order, parts

    def _encoding_groups(self, rows: list[_Running]) -> list[tuple[list[_Running], bool]]:
        """`rows` (one of each prompt) as groups encoded together, each with whether it is a prefix cache's group
        of prompts no snapshot begins and no system turn opens (`_joining_parts`)."""
        if self.prefix_cache is None:
            return [(rows, False)] if rows else []
        groups: list[tuple[list[_Running], bool]] = []
        fresh: dict[tuple[str | None, int], list[_Running]] = {}
        for row in rows:
            prompt = row.asked.prompt
            self._put_adapters([row])  # (the snapshots looked in are those of its adapter)
            # (a prompt that opens with system turns goes by itself, so that they are kept shared, or taken)
            alone = self.prefix_cache.holds(self.network, prompt) or self.prefix_cache.shared_point(prompt) is not None
            if row.asked.images or alone:
                groups.append(([row], False))
            else:
                tail = len(prompt) - self.prefix_cache.point(prompt)
                fresh.setdefault((row.asked.adapter, tail), []).append(row)
        return [*groups, *((group, True) for group in fresh.values())]

    def _encoded_fresh(self, length: int, rows: list[_Running]) -> EncoderCache:
        """A cache of `rows`' prompts (no snapshot begins them, one adapter, no pictures, one tail past their
        snapshot points) encoded together to end at `length`: each up to its snapshot point, where a copy of its
        row is kept in the prefix cache (moved to begin at 0), then their tails."""
        network, prefix_cache = self.network, self.prefix_cache
        prompts = [row.asked.prompt for row in rows]
        points = [prefix_cache.point(prompt) for prompt in prompts]
        tail = len(prompts[0]) - points[0]
        ids, mask, _ = prepare_prompts(
            [prompt[:point] for prompt, point in zip(prompts, points, strict=True)], None, self.settings.pad_id
        )
        part = network.new_cache(len(rows), length)
        part.skip_to(length - tail - ids.shape[1])
        self._put_adapters(rows)
        network.encode(ids.to(network.device), part, mask, return_hidden=False)
        for index, (prompt, point) in enumerate(zip(prompts, points, strict=True)):
            kept = network.new_cache(1, point)
            kept.place(
                part.select_rows(torch.tensor([index], device=network.device)), length - len(prompt), network.shift_keys
            )
            prefix_cache.keep(prefix_cache.snapshot_of(network, prompt[:point], kept))
        if tail:
            tails = torch.tensor(
                [prompt[point:] for prompt, point in zip(prompts, points, strict=True)], device=network.device
            )
            network.encode(tails, part, return_hidden=False)
        for row in rows:
            row.cached = 0
        return part

    def _prompts(self, rows: list[_Running]) -> tuple[torch.Tensor, torch.Tensor | None, ImageInputs | None]:
        """The rows' prompts as a batch: ids [B, T] (left-padded), which are real (None: all), their pictures."""
        ids, mask, _ = prepare_prompts([row.asked.prompt for row in rows], None, self.settings.pad_id)
        ids = ids.to(self.network.device)
        pictures = [list(row.asked.images) for row in rows]
        if not any(pictures):
            return ids, mask, None
        return ids, mask, ImageInputs.in_prompts(ids, mask, pictures, self.network.config.vision.image_token_id)

    def _encoded_to(self, length: int, rows: list[_Running]) -> EncoderCache:
        """A cache of `rows`' prompts encoded to end at `length` (the slots before the longest hold nothing); a
        row alone goes through the prefix cache: a snapshot its prompt begins with is put in place, and its own
        kept."""
        ids, mask, images = self._prompts(rows)
        self._put_adapters(rows)
        with PromptReuse(
            self.network, self.prefix_cache, ids, mask, "fast", images, start=length - ids.shape[1]
        ) as reuse:
            part = reuse.new_cache(self.network, len(rows), length)
            reuse.encode(self.network, ids, mask, part)
        for row in rows:
            row.cached = reuse.reused
        return part

    def _put_adapters(self, rows: list[_Running]) -> None:
        """The rows' adapters in place for a pass of theirs alone (their prompts encoded)."""
        if self.adapters is not None:
            self.adapters([row.asked.adapter for row in rows])()

    def _room(self, row: _Running) -> int:
        """Positions a row still needs past the cache's end: its canvases to come."""
        length = self.network.config.canvas_length
        return (math.ceil(row.asked.max_new_tokens / length) - row.canvas) * length

    def _kept_rows(self, kept: list[int]) -> EncoderCache:
        """The cache holding only the rows at `kept` (a copy: the one before may be the prefix cache's)."""
        subset = self.cache.select_rows(torch.tensor(kept, device=self.network.device))
        for layer in subset.layers:
            layer.positions = layer.positions.clone()
        return subset

    def _use(self, cache: EncoderCache) -> None:
        """Denoise the current rows over `cache` from now on: the decoder's buffers (and graph) made for them, and
        each row's seed and draw count."""
        if cache is not self.cache:
            if self.cache is not None:
                self._release()
            self.cache = cache
        rows, device = self.rows, self.network.device
        self.rng.restart([row.asked.seed for row in rows], [row.draws for row in rows])
        if self.adapters is not None:
            self._rows_adapters = self.adapters([row.asked.adapter for row in rows])
        sampler = RowSampling.of([row.asked.settings or self.defaults(row.asked.adapter) for row in rows], device)
        vocab = self.network.config.vocab_size
        bias = logit_bias_rows([row.asked.logit_bias for row in rows], len(rows), vocab)
        penalties = None
        if sampler.penalized:
            prompts, answers = [row.asked.prompt for row in rows], [row.generated for row in rows]
            penalties = Penalties(sampler, prompts, answers, vocab, device)
        decoder = DecoderPass(
            self.network,
            cache,
            "fast",
            len(rows),
            sampler,
            self.cuda_graph,
            self.rng.sync_free,
            self._rows_adapters,
            bias,
            penalties,
        )
        self.denoiser = CanvasDenoiser(
            decoder, self.rng, sampler, "fast", self.stop_check, True, self.ending_ids, self.tokenizer
        )

    def _release(self) -> None:
        """The prefix cache's snapshot handed back, once the batch no longer writes the cache it lives in."""
        if self._reuse is not None:
            self._reuse.__exit__(None, None, None)
            self._reuse = None


def _prompt_of(row: _Running) -> tuple | int:
    """What rows asking the same prompt share (its ids and adapter), so that it is encoded once; a row with
    pictures is its own."""
    return row.id if row.asked.images else (tuple(row.asked.prompt), row.asked.adapter)


def _by_prompt(rows: list[_Running]) -> dict[tuple | int, list[_Running]]:
    """`rows` by the prompt they ask (`_prompt_of`), in order of first asking."""
    same: dict[tuple | int, list[_Running]] = {}
    for row in rows:
        same.setdefault(_prompt_of(row), []).append(row)
    return same
