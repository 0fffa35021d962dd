"""Start a diffgemma server on 127.0.0.1 (a free port) in a background thread, for tests."""

from __future__ import annotations

import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import httpx
import uvicorn


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def running(app):
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline:
            raise RuntimeError("server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def wait_until(condition, what: str, seconds: float = 30.0) -> None:
    """Wait for `condition()` (a request under way elsewhere), failing with `what` rather than hang."""
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"waited {seconds} s for {what}"
        time.sleep(0.01)


def idle(batcher) -> None:
    """Wait until no batch runs: an answer comes back once its text has settled, its row's canvas may still be
    running, and a request sent then could join that batch."""
    wait_until(lambda: not batcher.batches_running(), "the engine to be idle")


# a request of settings of its own that would denoise 128 canvases (the demo's; the server's token limit; its EOS
# banned) of 200 steps each, 20 s and more: it is streamed and let go once the requests sent beside it are answered,
# so they join it however slowly a loaded machine runs (one that ended by itself in 2 s did not always outlast them)
LONG_REQUEST = {
    "model": "demo",
    "prompt": "x",
    "max_tokens": 4096,
    "confidence_threshold": 1e-9,
    "max_denoising_steps": 200,
    "ignore_eos": True,
    "stream": True,
}


def beside_a_long_request(url: str, batcher, calls: list) -> list:
    """Run `calls` at once while a long request runs (`LONG_REQUEST`), once its batch has started: with one batch
    at a time (`max_runs=1`) they join it. The long request is let go (its client goes away) once they are
    answered. Their results, in order."""
    before = len(batcher.batches_run)
    answered = threading.Event()

    def long_request() -> bool:
        """Read the long request's stream until `calls` are answered; whether it was still running then."""
        with httpx.stream("POST", url + "/v1/completions", json=LONG_REQUEST, timeout=120) as response:
            assert response.status_code == 200, response.read()
            for line in response.iter_lines():
                if answered.is_set():
                    return True
                if line == "data: [DONE]":
                    return False
        return False

    with ThreadPoolExecutor(len(calls) + 1) as pool:
        long = pool.submit(long_request)
        wait_until(lambda: len(batcher.batches_run) > before or long.done(), "the long request's batch to start")
        assert not long.done(), f"the long request ended before others were sent: {long.result()}"
        try:
            results = list(pool.map(lambda call: call(), calls))
        finally:
            answered.set()
        assert long.result(), "the long request ended before the requests beside it were answered"
    idle(batcher)
    return results
