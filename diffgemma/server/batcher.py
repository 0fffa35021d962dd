"""Requests are denoised together: one worker thread, open batches of compatible jobs that jobs join as they come.

A job is one prompt with its own seed, token limit and sampler settings (and, for a fill, the ids held in place
on its canvas). Jobs share a batch (`DiffGemma.open_batch`: fast mode, one random stream per row, settled
prefixes committed) whatever their sampler settings (each row denoised with its own: its steps, temperatures,
bounds, cuts) and whatever LoRA adapter each runs with (a fine-tune served by its own name: each row's update is
added to its own rows; a compiled decoder keeps one adapter a batch), up to `max_batch` rows: the first ones
start it, and a job that comes while it runs can join it when its canvas has been committed (its prompt encoded
to end where the batch's cache ends; a prompt longer than that cannot join), sharing every decoder pass from
then on rather than make passes of its own; a row leaves the batch when it ends, its answer sent at once.
Otherwise a job starts a batch of its own, up to `max_runs` batches, which take denoising steps in turn (so a
request is not held behind a long answer for its whole length), each putting its rows' adapters in place for
its passes: `join_first` says which comes first (joining, off the CPU); past `max_runs`, a job no running batch
can take waits. A cancelled job (its client went away, or a stop string ended it) stops receiving events at once
and its row leaves with the canvas it is in; when every job of a batch is cancelled, the batch stops. Other work
on the model (scoring a text: `Batcher.run`) runs on the same thread between steps, so the model is never used
by two threads at once.
"""

from __future__ import annotations

import asyncio
import collections
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from ..api import DiffGemma
from ..generate import ThinkingBudget
from ..images import PreparedImage
from ..open_batch import BatchRow, OpenBatch, RowFinished, RowsCommitted, RowsStep
from .metrics import Metrics


@dataclass
class RowDraft:
    canvas_index: int
    step: int
    ids: list[int]
    accepted: list[bool]
    entropy: list[float]
    settled: int
    committed: list[int]  # tokens of earlier canvases, as committed
    cached: int = 0  # prompt tokens the prefix cache held


@dataclass
class RowDone:
    new_tokens: list[int]
    steps: list[int]
    wall_time: float
    eos: int | None = None  # the EOS id that ended the row right after `new_tokens`, if one did
    cached: int = 0  # prompt tokens the prefix cache held


@dataclass
class Job:
    prompt: list[int]
    max_new_tokens: int
    seed: int
    sampler: dict[str, Any]  # its sampler settings that differ from the model's
    loop: asyncio.AbstractEventLoop
    clamp: list[int] | None = None  # canvas ids held in place (-1 free): a fill between a prompt and a suffix
    banned: tuple[int, ...] = ()  # ids its row never samples (a client's logit_bias of -100, or ignore_eos)
    images: tuple[PreparedImage, ...] = ()  # the prompt's pictures (their soft tokens made as its row joins)
    prediction: list[int] | None = None  # ids its canvases start from (OpenAI's predicted output)
    adapter: str | None = None  # the LoRA adapter its passes run with (`DiffGemma.add_adapter`; None: the base)
    thinking_budget: ThinkingBudget | None = None  # the most tokens of thought its reply writes
    logit_bias: dict[int, float] | None = None  # what is added to some ids' logits (a client's logit_bias)
    min_tokens: int = 0  # no EOS before this many tokens (vLLM's min_tokens)
    # ids that end its answer as its EOS would, each kept in it (a token with text) or not (vLLM's stop_token_ids)
    stop_ids: dict[int, bool] = field(default_factory=dict)
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    submitted: float = field(default_factory=time.monotonic)  # (how long it waits for a batch: the metrics)

    def send(self, event: Any) -> None:
        if not self.cancelled.is_set():
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)


@dataclass
class Call:
    """Work on the model other than denoising, run between steps; its result goes to `future`."""

    work: Callable[[], Any]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future

    def run(self) -> None:
        try:
            outcome, failed = self.work(), False
        except Exception as err:  # the request's error, not the worker's
            outcome, failed = err, True
        self.loop.call_soon_threadsafe(self._settle, outcome, failed)

    def _settle(self, outcome: Any, failed: bool) -> None:
        if self.future.done():  # its client went away
            return
        if failed:
            self.future.set_exception(outcome)
        else:
            self.future.set_result(outcome)


@dataclass
class Run:
    """A batch being denoised: what its jobs share (`Batcher.key`), its open batch and events, its jobs by row,
    each row's tokens committed so far."""

    key: tuple
    batch: OpenBatch
    events: Iterator[RowsStep | RowsCommitted | RowFinished]
    jobs: dict[int, Job]
    committed: dict[int, list[int]]
    started: float

    def add(self, job: Job, images: tuple[torch.Tensor, ...] = ()) -> None:
        """The job's row joins the batch (at its next canvas boundary, or as it starts); `images`: the soft tokens
        of its prompt's pictures."""
        ended = job.cancelled.is_set
        asked = BatchRow(
            job.prompt,
            job.max_new_tokens,
            job.seed,
            job.clamp,
            job.banned,
            ended,
            images,
            job.prediction,
            job.thinking_budget,
            job.adapter,
            self.batch.defaults(job.adapter).replace(**job.sampler) if job.sampler else None,
            job.logit_bias,
            job.min_tokens,
        )
        row = self.batch.add(asked)
        self.jobs[row], self.committed[row] = job, []


class EngineStopped(RuntimeError):
    """The worker is not running (stopped or failed): requests are refused with 503."""


class Batcher:
    def __init__(self, model: DiffGemma, max_batch: int = 8, max_runs: int = 2, join_first: bool | None = None) -> None:
        """`join_first`: a job that a running batch can take joins it even where another batch could start (by
        default off the CPU, where a pass costs about the same for more rows; on the CPU a pass costs in
        proportion to its rows, and a batch of its own starts the job at once, its steps taken in turn)."""
        if max_runs < 1:
            raise ValueError(f"at least one batch must run at a time, got max_runs={max_runs}")
        self.model = model
        self.max_batch = max_batch
        self.max_runs = max_runs  # batches denoised at once, a step of each in turn
        self.join_first = model.device.type != "cpu" if join_first is None else join_first
        # rows of several adapters share a batch, but for a compiled decoder (its code made for one adapter's)
        self.mixes_adapters = not model.network.compiled_decoder
        self.metrics = Metrics()  # what the engine does, for the server's /metrics
        self._inbox: queue.Queue[Job | Call | None] = queue.Queue()
        self._waiting: list[Job] = []
        self._calls: list[Call] = []
        self._runs: list[Run] = []
        self._running = False
        self._thread: threading.Thread | None = None
        self.batches_run: collections.deque[int] = collections.deque(maxlen=256)  # the last batches' sizes

    @property
    def running(self) -> bool:
        return self._running and self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        self._running = True
        self._thread = threading.Thread(target=self._work, name="diffgemma-batcher", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._running = False
        self._inbox.put(None)
        if self._thread is not None:
            self._thread.join(timeout=30)

    def waiting(self) -> int:
        """Jobs not yet in a batch (the metrics' gauge; read from another thread, so a moment's count)."""
        return len(self._waiting) + self._inbox.qsize()

    def batches_running(self) -> int:
        """Batches being denoised (the metrics' gauge, a moment's count)."""
        return len(self._runs)

    def uses_adapter(self, name: str) -> bool:
        """Whether a batch running or a job waiting has adapter `name` (the worker's thread: a `run` call)."""
        running = (job for run in self._runs for job in run.jobs.values())
        return any(job.adapter == name for job in (*running, *self._waiting))

    def submit(self, job: Job) -> None:
        if not self.running:
            raise EngineStopped("the generation engine is not running")
        self._inbox.put(job)

    async def run(self, work: Callable[[], Any], adapter: str | None = None) -> Any:
        """`work()` on the worker's thread, between steps, with `adapter` in place; its result (or its exception)."""
        if not self.running:
            raise EngineStopped("the generation engine is not running")
        loop = asyncio.get_running_loop()

        def with_adapter() -> Any:  # (an adapter unloaded meanwhile: the request's error, not the worker's)
            self.model.use_adapter(adapter)
            return work()

        call = Call(with_adapter, loop, loop.create_future())
        self._inbox.put(call)
        return await call.future

    def _take(self, item: Job | Call) -> None:
        (self._calls if isinstance(item, Call) else self._waiting).append(item)

    def _drain(self, block: bool) -> bool:
        try:
            item = self._inbox.get(timeout=0.5) if block else self._inbox.get_nowait()
        except queue.Empty:
            return False
        if item is None:
            return True
        self._take(item)
        while True:
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return True
            if item is not None:
                self._take(item)

    def _work(self) -> None:
        while self._running:
            if not self._runs and not self._waiting and not self._calls:
                self._drain(block=True)
                continue
            self._drain(block=False)
            calls, self._calls = self._calls, []
            for call in calls:
                call.run()
            self._waiting = [job for job in self._waiting if not job.cancelled.is_set()]
            self._place_waiting()
            for run in list(self._runs):  # a step of each batch in turn
                self._advance(run)
        # stopped (the server shuts down): what was under way or waiting ends now, not never
        stopped = EngineStopped("the generation engine stopped")
        for run in list(self._runs):
            for job in run.jobs.values():
                job.send(stopped)
            self._end(run)
        for job in self._waiting:
            job.send(stopped)

    def _place_waiting(self) -> None:
        """Waiting jobs start a batch (while fewer than `max_runs` run), taking the others it can take along, or
        join a running batch that can take them and has room for them (first, with `join_first`); the rest
        wait."""
        for job in list(self._waiting):
            if job not in self._waiting:  # (taken along by a batch started for another)
                continue
            run = next((run for run in self._runs if self._takes(run, job)), None)
            can_start = len(self._runs) < self.max_runs
            if run is not None and (self.join_first or not can_start):
                self._waiting.remove(job)
                self._join(run, job)
            elif can_start:
                batch = [other for other in self._waiting if self.key(other) == self.key(job)][: self.max_batch]
                self._waiting = [other for other in self._waiting if other not in batch]
                self._start(batch)

    def _takes(self, run: Run, job: Job) -> bool:
        fits = run.batch.fits(len(job.prompt), job.max_new_tokens)
        return run.key == self.key(job) and run.batch.size < self.max_batch and fits

    def key(self, job: Job) -> tuple:
        """What the jobs of one batch must share: nothing, or the adapter, where rows of several cannot share
        passes."""
        return () if self.mixes_adapters else (job.adapter,)

    def _join(self, run: Run, job: Job) -> None:
        if self._added(run, job):
            self.metrics.rows_joined([time.monotonic() - job.submitted], len(job.prompt))

    def _added(self, run: Run, job: Job) -> bool:
        """The job's row added to the run (its pictures through the vision tower first), or its request told why
        not (a row the batch refuses: its prompt and limit past the model's positions, a bad picture, settings the
        API refuses)."""
        try:
            self.model.use_adapter(job.adapter)
            run.add(job, self.model.image_features(job.images))
        except Exception as err:  # (the request's error, not the worker's)
            job.send(err)
            return False
        return True

    def _start(self, batch: list[Job]) -> None:
        self.batches_run.append(len(batch))
        started = time.monotonic()
        self.metrics.batch_started([started - job.submitted for job in batch], sum(len(job.prompt) for job in batch))
        opened = self.model.open_batch()
        run = Run(self.key(batch[0]), opened, opened.events(), {}, {}, started)
        for job in batch:
            self._added(run, job)
        if run.jobs:
            self._runs.append(run)
        else:
            self.metrics.batch_ended(time.monotonic() - started)

    def _advance(self, run: Run) -> None:
        """The run's next event (a denoising step, a canvas committed, a row's end) to its jobs."""
        if all(job.cancelled.is_set() for job in run.jobs.values()):
            self._end(run)
            return
        began = time.monotonic()
        try:
            self._dispatch(next(run.events), run)
        except StopIteration:
            self._end(run)
        except Exception as err:  # one bad batch must not take the server down
            for job in run.jobs.values():
                job.send(err)
            self._end(run)
        finally:
            self.metrics.busy(time.monotonic() - began)

    def _end(self, run: Run) -> None:
        run.events.close()
        self._runs.remove(run)
        self.metrics.batch_ended(time.monotonic() - run.started)

    def _dispatch(self, event: RowsStep | RowsCommitted | RowFinished, run: Run) -> None:
        if isinstance(event, RowsStep):
            draft = event.draft
            first = draft.step == 1
            cached = sum(c for c, canvas in zip(event.cached, event.canvases, strict=True) if canvas == 0)
            self.metrics.denoising_step(first, cached if first else 0)
            ids, accepted = draft.ids.tolist(), draft.accepted.tolist()
            entropy = draft.entropy.tolist() if draft.entropy is not None else [[0.0] * len(ids[0])] * len(ids)
            settled = draft.settled.tolist() if draft.settled is not None else [0] * len(ids)
            for index, row in enumerate(event.rows):
                run.jobs[row].send(
                    RowDraft(
                        event.canvases[index],
                        draft.step,
                        ids[index],
                        accepted[index],
                        entropy[index],
                        settled[index],
                        list(run.committed[row]),
                        event.cached[index],
                    )
                )
        elif isinstance(event, RowsCommitted):
            for row, tokens in zip(event.rows, event.ids, strict=True):
                run.committed[row].extend(tokens)
        else:
            job = run.jobs.pop(event.row)
            run.committed.pop(event.row)
            job.send(RowDone(event.new_tokens, event.steps, event.wall_time, event.eos, event.cached))
            if not run.jobs:  # (its last row: the batch ends now, not take jobs that come meanwhile)
                self._end(run)
