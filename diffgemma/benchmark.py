"""How fast a loaded model denoises on this machine: a user's own benchmark (`diffgemma bench`), as llama.cpp's
`llama-bench` is its users'.

Random prompts of a given length, then canvases of a fixed number of denoising steps each: no early stop and
no EOS, so every step runs, whatever the random weights or prompts would write. Each step is timed through
`stream` (on a GPU each waits for the device, so a step's time is its work, not its launch). A canvas's first
step also encodes what came before it (the prompt, or the canvas before), so the speed of denoising is the
median of the other steps, and the prompt's encoding is the first step less one of those. A short run first
warms the kernels up (and, on CUDA, compiles and captures what the engine captures).
"""

from __future__ import annotations

import itertools
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from .api import DiffGemma
from .config import is_int
from .errors import DiffGemmaError
from .generate import Draft


@dataclass(frozen=True)
class SpeedReport:
    """One measured configuration: rows, prompt, canvases and steps; the median step, the prompt canvas's first
    step, the whole run's seconds, and the peak memory (the GPU's allocations on CUDA, else the process's resident
    memory; None where unknown)."""

    batch: int
    prompt_tokens: int
    canvas_length: int
    canvases: int
    steps: int
    step_ms: float
    first_step_ms: float
    seconds: float
    peak_bytes: int | None

    @property
    def tokens_per_second(self) -> float:
        """Tokens a second while denoising: a canvas for each row every `steps` steps."""
        return self.batch * self.canvas_length * 1000 / (self.steps * self.step_ms)

    @property
    def whole_tokens_per_second(self) -> float:
        """Tokens a second over the whole run: the prompt's encoding and every canvas's encoding counted."""
        return self.batch * self.canvas_length * self.canvases / self.seconds

    @property
    def prompt_tokens_per_second(self) -> float | None:
        """The prompt's encoding: its tokens over its share of the first step (None where too small to tell)."""
        encoding = self.first_step_ms - self.step_ms
        return self.batch * self.prompt_tokens * 1000 / encoding if encoding > 0 else None

    def as_dict(self) -> dict:
        return {
            **asdict(self),
            "tokens_per_second": self.tokens_per_second,
            "whole_tokens_per_second": self.whole_tokens_per_second,
            "prompt_tokens_per_second": self.prompt_tokens_per_second,
        }


def measure_speed(
    model: DiffGemma,
    batch: int = 1,
    prompt_tokens: int = 128,
    canvases: int = 2,
    steps: int = 16,
    seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
) -> SpeedReport:
    """Time `model` denoising `batch` rows of random `prompt_tokens`-token prompts, `canvases` canvases of
    `steps` steps each (see the module's docstring); `progress` is told (steps run, steps in all, the warm-up's
    included) after each step (the 26B model's on a CPU take seconds each)."""
    for name, value in (("batch", batch), ("prompt_tokens", prompt_tokens), ("canvases", canvases), ("steps", steps)):
        if not is_int(value) or value < 1:
            raise DiffGemmaError(f"{name} must be a whole number, 1 or more, got {value!r}")
    if steps < 2:
        raise DiffGemmaError("a canvas of one step has no step apart from its first to time: ask 2 or more")
    length = model.config.canvas_length
    positions = model.config.max_position_embeddings
    if prompt_tokens + canvases * length > positions:
        asked = f"a {prompt_tokens}-token prompt and {canvases} canvas(es) of {length}"
        raise DiffGemmaError(f"{asked} exceed the model's {positions} positions")
    # every step runs: the stop test's mean entropy never falls under the threshold, and no id ends a row
    every_step = {"confidence_threshold": sys.float_info.min, "eos_token_id": []}
    cuda = model.device.type == "cuda"
    warm_up_steps = min(steps, 3)
    ran = itertools.count(1)
    tick = (lambda: progress(next(ran), warm_up_steps + canvases * steps)) if progress is not None else None
    kept, model.prefix_cache = model.prefix_cache, None  # (every prompt encoded whole, as a new one is)
    try:
        warm_up = _prompts(model, batch, prompt_tokens, seed + 1)
        _timed(model, warm_up, 1, {**every_step, "max_denoising_steps": warm_up_steps}, cuda, tick)
        if cuda:
            torch.cuda.reset_peak_memory_stats(model.device)
        started = time.perf_counter()
        prompts = _prompts(model, batch, prompt_tokens, seed)
        firsts, others = _timed(model, prompts, canvases, {**every_step, "max_denoising_steps": steps}, cuda, tick)
        seconds = time.perf_counter() - started
    finally:
        model.prefix_cache = kept
    peak = torch.cuda.max_memory_allocated(model.device) if cuda else _peak_resident_bytes()
    return SpeedReport(
        batch, prompt_tokens, length, canvases, steps, statistics.median(others), firsts[0], seconds, peak
    )


def _timed(
    model: DiffGemma,
    prompts: list[list[int]],
    canvases: int,
    sampler: dict,
    cuda: bool,
    tick: Callable[[], None] | None = None,
) -> tuple[list[float], list[float]]:
    """One generation's step times in ms: each canvas's first step, and the others (`tick`: called after each)."""
    firsts, others = [], []
    events = model.stream(prompts, max_new_tokens=canvases * model.config.canvas_length, seed=0, **sampler)
    last = time.perf_counter()
    for event in events:
        if cuda:
            torch.cuda.synchronize(model.device)
        now = time.perf_counter()
        if isinstance(event, Draft):
            (firsts if event.step == 1 else others).append((now - last) * 1000)
            if tick is not None:
                tick()
        last = now
    return firsts, others


def _prompts(model: DiffGemma, batch: int, tokens: int, seed: int) -> list[list[int]]:
    """`batch` random prompts of `tokens` ids, none an id that ends a row, pads one or stands for a picture."""
    vocab = model.config.vocab_size
    avoid = {*model.settings.eos_token_id, model.settings.pad_id}
    if model.config.vision is not None:
        avoid.add(model.config.vision.image_token_id)
    allowed = torch.tensor([token for token in range(vocab) if token not in avoid])
    generator = torch.Generator().manual_seed(seed)
    picks = torch.randint(0, len(allowed), (batch, tokens), generator=generator)
    return allowed[picks].tolist()


def _peak_resident_bytes() -> int | None:
    """This process's peak resident memory so far (Linux counts it in KiB, macOS in bytes; Windows: unknown)."""
    try:
        import resource
    except ImportError:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024
