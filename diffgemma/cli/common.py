"""What the commands share: the model their options name, loaded as they ask, and the sampler's settings."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

from ..config import SamplerSettings, read_text
from ..errors import DiffGemmaError

MODEL_ENV = "DIFFGEMMA_MODEL"
SAMPLER_OPTIONS = {
    "steps": "max_denoising_steps",
    "entropy_bound": "entropy_bound",
    "t_max": "t_max",
    "t_min": "t_min",
    "stability": "stability_threshold",
    "confidence": "confidence_threshold",
    "top_k": "top_k",
    "top_p": "top_p",
    "min_p": "min_p",
    "presence_penalty": "presence_penalty",
    "frequency_penalty": "frequency_penalty",
    "repetition_penalty": "repetition_penalty",
}


def model_path(args: argparse.Namespace) -> str:
    path = args.model or os.environ.get(MODEL_ENV)
    if not path:
        raise DiffGemmaError(
            f"no model given: pass --model PATH (a DiffusionGemma checkpoint folder) or set {MODEL_ENV}; "
            "`diffgemma random-checkpoint DIR` writes a small one to try things with"
        )
    return path


def load_model(args: argparse.Namespace, path: str | os.PathLike | None = None):
    """The model of the command's options (--model unless `path` is given, --device, --dtype, --quant, --adapter,
    --compile, --prefix-cache, --system-cache)."""
    from ..api import load

    path = model_path(args) if path is None else path
    check_sampler_options(args)
    with terminal_progress("loading" if args.quant is None else f"loading, quantizing to {args.quant}") as progress:
        model = load(
            path, device=args.device, dtype=args.dtype, quant=args.quant, compile=args.compile, progress=progress
        )
    check_sampler_options(args, model.settings)
    if args.adapter is not None:
        model.load_adapter(args.adapter)
    if args.prefix_cache == 0:
        model.prefix_cache = None
    elif model.prefix_cache is not None:
        model.prefix_cache.entries = args.prefix_cache
        model.prefix_cache.shared = args.system_cache
    return with_template(model, args)


@contextlib.contextmanager
def terminal_progress(what: str, unit: str = "bytes") -> Iterator[Callable[[int, int], None] | None]:
    """A progress bar on a terminal's stderr for work counted in `unit` ("bytes": a checkpoint's weights read;
    else a count: steps), gone when the work is done; None where stderr is no terminal (a pipe, a log), which
    gets nothing."""
    if not sys.stderr.isatty():
        yield None
        return
    from rich import progress as bars
    from rich.console import Console

    counted = (bars.DownloadColumn(), bars.TransferSpeedColumn()) if unit == "bytes" else (bars.MofNCompleteColumn(),)
    columns = (bars.TextColumn(what), bars.BarColumn(), *counted, bars.TimeRemainingColumn())
    with bars.Progress(*columns, console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(what, total=None)
        yield lambda done, total: bar.update(task, completed=done, total=total)


def with_template(model, args: argparse.Namespace):
    """The model, its chats rendered with --chat-template's file where a command has it and it is given."""
    path = getattr(args, "chat_template", None)
    if path is None:
        return model
    if model.tokenizer is None:
        raise DiffGemmaError(f"--chat-template {path}: this checkpoint has no tokenizer to render chats with")
    model.tokenizer.use_template(read_text(path), path)
    return model


def set_threads(args: argparse.Namespace) -> None:
    """--threads, where a command has it: the CPU threads PyTorch's kernels use (its default: one per core)."""
    if getattr(args, "threads", None) is None:
        return
    if args.threads < 1:
        raise DiffGemmaError(f"--threads must be at least 1, got {args.threads}")
    import torch

    torch.set_num_threads(args.threads)


def sampler_options(args: argparse.Namespace) -> dict[str, Any]:
    """The sampler settings the options give (and --max-new-tokens, where a command has it)."""
    values = {name: getattr(args, option, None) for option, name in SAMPLER_OPTIONS.items()}
    values = {k: v for k, v in values.items() if v is not None}
    if getattr(args, "max_new_tokens", None) is not None:
        values["max_new_tokens"] = args.max_new_tokens
    return values


def check_sampler_options(args: argparse.Namespace, settings: SamplerSettings | None = None) -> None:
    """The sampler options checked as `SamplerSettings` checks them, each named as typed: before a model loads (a
    large one takes minutes; the temperature schedule's other end is the checkpoint's, unknown yet, so a lone
    --t-max or --t-min is checked against any that would fit it), then against its `settings`."""
    values = sampler_options(args)
    ends = {"t_min": 0.0, "t_max": values.get("t_min", 0.0) + 1.0} if settings is None else {}
    flags = {name: "--" + option.replace("_", "-") for option, name in SAMPLER_OPTIONS.items()}
    checked = replace(settings or SamplerSettings(), **{**ends, **values})
    checked.validate("", {**flags, "max_new_tokens": "--max-new-tokens"})


def read_prompt(prompt: str) -> str:
    return sys.stdin.read() if prompt == "-" else prompt


def range_option(text: str, kind: type, expected: str) -> tuple:
    """An option's range A:B (or one value, A:A) as (low, high) of `kind`; `expected` says what it should be."""
    low, _, high = text.partition(":")
    try:
        return kind(low), kind(high or low)
    except ValueError:
        raise DiffGemmaError(f"{expected}, got {text!r}") from None
