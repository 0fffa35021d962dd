"""Requests that arrive together are denoised together: one worker thread, batches of compatible jobs.

A job is one prompt with its own seed and token limit (and, for a fill, the ids held in place on its
canvas). The worker takes every waiting job that shares the first one's sampler settings (up to
`max_batch`), runs them as one batch through the public `stream` API (fast mode, one random stream per
row, settled prefixes committed), and hands each job its own rows of the events. Jobs that arrive while a
batch runs start a batch of their own at once, up to `max_runs` batches, which take denoising steps in turn
(so a short request is not held behind a long answer for its whole length; beyond `max_runs`, jobs wait for
a batch to end). A cancelled job (its client went away, or a stop string ended it) stops receiving events at
once and its row ends with the canvas it is in; when every job of a batch is cancelled, the batch stops.
Other work on the model (scoring a text: `Batcher.run`) runs on the same thread between steps, so the model
is never used by two threads at once.
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

from ..api import DiffGemma
from ..generate import CanvasCommit, Done, Draft, GenerationResult
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
    sampler: dict[str, Any]
    loop: asyncio.AbstractEventLoop
    clamp: list[int] | None = None  # canvas ids held in place (-1 free): a fill between a prompt and a suffix
    banned: tuple[int, ...] = ()  # ids its row never samples (a client's logit_bias of -100)
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    submitted: float = field(default_factory=time.monotonic)  # (how long it waits for a batch: the metrics)

    def key(self) -> tuple:
        return tuple(sorted(self.sampler.items()))

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
    """A batch being denoised: its jobs, its stream of events, each row's tokens committed so far."""

    batch: list[Job]
    stream: Iterator[Draft | CanvasCommit | Done]
    committed: list[list[int]]
    started: float


class EngineStopped(RuntimeError):
    """The worker is not running (stopped or failed): requests are refused with 503."""


class Batcher:
    def __init__(self, model: DiffGemma, max_batch: int = 8, max_runs: int = 2) -> None:
        if max_runs < 1:
            raise ValueError(f"at least one batch must run at a time, got max_runs={max_runs}")
        self.model = model
        self.max_batch = max_batch
        self.max_runs = max_runs  # batches denoised at once, a step of each in turn
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

    def submit(self, job: Job) -> None:
        if not self.running:
            raise EngineStopped("the generation engine is not running")
        self._inbox.put(job)

    async def run(self, work: Callable[[], Any]) -> Any:
        """`work()` on the worker's thread, between steps; its result (or its exception)."""
        if not self.running:
            raise EngineStopped("the generation engine is not running")
        loop = asyncio.get_running_loop()
        call = Call(work, loop, loop.create_future())
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
            if self._waiting and len(self._runs) < self.max_runs:
                key = self._waiting[0].key()
                batch = [job for job in self._waiting if job.key() == key][: self.max_batch]
                self._waiting = [job for job in self._waiting if job not in batch]
                self._start(batch)
            for run in list(self._runs):  # a step of each batch in turn
                self._advance(run)
        # stopped (the server shuts down): what was under way or waiting ends now, not never
        stopped = EngineStopped("the generation engine stopped")
        for run in list(self._runs):
            for job in run.batch:
                job.send(stopped)
            self._end(run)
        for job in self._waiting:
            job.send(stopped)

    def _start(self, batch: list[Job]) -> None:
        self.batches_run.append(len(batch))
        started = time.monotonic()
        self.metrics.batch_started([started - job.submitted for job in batch], sum(len(job.prompt) for job in batch))
        width = max(len(job.clamp or ()) for job in batch)  # rows without a clamp hold nothing in place
        clamp = [(job.clamp or []) + [-1] * (width - len(job.clamp or ())) for job in batch] if width else None
        banned = [list(job.banned) for job in batch] if any(job.banned for job in batch) else None
        try:
            stream = self.model.stream(
                [job.prompt for job in batch],
                max_new_tokens=[job.max_new_tokens for job in batch],
                seed=[job.seed for job in batch],
                clamp=clamp,
                banned_tokens=banned,
                commit_stable_prefix=True,
                end_rows=lambda rows: [job.cancelled.is_set() for job in batch],
                **batch[0].sampler,
            )
        except Exception as err:  # a batch the API refuses: its requests' error, not the worker's
            for job in batch:
                job.send(err)
            self.metrics.batch_ended(time.monotonic() - started)
            return
        self._runs.append(Run(batch, stream, [[] for _ in batch], started))

    def _advance(self, run: Run) -> None:
        """The run's next event (a denoising step, a canvas committed, or the end) to its jobs."""
        if all(job.cancelled.is_set() for job in run.batch):
            self._end(run)
            return
        began = time.monotonic()
        try:
            event = next(run.stream)
            self._dispatch(event, run.batch, run.committed)
        except StopIteration:
            self._end(run)
        except Exception as err:  # one bad batch must not take the server down
            for job in run.batch:
                job.send(err)
            self._end(run)
        finally:
            self.metrics.busy(time.monotonic() - began)

    def _end(self, run: Run) -> None:
        run.stream.close()
        self._runs.remove(run)
        self.metrics.batch_ended(time.monotonic() - run.started)

    def _dispatch(self, event: Draft | CanvasCommit | Done, batch: list[Job], committed: list[list[int]]) -> None:
        if isinstance(event, Draft):
            first = event.step == 1
            self.metrics.denoising_step(first, event.cached_tokens if first and event.canvas_index == 0 else 0)
            ids, accepted = event.ids.tolist(), event.accepted.tolist()
            entropy = event.entropy.tolist() if event.entropy is not None else [[0.0] * len(ids[0])] * len(ids)
            settled = event.settled.tolist() if event.settled is not None else [0] * len(ids)
            for row, job in enumerate(batch):
                job.send(
                    RowDraft(
                        event.canvas_index,
                        event.step,
                        ids[row],
                        accepted[row],
                        entropy[row],
                        settled[row],
                        list(committed[row]),
                        event.cached_tokens,
                    )
                )
        elif isinstance(event, CanvasCommit):
            for row, tokens in enumerate(event.ids.tolist()):
                committed[row].extend(tokens)
        else:
            result, eos_ids = event.result, tuple(self.model.settings.eos_token_id)
            for row, job in enumerate(batch):
                tokens = result.new_tokens[row]
                steps = [per_row[row] for per_row in result.steps]
                ending = _ending_eos(result, row, job.max_new_tokens, eos_ids)
                job.send(RowDone(tokens, steps, result.wall_time, ending, result.cached_tokens))


def _ending_eos(result: GenerationResult, row: int, limit: int, eos_ids: tuple[int, ...]) -> int | None:
    """The EOS id right after a row's new tokens, within its limit (None: the row ended otherwise: at its limit,
    or cut short with the batch, its tokens running to the last canvas generated)."""
    after = result.prompt_length + len(result.new_tokens[row])
    if len(result.new_tokens[row]) >= limit or after >= result.sequences.shape[1]:
        return None
    token = int(result.sequences[row, after])
    return token if token in eos_ids else None
