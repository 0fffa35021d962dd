"""The server's Prometheus metrics (`GET /metrics`, the text format any Prometheus scraper reads).

What the engine did: batches and their rows, prompt tokens (and those the prefix cache spared encoding),
denoising steps (decoder passes) and canvases, its busy time; how long rows waited for a batch and how long
batches ran. What the requests got: tokens generated and choices finished (by reason), HTTP requests by route
and status. Gauges: requests being answered, rows waiting for the engine, and batches being denoised. Each app
has its own registry, so two servers in one process (tests) count apart.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

CONTENT_TYPE = CONTENT_TYPE_LATEST
# seconds: a short fill on a GPU (tens of milliseconds) to long answers on a CPU (minutes)
SECONDS_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60, 120, 300, 600)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()

        def counter(name: str, text: str, labels: Sequence[str] = ()) -> Counter:
            return Counter(name, text, labels, registry=self.registry)

        self.batches = counter("diffgemma_batches", "Batches the engine ran")
        self.rows = counter("diffgemma_batch_rows", "Rows (a request's choices) the batches ran")
        self.prompt_tokens = counter("diffgemma_prompt_tokens", "Prompt tokens of the rows run")
        self.cached_tokens = counter(
            "diffgemma_prompt_cached_tokens", "Prompt tokens the prefix cache held, not encoded again"
        )
        self.generation_tokens = counter("diffgemma_generation_tokens", "Tokens generated")
        self.steps = counter("diffgemma_denoising_steps", "Denoising steps (decoder passes over a batch's canvas)")
        self.canvases = counter("diffgemma_canvases", "Canvases denoised (a batch's canvas counts once)")
        self.engine_seconds = counter("diffgemma_engine_busy_seconds", "Seconds the engine spent generating")
        self.finishes = counter("diffgemma_choices_finished", "Choices answered, by finish reason", ("reason",))
        self.requests = counter(
            "diffgemma_http_requests", "HTTP requests answered, by route and status", ("route", "status")
        )
        self.queue_seconds = Histogram(
            "diffgemma_queue_seconds",
            "Seconds a row waited for its batch to start",
            buckets=SECONDS_BUCKETS,
            registry=self.registry,
        )
        self.batch_seconds = Histogram(
            "diffgemma_batch_seconds", "Seconds a batch ran", buckets=SECONDS_BUCKETS, registry=self.registry
        )
        self.running = Gauge("diffgemma_requests_running", "Requests being answered", registry=self.registry)
        self.waiting = Gauge("diffgemma_rows_waiting", "Rows waiting for a batch", registry=self.registry)
        self.batches_running = Gauge(
            "diffgemma_batches_running", "Batches being denoised (taking steps in turn)", registry=self.registry
        )

    def watch(self, running: Callable[[], float], waiting: Callable[[], float], batches: Callable[[], float]) -> None:
        """The gauges' readings, taken when scraped: requests being answered, rows waiting for the engine, batches
        being denoised."""
        self.running.set_function(running)
        self.waiting.set_function(waiting)
        self.batches_running.set_function(batches)

    def batch_started(self, waits: Sequence[float], prompt_tokens: int) -> None:
        """A batch of `len(waits)` rows begins, each having waited that many seconds."""
        self.batches.inc()
        self.rows_joined(waits, prompt_tokens)

    def rows_joined(self, waits: Sequence[float], prompt_tokens: int) -> None:
        """Rows join a batch (as it starts, or while it runs), each having waited that many seconds."""
        self.rows.inc(len(waits))
        self.prompt_tokens.inc(prompt_tokens)
        for wait in waits:
            self.queue_seconds.observe(wait)

    def denoising_step(self, canvas_begins: bool, cached: int) -> None:
        """A decoder pass over a batch's canvas; the first of a canvas counts the canvas, and the first of a batch
        (`cached` > 0 there) the prompt tokens the prefix cache held for it."""
        self.steps.inc()
        if canvas_begins:
            self.canvases.inc()
        self.cached_tokens.inc(cached)

    def answered(self, tokens: int, finish: str) -> None:
        """A choice ended: the tokens it generated, and why it ended ("stop" or "length")."""
        self.generation_tokens.inc(tokens)
        self.finishes.labels(finish).inc()

    def busy(self, seconds: float) -> None:
        """The engine worked `seconds` on a batch (a step of it: batches that run at once take turns)."""
        self.engine_seconds.inc(seconds)

    def batch_ended(self, seconds: float) -> None:
        """A batch ended (done, cancelled or failed) `seconds` after it started."""
        self.batch_seconds.observe(seconds)

    def request(self, route: str, status: int) -> None:
        self.requests.labels(route, str(status)).inc()

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
