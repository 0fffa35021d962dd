"""The `diffgemma` command: argument parsing and printing only; the work is the public API's."""

from __future__ import annotations

import argparse
import atexit
import codecs
import contextlib
import os
import re
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from . import __version__
from .config import read_jsonl, read_text
from .errors import DiffGemmaError
from .quant import FORMATS
from .resources import first_line, free_memory, out_of_memory, size_text
from .structured import DEFAULT_TRIES
from .toolcalls import check_tools, run_tool_calls

BYTES_PER_DTYPE = {"float32": 4, "bfloat16": 2, "float16": 2}
MODEL_ENV = "DIFFGEMMA_MODEL"
CHAT_MAX_NEW_TOKENS = 4096  # `chat`'s token limit unless --max-new-tokens says: answers end at EOS well before it
MAX_TOOL_ROUNDS = 16  # `chat --tools`: rounds of calls before the model is made to answer
SAMPLER_OPTIONS = {
    "steps": "max_denoising_steps",
    "entropy_bound": "entropy_bound",
    "t_max": "t_max",
    "t_min": "t_min",
    "stability": "stability_threshold",
    "confidence": "confidence_threshold",
}


class OneLineParser(argparse.ArgumentParser):
    """Bad options get one line on stderr and exit code 2 (no usage dump)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"diffgemma: {message} (see `{self.prog} --help`)", file=sys.stderr)
        raise SystemExit(2)


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


def _dtype_name(dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _model_path(args: argparse.Namespace) -> str:
    path = args.model or os.environ.get(MODEL_ENV)
    if not path:
        raise DiffGemmaError(
            f"no model given: pass --model PATH (a DiffusionGemma checkpoint folder) or set {MODEL_ENV}; "
            "`diffgemma random-checkpoint DIR` writes a small one to try things with"
        )
    return path


def _load(args: argparse.Namespace, path: str | os.PathLike | None = None):
    """The model of the command's options (--model unless `path` is given, --device, --dtype, --quant, --adapter,
    --compile, --prefix-cache)."""
    from .api import load

    path = _model_path(args) if path is None else path
    model = load(path, device=args.device, dtype=args.dtype, quant=args.quant, compile=args.compile)
    if args.adapter is not None:
        model.load_adapter(args.adapter)
    if args.prefix_cache == 0:
        model.prefix_cache = None
    elif model.prefix_cache is not None:
        model.prefix_cache.entries = args.prefix_cache
    return _with_template(model, args)


def _with_template(model, args: argparse.Namespace):
    """The model, its chats rendered with --chat-template's file where a command has it and it is given."""
    path = getattr(args, "chat_template", None)
    if path is None:
        return model
    if model.tokenizer is None:
        raise DiffGemmaError(f"--chat-template {path}: this checkpoint has no tokenizer to render chats with")
    model.tokenizer.use_template(read_text(path), path)
    return model


def _set_threads(args: argparse.Namespace) -> None:
    """--threads, where a command has it: the CPU threads PyTorch's kernels use (its default: one per core)."""
    if getattr(args, "threads", None) is None:
        return
    if args.threads < 1:
        raise DiffGemmaError(f"--threads must be at least 1, got {args.threads}")
    import torch

    torch.set_num_threads(args.threads)


def _sampler(args: argparse.Namespace) -> dict[str, Any]:
    values = {name: getattr(args, option) for option, name in SAMPLER_OPTIONS.items()}
    values = {k: v for k, v in values.items() if v is not None}
    if args.max_new_tokens is not None:
        values["max_new_tokens"] = args.max_new_tokens
    return values


def _read_prompt(prompt: str) -> str:
    return sys.stdin.read() if prompt == "-" else prompt


def cmd_info(args: argparse.Namespace) -> None:
    import torch

    from .api import CONFIG_FILES, DTYPE_NAMES, auto_dtype, bf16_is_fast, resolve_folder
    from .checkpoint import stored_float_dtype
    from .config import load_configs
    from .quant import QuantFormat, cpu_kernels_here, format_from_config, memory_estimate

    folder = resolve_folder(_model_path(args), CONFIG_FILES)  # a Hub id: its configs alone
    config, settings = load_configs(folder)
    room = config.max_position_embeddings - config.canvas_length  # a canvas follows the context
    if not 0 <= args.context <= room:
        raise DiffGemmaError(
            f"--context must be between 0 and {room} (max_position_embeddings {config.max_position_embeddings}"
            f" less one canvas of {config.canvas_length}), got {args.context}"
        )
    total, active = config.parameter_counts()
    kinds = {kind: config.layer_types.count(kind) for kind in dict.fromkeys(config.layer_types)}
    print(f"checkpoint      {folder}")
    print(f"layers          {config.num_hidden_layers} ({', '.join(f'{n} {k}' for k, n in kinds.items())})")
    print(f"hidden          {config.hidden_size}, {config.num_attention_heads} query heads")
    for kind in kinds:
        shape = config.layers[config.layer_types.index(kind)]
        print(f"  {kind:<18}{shape.num_kv_heads} KV heads x {shape.head_dim}, RoPE {shape.rope_type}")
    print(f"sliding window  {config.sliding_window}")
    print(f"experts         {config.num_experts} x {config.moe_intermediate_size}, top-{config.top_k_experts}")
    print(f"dense MLP       {config.intermediate_size}")
    print(f"vocabulary      {config.vocab_size}")
    print(f"canvas          {config.canvas_length} tokens")
    print(f"parameters      {_count(total)} total, {_count(active)} active per token")
    print("weights         " + ", ".join(f"{name} {size_text(total * size)}" for name, size in BYTES_PER_DTYPE.items()))
    stored_format = format_from_config(config.raw)
    if stored_format is not None:
        print(f"quantized       {stored_format.describe()} (as stored; it loads so)")
    print(
        f"memory for {args.context} tokens of context, batch {args.batch} (weights + cache and what the prefix "
        "cache keeps + sampler buffers + activations: a denoising step's and a prompt chunk's largest temporaries):"
    )
    rows = [(name, DTYPE_NAMES[name], None) for name in BYTES_PER_DTYPE]
    rows += [(f"{fmt} (bf16)", torch.bfloat16, QuantFormat(fmt)) for fmt in FORMATS]
    # on a CPU without bf16 instructions (`--dtype auto`): the rest in float32, int8 / int4 through its kernels
    rows += [(f"{fmt} (fp32)", torch.float32, QuantFormat(fmt)) for fmt in ("int8", "int4")]
    if stored_format is not None:  # it loads in its own format only: the rows of that format, with its groups
        rows = [(label, dtype, stored_format) for label, dtype, fmt in rows if fmt and fmt.name == stored_format.name]
    for label, dtype, fmt in rows:
        parts = memory_estimate(config, dtype, fmt, args.context, args.batch)
        whole = sum(parts.values())
        detail = f"weights {size_text(parts['weights'])}, cache {size_text(parts['cache'])}"
        detail += f" (+ {size_text(parts['prefix'])} prefix)"
        detail += f", sampler {size_text(parts['sampler'])}"
        detail += f", activations {size_text(parts['step'] + parts['prompt'])} (a step {size_text(parts['step'])}"
        detail += f", a prompt chunk {size_text(parts['prompt'])})"
        detail += f", one weight expanded {size_text(parts['expanded'])}" if fmt is not None else ""
        # kernels that read weights as stored: on a GPU int4, int8, fp8 (Triton; fp8 on Hopper: its matrix units),
        # on a CPU int8 and int4 where few rows meet a weight (an expert's share of a canvas at batch 1)
        direct = f"; {size_text(whole - parts['expanded'])} where a kernel takes {fmt.name}" if fmt is not None else ""
        print(f"  {label:<14}{size_text(whole)} ({detail}{direct})")
    _print_training_state(config, stored_format)
    cpu = torch.device("cpu")
    bf16 = "bf16 products in hardware" if bf16_is_fast(cpu) else "no bf16 products in hardware (float32 is faster)"
    print(f"this CPU        {cpu_kernels_here()}; {bf16}")
    free = [(device, free_memory(device)) for device in _local_devices()]
    shown = [f"{size_text(room)} on {device}" for device, room in free if room is not None]
    if shown:  # what a load is checked against (swap counts on the CPU)
        print(f"free here       {', '.join(shown)}")
    if any(folder.glob("*.safetensors")):  # (a config alone gives the rest)
        stored = stored_float_dtype(folder)
        autos = ", ".join(f"{_dtype_name(auto_dtype(device, stored))} on {device}" for device in _local_devices())
        print(f"stored dtype    {_dtype_name(stored)}; --dtype auto loads it in {autos}")
    print(
        f"sampler         {settings.max_denoising_steps} steps, entropy bound {settings.entropy_bound}, "
        f"temperature {settings.t_max} -> {settings.t_min}, stop after {settings.stability_threshold} stable "
        f"step(s) below entropy {settings.confidence_threshold}"
    )


def _local_devices() -> list:
    import torch

    return [torch.device("cpu"), *([torch.device("cuda")] if torch.cuda.is_available() else [])]


def _print_training_state(config, stored_format) -> None:
    """`info`'s training rows: what `train chat` holds whatever its batch (its `--dtype`: float32 by default, bf16
    products under autocast; bfloat16 halves the weights), every weight trained or LoRA adapters of rank 16, over
    a base in that dtype or quantized (`--quant`, QLoRA; a checkpoint stored quantized: its own format)."""
    import torch

    from .quant import QuantFormat
    from .train.lora import LoraSettings
    from .train.memory import training_state_bytes

    lora = LoraSettings(16)
    formats = [stored_format] if stored_format is not None else [None, QuantFormat("int4")]
    ways = []  # (label, the dtype of what is not quantized, the base's format, adapters)
    if stored_format is None:  # weights stored quantized train adapters alone
        ways.append(("full, float32", torch.float32, None, None))
    for fmt in formats:
        for dtype, dtype_name in ((torch.float32, "float32"), (torch.bfloat16, "bf16")):
            label = f"LoRA 16, {dtype_name}" if fmt is None else f"QLoRA 16, {fmt.name} + {dtype_name}"
            ways.append((label, dtype, fmt, lora))
    print("training state (weights, gradients, AdamW's moments; each step's activations come on top):")
    for label, dtype, fmt, adapters in ways:
        parts = training_state_bytes(config, dtype, fmt, adapters)
        whole = parts["weights"] + parts["gradients"] + parts["optimizer"]
        detail = f"weights {size_text(parts['weights'])}, gradients {size_text(parts['gradients'])}"
        detail += f", AdamW {size_text(parts['optimizer'])}; {_count(parts['trained'])} values trained"
        print(f"  {label:<26}{size_text(whole)} ({detail})")


def cmd_random_checkpoint(args: argparse.Namespace) -> None:
    from .api import resolve_dtype
    from .presets import random_checkpoint

    path = random_checkpoint(args.folder, preset=args.preset, seed=args.seed, dtype=resolve_dtype(args.dtype))
    print(f"wrote a random {args.preset} checkpoint to {path}")


def _watch(model, prompt: Any, args: argparse.Namespace, sampler: dict[str, Any], **extra: Any):
    """Run a generation, showing the canvas converge in place; returns the result."""
    from rich.console import Console
    from rich.live import Live
    from rich.panel import Panel
    from rich.text import Text

    from .generate import Done, Draft

    console = Console(stderr=not sys.stdout.isatty())  # piped, the text alone goes to stdout; the view to stderr
    started = time.perf_counter()
    committed_text = ""
    result = None
    with Live(console=console, refresh_per_second=20, transient=False) as live:
        for event in model.stream(prompt, seed=args.seed, mode=args.mode, **sampler, **extra):
            if isinstance(event, Draft):
                tokens = event.ids[0].tolist()
                accepted = event.accepted[0].tolist()
                body = Text(committed_text)
                for token, is_accepted in zip(tokens, accepted, strict=True):
                    piece = model.tokenizer.decode([token])
                    body.append(piece, style="bold green" if is_accepted else "grey50")
                elapsed = time.perf_counter() - started
                title = (
                    f"canvas {event.canvas_index + 1} · step {event.step} · "
                    f"entropy {float(event.mean_entropy[0]):.3f} · {elapsed:.1f}s"
                )
                live.update(Panel(body, title=title, title_align="left"), refresh=True)
            elif isinstance(event, Done):
                result = event.result
            else:
                committed_text += model.tokenizer.decode(event.ids[0].tolist())
    return result


def _print_as_it_settles(
    model, prompt: Any, args: argparse.Namespace, sampler: dict[str, Any], chat: bool, lead: str = "", **extra: Any
):
    """Generate, printing the answer as it settles (a canvas's leading tokens are fixed as soon as they are
    stable and confident, so the text never changes once shown): the thinking after "[thinking] " on a line of
    its own, then `lead` and the answer. Returns (the result, the answer, the thinking)."""
    from .generate import CanvasCommit, Done, Draft

    text = model.settled_text(chat, args.stop or ())
    limit = sampler.get("max_new_tokens", model.settings.max_new_tokens)
    started = {"reasoning": False, "content": False}

    def show(content: str, reasoning: str, final: bool = False) -> None:
        if reasoning:
            print("" if started["reasoning"] else "[thinking] ", reasoning, sep="", end="", flush=True)
            started["reasoning"] = True
        if (content or final) and not started["content"]:  # (an empty answer still gets its line)
            print("\n" if started["reasoning"] else "", lead, sep="", end="")
            started["content"] = True
        print(content, end="\n" if final else "", flush=True)

    committed: list[int] = []
    result = None
    for event in model.stream(
        prompt, seed=args.seed, mode=args.mode, commit_stable_prefix=True, stop=text.stops, **sampler, **extra
    ):
        if isinstance(event, Draft) and event.settled is not None:
            show(*text.deltas((committed + event.ids[0, : int(event.settled[0])].tolist())[:limit]))
        elif isinstance(event, CanvasCommit):
            committed += event.ids[0].tolist()
        elif isinstance(event, Done):
            result = event.result
    show(*text.deltas(result.new_tokens[0], final=True), final=True)
    content, reasoning = text.parts(result.new_tokens[0])
    return result, content, reasoning


def _file_prompts(path: str) -> list[str]:
    """Prompts from a file: a `.jsonl` file's {"prompt": ...} records, else one prompt a line (blank lines skipped)."""
    if Path(path).suffix == ".jsonl":
        prompts = []
        for where, record in read_jsonl(path):
            if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
                raise DiffGemmaError(f'{where}: expected an object with a "prompt" text')
            prompts.append(record["prompt"])
        return prompts
    return [line for line in read_text(path).splitlines() if line.strip()]


def _file_conversations(model, path: str, system: str | None, thinking: bool) -> list[tuple[list, list[int]]]:
    """`chat --file`'s conversations, a .jsonl of {"messages": [...]} records, each with its prompt ids (rendered
    as `chat` renders one; `system` first where it has no system message); errors name the line."""
    if Path(path).suffix != ".jsonl":
        raise DiffGemmaError(f'{path}: chat --file reads a .jsonl file of {{"messages": [...]}} records')
    conversations = []
    for where, record in read_jsonl(path):
        messages = record.get("messages") if isinstance(record, dict) else None
        if not isinstance(messages, list):
            raise DiffGemmaError(f'{where}: expected an object with "messages": [...]')
        has_system = bool(messages) and isinstance(messages[0], dict) and messages[0].get("role") == "system"
        told = [{"role": "system", "content": system}, *messages] if system and not has_system else messages
        try:
            conversations.append((messages, model.tokenizer.encode_chat(told, thinking)))
        except DiffGemmaError as err:
            raise DiffGemmaError(f"{where}: {err}") from None
    if not conversations:
        raise DiffGemmaError(f"{path}: no conversations")
    return conversations


def _run_file(
    model,
    args: argparse.Namespace,
    sampler: dict[str, Any],
    prompts: list,
    stop: Any,
    record: Callable[[int, Any, int], dict[str, Any]],
) -> None:
    """`--file`'s prompts (texts or ids), `--batch-size` rows at a time (prompt i seeded seed + i), as JSONL on
    stdout in the file's order: `record(i, result, row)` for prompt i, row `row` of its batch's result."""
    import json

    if not prompts:
        raise DiffGemmaError(f"{args.file}: no prompts")
    size = 1 if args.mode == "reference" else args.batch_size  # (reference mode draws one stream for a batch)
    tokens, seconds = 0, 0.0
    for start in range(0, len(prompts), size):
        rows = prompts[start : start + size]
        seeds = None if args.seed is None else [args.seed + start + i for i in range(len(rows))]
        seed = seeds[0] if seeds is not None and args.mode == "reference" else seeds
        result = model.generate(rows, seed=seed, mode=args.mode, stop=stop, **sampler)
        for row in range(len(rows)):
            print(json.dumps(record(start + row, result, row), ensure_ascii=False), flush=True)
        tokens += sum(len(row) for row in result.new_tokens)
        seconds += result.wall_time
    if args.stats:
        print(f"[{len(prompts)} prompts, {tokens} tokens, {tokens / max(seconds, 1e-9):.1f} tokens/s]", file=sys.stderr)


def _finish_reason(result, row: int) -> str:
    """A --file row's finish reason, as OpenAI's: "length" when cut at the token limit, else "stop"."""
    return "length" if result.reached_limit[row] else "stop"


def _generate_file(model, args: argparse.Namespace, sampler: dict[str, Any]) -> None:
    """`generate --file`: {"prompt", "text", "finish_reason"} a prompt ("length": cut at the token limit)."""
    prompts = _file_prompts(args.file)

    def record(index: int, result, row: int) -> dict[str, Any]:
        return {"prompt": prompts[index], "text": result.text[row], "finish_reason": _finish_reason(result, row)}

    _run_file(model, args, sampler, prompts, args.stop, record)


def _chat_file(model, args: argparse.Namespace, sampler: dict[str, Any]) -> None:
    """`chat --file`: each conversation's next answer, {"messages", "text", "reasoning" (when it thought),
    "finish_reason"} a conversation."""
    reply = model.settled_text(True, args.stop or ())  # (first: a checkpoint without a tokenizer is told here)
    conversations = _file_conversations(model, args.file, args.system, args.think)

    def record(index: int, result, row: int) -> dict[str, Any]:
        content, reasoning = reply.parts(result.new_tokens[row])
        answered = {"messages": conversations[index][0], "text": content}
        return {
            **answered,
            **({"reasoning": reasoning} if reasoning else {}),
            "finish_reason": _finish_reason(result, row),
        }

    _run_file(model, args, sampler, [ids for _, ids in conversations], reply.stops, record)


def cmd_generate(args: argparse.Namespace) -> None:
    if (args.prompt is None) == (args.file is None):
        raise DiffGemmaError("give a prompt (or - for stdin), or --file with one prompt a line")
    if args.file is not None and args.watch:
        raise DiffGemmaError("--watch shows one prompt's canvas; --file runs many")
    model = _load(args)
    sampler = _sampler(args)
    if args.file is not None:
        _generate_file(model, args, sampler)
        return
    prompt = _read_prompt(args.prompt)
    if args.watch:
        result = _watch(model, prompt, args, sampler, stop=args.stop)
        print(result.text)
    elif args.stream:
        result = _print_as_it_settles(model, prompt, args, sampler, chat=False)[0]
    else:
        result = model.generate(prompt, seed=args.seed, mode=args.mode, stop=args.stop, **sampler)
        print(result.text)
    _say_if_cut(result)
    if args.stats:
        steps = sum(sum(rows) for rows in result.steps)
        print(
            f"[{len(result.new_tokens[0])} tokens, {steps} denoising steps, {result.tokens_per_second:.1f} tokens/s]",
            file=sys.stderr,
        )


def cmd_score(args: argparse.Namespace) -> None:
    """How likely the model finds a text, token by token (the causal encoder's log-probabilities): a summary
    line, or with --tokens each token's, or with --json both as one record."""
    import json

    if (args.text is None) == (args.file is None):
        raise DiffGemmaError("give a text (or - for stdin), or --file with the text to score")
    text = read_text(args.file) if args.file else _read_prompt(args.text)
    model = _load(args)
    scores = model.score(text)
    scored = len(scores.ids) - 1
    if scored < 1:
        raise DiffGemmaError("the text is empty: nothing to score after the first token")
    # each token's text, only where it is shown (a long file has many)
    pieces = [model.tokenizer.decode([token], skip_special_tokens=False) for token in scores.ids] if args.tokens else []
    if args.json:
        summary = {"tokens": scored, "logprob": scores.total, "perplexity": scores.perplexity}
        if args.tokens:
            per_token = zip(pieces, scores.logprobs, strict=True)
            summary["per_token"] = [{"token": piece, "logprob": value} for piece, value in per_token]
        print(json.dumps(summary, ensure_ascii=False))
        return
    if args.tokens:
        for piece, value in zip(pieces, scores.logprobs, strict=True):
            print(f"{'' if value is None else f'{value:9.4f}':>9}  {piece!r}")
    mean = scores.total / scored
    likelihood = f"log-likelihood {scores.total:.3f} ({mean:.4f} a token)"
    print(f"{scored} tokens scored, {likelihood}, perplexity {scores.perplexity:.3f}")


def _say_if_cut(result) -> None:
    """A text cut at the token limit (no EOS before it) says so on stderr, rather than ending as if finished."""
    if result.reached_limit[0]:
        limit = len(result.new_tokens[0])
        print(f"[cut at the {limit}-token limit; --max-new-tokens sets it]", file=sys.stderr, flush=True)


def cmd_chat(args: argparse.Namespace) -> None:
    if args.file is not None and (args.message is not None or args.tools or args.watch):
        raise DiffGemmaError("--file answers many conversations, each once: not with a message, --tools or --watch")
    if args.stats and args.file is None:
        raise DiffGemmaError("--stats sums up a --file run")
    functions = _tool_functions(args.tools) if args.tools else []  # (a bad file is told before the model loads)
    model = _load(args)
    sampler = _sampler(args)
    # Answers run to EOS; the checkpoint's max_new_tokens (the reference's 256: one canvas) would cut most.
    sampler.setdefault("max_new_tokens", max(CHAT_MAX_NEW_TOKENS, model.settings.max_new_tokens))
    if args.file is not None:
        _chat_file(model, args, sampler)
        return
    opening = [{"role": "system", "content": args.system}] if args.system else []
    history: list[dict[str, Any]] = list(opening)
    thinking = args.think
    terminal = sys.stdin.isatty()
    interactive = terminal and args.message is None

    def answer(line: str) -> None:
        history.append({"role": "user", "content": line})
        if args.stream and not functions and not (args.watch and terminal):
            lead = "model> " if interactive else ""
            result, content, _ = _print_as_it_settles(
                model, history, args, sampler, chat=True, lead=lead, enable_thinking=thinking
            )
        else:
            if functions:  # an agent: each call the model makes is run, its result told to it, until it answers
                settings = {"seed": args.seed, "mode": args.mode, "stop": args.stop, **sampler}
                reply = _agent_turn(model, history, functions, thinking, settings)
                result, content, reasoning = reply.result, reply.content, reply.reasoning
            else:
                text = model.settled_text(True, args.stop or ())
                if args.watch and terminal:
                    result = _watch(model, history, args, sampler, enable_thinking=thinking, stop=text.stops)
                else:
                    result = model.generate(
                        history, seed=args.seed, mode=args.mode, enable_thinking=thinking, stop=text.stops, **sampler
                    )
                content, reasoning = text.parts(result.new_tokens[0])
            if reasoning:
                print(f"[thinking] {reasoning}")
            print(f"model> {content}" if interactive else content)
        _say_if_cut(result)
        history.append({"role": "assistant", "content": content})

    if args.message is not None:  # one question, one answer
        answer(args.message)
        return
    if interactive:
        with contextlib.suppress(ImportError):  # line editing and history for input(), where the platform has it
            import readline  # noqa: F401

        print("chat with the model; /reset clears the history, /think on|off, /exit quits", file=sys.stderr)
    while True:
        try:
            line = input("you> " if interactive else "")
        except EOFError:
            break
        line = line.strip()
        if not line:
            continue
        if line in ("/exit", "/quit"):
            break
        if line == "/reset":
            history[:] = opening
            print("(history cleared)")
            continue
        if line.startswith("/think"):
            thinking = line.split()[-1] == "on"
            print(f"(thinking {'on' if thinking else 'off'})")
            continue
        turns = len(history)
        try:
            answer(line)
        except KeyboardInterrupt:  # Ctrl-C stops the answer, not the chat (at the prompt it quits)
            if not interactive:
                raise
            del history[turns:]  # the question goes with its unfinished answer
            print("\n(interrupted)")


def _agent_turn(model, history: list[dict[str, Any]], functions: list[Callable[..., Any]], thinking: bool, settings):
    """One answer with tools: each round's calls run and shown, their results added to `history` for the model,
    until it answers; after MAX_TOOL_ROUNDS of calls it is made to answer without them. Returns its reply."""
    for _ in range(MAX_TOOL_ROUNDS):
        reply = model.chat(history, thinking, tools=functions, **settings)
        if not reply.tool_calls:
            return reply
        turn = run_tool_calls(reply.tool_calls, functions, reply.content)
        for call, result in zip(reply.tool_calls, turn[1:], strict=True):
            shown = ", ".join(f"{key}={value!r}" for key, value in call.arguments.items())
            print(f"[tool] {call.name}({shown}) -> {result['content']}")
        history.extend(turn)
    print(f"[{MAX_TOOL_ROUNDS} rounds of tool calls; answering without tools]", file=sys.stderr)
    return model.chat(history, thinking, tools=functions, tool_choice="none", **settings)


def _tool_functions(path: str) -> list[Callable[..., Any]]:
    """The public functions a Python file defines (not those it imports), for `chat --tools`: the tools offered,
    each read from its name, type hints and docstring (`toolcalls.function_tool`), and run when called."""
    import importlib.machinery
    import importlib.util
    import inspect

    file = Path(path)
    if not file.is_file():
        raise DiffGemmaError(f"--tools {path}: no such file")
    # its source whatever the file is named (`spec_from_file_location` gives nothing for a name without .py)
    loader = importlib.machinery.SourceFileLoader(f"diffgemma_tools_{file.stem}", str(file))
    module = importlib.util.module_from_spec(importlib.util.spec_from_loader(loader.name, loader))
    try:
        loader.exec_module(module)
    except Exception as err:  # the user's file: whatever it raises is theirs to see, in one line
        raise DiffGemmaError(f"--tools {path}: {type(err).__name__}: {err}") from None
    functions = [
        value
        for name, value in vars(module).items()
        if inspect.isfunction(value) and value.__module__ == module.__name__ and not name.startswith("_")
    ]
    if not functions:
        raise DiffGemmaError(f"--tools {path}: defines no public function to offer as a tool")
    check_tools(functions)
    return functions


def cmd_infill(args: argparse.Namespace) -> None:
    model = _load(args)
    result = model.infill(args.prefix, args.suffix, args.length, seed=args.seed, mode=args.mode, **_sampler(args))
    print(result.text)


def _lines(spec: str, total: int) -> tuple[int, int]:
    try:
        first, _, last = spec.partition(":")
        start, end = int(first), int(last or first)
    except ValueError:
        raise DiffGemmaError(f"--lines must look like A:B (1-based, inclusive), got {spec!r}") from None
    if start > end:
        raise DiffGemmaError(f"--lines {spec} ends before it starts (A:B with A <= B)")
    if not 1 <= start <= end <= total:
        raise DiffGemmaError(f"--lines {spec} is outside the file's {total} lines")
    return start, end


def write_atomically(path: Path, text: str, backup: bool) -> None:
    """Write `text` to `path` through a temporary file and a rename; keep `path.bak` if asked."""
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8", newline="") as f:  # no line ending translated
            f.write(text)
        if path.exists():
            os.chmod(temporary, path.stat().st_mode & 0o777)
            if backup:
                backup_path = path.with_name(path.name + ".bak")
                backup_path.write_bytes(path.read_bytes())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def cmd_edit(args: argparse.Namespace) -> None:
    path = Path(args.file)
    text = read_text(path, newline="")  # line endings as they are (\r\n stays \r\n)
    with open(path, "rb") as handle:  # a byte-order mark is not the model's to see, but the file keeps it
        mark = "\ufeff" if handle.read(3) == codecs.BOM_UTF8 else ""
    lines = re.findall(r"[^\n]*\n|[^\n]+\Z", text)
    first, last = _lines(args.lines, len(lines))
    start = sum(len(line) for line in lines[: first - 1])
    end = start + sum(len(line) for line in lines[first - 1 : last])
    end -= 2 if lines[last - 1].endswith("\r\n") else lines[last - 1].endswith("\n")  # keep the span's line end
    model = _load(args)
    result = model.edit(text, start, end, args.length, seed=args.seed, mode=args.mode, **_sampler(args))
    if args.write:
        write_atomically(path, mark + result.text, backup=not args.no_backup)
        print(f"rewrote lines {first}-{last} of {path}" + ("" if args.no_backup else f" (backup: {path.name}.bak)"))
    else:
        print(result.text, end="")


SUDOKU_MODEL = Path(__file__).resolve().parent / "models" / "sudoku"  # package data: a wheel carries it


def _sudoku_model(args: argparse.Namespace):
    path = args.model or (SUDOKU_MODEL if (SUDOKU_MODEL / "config.json").is_file() else None)
    if path is None:
        raise DiffGemmaError(
            f"no sudoku model given, and the shipped one ({SUDOKU_MODEL}) is missing: pass --model DIR "
            "(train one with `diffgemma train sudoku --out DIR`)"
        )
    from .tasks import sudoku

    model = _load(args, path)
    sudoku.check_model(model, str(path))
    return model


def cmd_sudoku(args: argparse.Namespace) -> None:
    import random

    from rich.console import Console
    from rich.live import Live
    from rich.text import Text

    from .generate import Done, Draft
    from .tasks import sudoku

    seed = args.seed if args.seed is not None else random.randrange(2**31)
    if args.puzzle:
        puzzle = sudoku.parse(args.puzzle, "--puzzle")
        if not sudoku.solve(puzzle, 1):  # (a check, as a player's; the model does the solving)
            raise DiffGemmaError("--puzzle: has no solution: no way to fill it keeps the rules")
    else:
        puzzle, _ = sudoku.make_puzzle(random.Random(seed), args.givens)
    model = _sudoku_model(args)
    tries = _tries(args)
    console = Console()
    grid = puzzle
    steps = spent = 0
    inputs = sudoku.model_solver_inputs(model, [puzzle], candidates=args.candidates)
    with Live(console=console, refresh_per_second=20) as live:
        # A grid that breaks a rule (checked as any player could) is solved again with a fresh seed, as
        # `eval sudoku --tries` does.
        for attempt in range(tries):
            label = f"try {attempt + 1}, " if tries > 1 else ""
            attempt_seed = sudoku.try_seed(seed, attempt)
            events = model.stream(seed=attempt_seed, **inputs, **_sampler(args))
            for event in events:
                if isinstance(event, Draft):
                    grid, steps = sudoku.grid_from_ids(event.ids[0].tolist()), event.step
                    live.update(_sudoku_board(puzzle, grid, f"{label}step {steps}", Text), refresh=True)
                elif isinstance(event, Done):
                    grid = sudoku.grid_from_ids(event.result.sequences[0, event.result.prompt_length :].tolist())
            spent += steps
            if sudoku.is_solution(grid, puzzle):
                break
        verdict = "solved" if sudoku.is_solution(grid, puzzle) else "not solved"
        total = f", {spent} in all" if spent > steps else ""
        live.update(_sudoku_board(puzzle, grid, f"{verdict} ({label}{steps} steps{total})", Text), refresh=True)
    print(sudoku.format_grid(grid))


def _at_least(minimum: int, maximum: int | None = None) -> Callable[[str], int]:
    """An argparse type: a whole number from `minimum` (to `maximum`), else argparse's usage error."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < minimum or (maximum is not None and value > maximum):
            bound = f"between {minimum} and {maximum}" if maximum is not None else f"at least {minimum}"
            raise argparse.ArgumentTypeError(f"must be {bound}, got {value}")
        return value

    return parse


def _add_tries_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--tries",
        type=int,
        default=None,
        help="solve again (fresh seed) while the grid breaks a rule, up to N times (default: the solver's 64; "
        "1: the model's first try alone)",
    )


def _tries(args: argparse.Namespace) -> int:
    from .tasks import sudoku

    tries = sudoku.SOLVE_TRIES if args.tries is None else args.tries
    if tries < 1:
        raise DiffGemmaError(f"--tries must be at least 1, got {tries}")
    return tries


def _add_candidates_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--no-candidates",
        dest="candidates",
        action="store_false",
        help="let an empty cell sample any digit, even one a given in its row, column or box holds (the model alone)",
    )


def _sudoku_board(puzzle, grid, title: str, text_type):
    board = text_type(f"{title}\n")
    for row in range(9):
        if row and row % 3 == 0:
            board.append("------+-------+------\n")
        for col in range(9):
            if col and col % 3 == 0:
                board.append("| ")
            cell = row * 9 + col
            digit = str(grid[cell]) if grid[cell] else "."
            board.append(digit + " ", style="bold" if puzzle[cell] else "cyan")
        board.append("\n")
    return board


def _range_option(text: str, kind: type, expected: str) -> tuple:
    """An option's range A:B (or one value, A:A) as (low, high) of `kind`; `expected` says what it should be."""
    low, _, high = text.partition(":")
    try:
        return kind(low), kind(high or low)
    except ValueError:
        raise DiffGemmaError(f"{expected}, got {text!r}") from None


def givens_range(text: str) -> tuple[int, int]:
    """`--givens` as (low, high): a number, or a range A:B."""
    return _range_option(text, int, "--givens must look like 24:36")


def cmd_sudoku_puzzles(args: argparse.Namespace) -> None:
    import random

    from .tasks import sudoku

    low_givens, high_givens = givens_range(args.givens)
    sudoku.check_givens_range((low_givens, high_givens))
    rng = random.Random(args.seed)
    for _ in range(args.count):
        puzzle, _ = sudoku.make_puzzle(rng, rng.randint(low_givens, high_givens))
        print(sudoku.format_grid(puzzle))


def cmd_eval_sudoku(args: argparse.Namespace) -> None:
    import json

    from .tasks import sudoku

    model = _sudoku_model(args)
    puzzles = sudoku.read_puzzles(args.puzzles)
    metrics = sudoku.evaluate(
        model, puzzles, seed=args.seed or 0, tries=_tries(args), candidates=args.candidates, **_sampler(args)
    )
    if args.json:
        print(json.dumps(metrics))
        return
    print(
        f"puzzles {metrics['n']}: solved {metrics['solved_rate']:.1%} "
        f"(first try {metrics['first_try_solved_rate']:.1%}, mean tries {metrics['mean_tries']:.2f}), "
        f"cells {metrics['cell_accuracy']:.1%}, "
        f"givens kept {metrics['givens_kept_rate']:.1%}, mean steps {metrics['mean_steps']:.1f}"
    )
    for givens, block in metrics["per_givens"].items():
        print(
            f"  {givens} givens: {block['n']} puzzles, solved {block['solved_rate']:.1%}, "
            f"cells {block['cell_accuracy']:.1%}, steps {block['mean_steps']:.1f}"
        )


def _join_torchrun(args: argparse.Namespace) -> int:
    """Under `torchrun`, join its process group: each rank on its own GPU (LOCAL_RANK, NCCL) or on the CPU
    (gloo). Returns this process's rank."""
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        if args.device.startswith("cuda"):
            local = int(os.environ.get("LOCAL_RANK", "0"))
            args.device = f"cuda:{local}"
            torch.cuda.set_device(local)
        dist.init_process_group("nccl" if args.device.startswith("cuda") else "gloo")
        atexit.register(dist.destroy_process_group)
    return dist.get_rank()


def cmd_train(args: argparse.Namespace) -> None:
    import torch

    torch.manual_seed(args.seed)
    under_torchrun = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if under_torchrun and args.task != "chat":
        raise DiffGemmaError("train sudoku runs in one process (its model is small); torchrun is for train chat")
    rank = _join_torchrun(args) if under_torchrun else 0
    log = (lambda line: print(line, flush=True)) if rank == 0 else (lambda line: None)
    if args.task == "chat":
        from .api import load
        from .train.lora import LoraSettings
        from .train.sft import FinetuneOptions, finetune

        if not args.data:
            raise DiffGemmaError('train chat needs --data FILE.jsonl (one {"messages": [...]} a line)')
        every = 100 if args.eval_every is None else args.eval_every
        if every < 0:
            raise DiffGemmaError(f"--eval-every must be 0 (only the final checkpoint) or more, got {every}")
        if args.quant and not args.lora_rank:
            raise DiffGemmaError("--quant trains adapters over a quantized base: give --lora-rank too")
        model = _with_template(load(_model_path(args), device=args.device, dtype=args.dtype, quant=args.quant), args)
        lora = LoraSettings(args.lora_rank, args.lora_alpha, args.lora_self_conditioning) if args.lora_rank else None
        options = FinetuneOptions(
            data=args.data,
            out=args.out,
            eval_data=args.eval_data,
            lora=lora,
            steps=args.steps or 1000,
            batch_size=args.batch_size or 8,
            accumulation=args.accumulation,
            peak_lr=1e-4 if args.lr is None else args.lr,
            ar_weight=1.0 if args.ar_weight is None else args.ar_weight,
            eval_every=every,
            save_every=every,
            seed=args.seed,
            enable_thinking=args.thinking,
            resume=args.resume,
            gradient_checkpointing=args.gradient_checkpointing,
            max_length=args.max_length,
        )
        finetune(model, options, log=log)
        return
    from .tasks import sudoku

    if args.quant:
        raise DiffGemmaError("--quant is for `train chat` with --lora-rank (a sudoku model trains in full)")
    draft_temperatures = None
    if args.draft_temperature is not None:
        expected = "--draft-temperature must be a number or a range like 0.4:0.8"
        draft_temperatures = _range_option(args.draft_temperature, float, expected)
    sudoku.train_sudoku(
        args.out,
        steps=args.steps or 20000,
        batch_size=args.batch_size or 64,
        seed=args.seed,
        peak_lr=2e-3 if args.lr is None else args.lr,
        ar_weight=args.ar_weight or 0.0,
        objective=args.objective,
        pool_size=args.pool,
        givens=givens_range(args.givens),
        eval_every=500 if args.eval_every is None else args.eval_every,
        eval_puzzles=args.eval_puzzles,
        resume=args.resume,
        init=args.init,
        device=args.device,
        seconds=args.seconds,
        pool_workers=args.pool_workers,
        pool_cache=args.pool_file,
        max_detached_passes=args.self_conditioning_passes,
        layers=args.layers,
        candidate_prior=args.candidate_prior,
        draft_temperatures=draft_temperatures,
        masked_cells=args.masked_cells,
        log=log,
    )


def cmd_quantize(args: argparse.Namespace) -> None:
    from .api import load_dtype, resolve_device, resolve_folder
    from .quant import QuantFormat, quantize_checkpoint

    groups = {"group_size": args.group_size, "attention_group_size": args.attention_group_size}
    if args.to != "int4" and any(value is not None for value in groups.values()):
        raise DiffGemmaError(f"--group-size and --attention-group-size are int4's; {args.to} scales each output")
    fmt = QuantFormat(args.to, **{key: value for key, value in groups.items() if value is not None})
    _check_output(args.destination, args.source)
    folder, device = resolve_folder(args.source), resolve_device(args.device)
    # a shard at a time: the model is never whole in memory, quantized or not
    held = quantize_checkpoint(folder, args.destination, fmt, load_dtype(args.dtype, device, folder), device)
    print(f"wrote {args.destination} ({fmt.describe()}, {size_text(held)} of weights)")


def _check_output(destination: str, source: str) -> None:
    """Before loading anything: a new checkpoint goes to a folder of its own, never over the one it is made from."""
    from .checkpoint import check_replaceable

    target = Path(destination).expanduser().absolute()
    if Path(source).expanduser().exists() and target.exists() and target.samefile(Path(source).expanduser()):
        raise DiffGemmaError(f"{destination}: is the checkpoint being read; write the new one to another folder")
    check_replaceable(target)


def cmd_lora_merge(args: argparse.Namespace) -> None:
    import torch

    from .api import load_dtype, resolve_folder
    from .train.lora import merge_adapter_files

    _check_output(args.out, _model_path(args))
    folder = resolve_folder(_model_path(args))
    merged = merge_adapter_files(folder, args.adapter, args.out, load_dtype(args.dtype, torch.device("cpu"), folder))
    print(f"merged {merged} adapters into {args.out}")


def cmd_serve(args: argparse.Namespace) -> None:
    from .server import ServerOptions, check_address, serve

    check_address(args.host, args.port)  # before the load, which may take minutes
    model = _load(args)
    options = ServerOptions(
        model_name=args.name or Path(_model_path(args)).name,
        api_key=args.api_key or os.environ.get("DIFFGEMMA_API_KEY"),
        max_prompt_tokens=args.max_prompt_tokens,
        max_tokens=args.max_tokens_limit,
        max_concurrent=args.max_concurrent,
        max_batch=args.max_batch,
        allowed_origins=tuple(args.allow_origin or ()),
        format_tries=args.format_tries,
    )
    serve(model, args.host, args.port, options)


DTYPE_CHOICES = {  # a command's default --dtype, and what it says of it
    "auto": "a bf16 checkpoint in bf16 where the device multiplies bf16 in hardware, else float32",
    "float32": "training keeps float32 weights; products run in bf16 under autocast where the device has it",
    "stored": "the checkpoint's own dtype",
}


def _add_template_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--chat-template", metavar="FILE", help="render chats with this jinja template, not the checkpoint's"
    )


def _add_model_options(
    parser: argparse.ArgumentParser,
    sampling: bool = True,
    inference: bool = True,
    dtype: str = "auto",
    prefix_cache: int = 1,
    device: bool = True,
) -> None:
    """--model, --device (unless `device` is False: a command that runs nothing there), --dtype (default `dtype`,
    one of DTYPE_CHOICES), --threads (`main` applies it); for a command that runs the model (`inference`,
    `_load`) --quant, --adapter, --compile and --prefix-cache (default `prefix_cache`); and with `sampling` the
    sampler's settings."""
    parser.add_argument("--model", help=f"checkpoint folder (default: ${MODEL_ENV})")
    if device:
        parser.add_argument("--device", default="auto", help="auto (a CUDA GPU if any, else the CPU), cpu, cuda:1, mps")
    others = ", ".join(name for name in ("auto", "stored", "float32", "bfloat16", "float16") if name != dtype)
    parser.add_argument("--dtype", default=dtype, help=f"{dtype} ({DTYPE_CHOICES[dtype]}), or {others}")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: one per core)")
    if inference:
        parser.add_argument("--quant", default=None, choices=FORMATS, help="quantize weights while loading")
        parser.add_argument(
            "--adapter",
            metavar="DIR",
            help="a LoRA adapter (train chat --lora-rank) on the model: folded in, or beside --quant weights",
        )
        parser.add_argument(
            "--compile", action="store_true", help="compile the decoder (torch.compile; pays off on a GPU)"
        )
        parser.add_argument(
            "--prefix-cache",
            type=_at_least(0),
            default=prefix_cache,
            metavar="N",
            help="encoder caches of the last N prompts to keep, so a prompt that begins with one (a chat's next "
            "turn) encodes only the rest; each costs a cache's memory; 0: none (default %(default)s)",
        )
    if not sampling:
        return
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--mode", default="fast", choices=["fast", "reference"])
    parser.add_argument("--max-new-tokens", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None, help="maximum denoising steps per canvas")
    parser.add_argument("--entropy-bound", type=float, default=None)
    parser.add_argument("--t-max", type=float, default=None, help="temperature on the first step")
    parser.add_argument("--t-min", type=float, default=None, help="temperature towards the last step")
    parser.add_argument("--stability", type=int, default=None, help="steps the draft must stay unchanged")
    parser.add_argument("--confidence", type=float, default=None, help="mean entropy under which a canvas stops")


def _add_stream_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--stream",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="print the text as it settles, each canvas's leading tokens fixed once stable (the server's way); "
        "--no-stream prints it whole at the end, the text the Python API's generate gives for the seed",
    )


def _add_stop_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--stop", action="append", default=None, metavar="TEXT", help="end the answer before TEXT (repeatable)"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="diffgemma", description="DiffusionGemma block text diffusion")
    parser.add_argument("--version", action="version", version=f"diffgemma {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)

    generate = commands.add_parser("generate", help="generate text after a prompt")
    generate.add_argument("prompt", nargs="?", help="the prompt, or - to read it from stdin")
    generate.add_argument(
        "--file", help='many prompts: one a line, or a .jsonl of {"prompt": ...}; JSONL out, {"prompt", "text", ...}'
    )
    generate.add_argument("--batch-size", type=_at_least(1), default=8, help="--file: prompts denoised together")
    generate.add_argument("--watch", action="store_true", help="show the canvas converge live")
    generate.add_argument("--stats", action="store_true", help="print tokens, steps and speed to stderr")
    _add_stream_option(generate)
    _add_stop_option(generate)
    _add_model_options(generate)
    generate.set_defaults(run=cmd_generate)

    score = commands.add_parser("score", help="how likely the model finds a text: log-likelihood, perplexity")
    score.add_argument("text", nargs="?", help="the text, or - to read it from stdin")
    score.add_argument("--file", help="score this file's text")
    score.add_argument("--tokens", action="store_true", help="also each token's log-probability")
    score.add_argument("--json", action="store_true", help="one JSON record (with --tokens, each token's too)")
    _add_model_options(score, sampling=False)
    score.set_defaults(run=cmd_score)

    chat = commands.add_parser(
        "chat", help="an interactive chat (/reset, /think on|off, /exit), one message, or --file of conversations"
    )
    chat.add_argument("message", nargs="?", help="answer this one message and exit (default: a conversation)")
    chat.add_argument("--system", help="a system prompt, kept across /reset")
    _add_stream_option(chat)
    chat.add_argument("--think", action="store_true", help="start with thinking on")
    chat.add_argument("--watch", action="store_true", help="show each answer's canvas converge")
    chat.add_argument(
        "--tools",
        metavar="FILE.py",
        help="a Python file whose functions the model may call (run here; answers print whole)",
    )
    chat.add_argument(
        "--file",
        help='many conversations: a .jsonl of {"messages": [...]}, each answered once; JSONL out',
    )
    chat.add_argument("--batch-size", type=_at_least(1), default=8, help="--file: conversations denoised together")
    chat.add_argument("--stats", action="store_true", help="--file: print tokens and speed to stderr")
    _add_stop_option(chat)
    _add_template_option(chat)
    _add_model_options(chat)
    chat.set_defaults(run=cmd_chat)

    infill = commands.add_parser("infill", help="fill the middle between a prefix and a suffix")
    infill.add_argument("--prefix", required=True)
    infill.add_argument("--suffix", required=True)
    infill.add_argument("--length", type=int, default=32, help="tokens to fill")
    _add_model_options(infill)
    infill.set_defaults(run=cmd_infill)

    edit = commands.add_parser("edit", help="regenerate some lines of a file in place")
    edit.add_argument("file")
    edit.add_argument("--lines", required=True, help="A:B, 1-based and inclusive")
    edit.add_argument("--length", type=int, default=None, help="tokens for the new lines (default: as many as before)")
    edit.add_argument("--write", action="store_true", help="write the file (atomically) instead of printing")
    edit.add_argument("--no-backup", action="store_true", help="with --write, keep no FILE.bak")
    _add_model_options(edit)
    edit.set_defaults(run=cmd_edit)

    serve = commands.add_parser("serve", help="an OpenAI-compatible server with a playground page")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=_at_least(0, 65535), default=8000)
    serve.add_argument("--name", default=None, help="model id the API reports")
    serve.add_argument("--api-key", default=None, help="require this Bearer key (or set DIFFGEMMA_API_KEY)")
    serve.add_argument("--max-prompt-tokens", type=_at_least(1), default=8192)
    serve.add_argument("--max-tokens-limit", type=_at_least(1), default=4096)
    serve.add_argument("--max-concurrent", type=_at_least(1), default=16)
    serve.add_argument("--max-batch", type=_at_least(1), default=8)
    serve.add_argument(
        "--format-tries",
        type=_at_least(1),
        default=DEFAULT_TRIES,
        help="draws of an answer asked for in a form (response_format: JSON; vLLM's structured outputs) that does "
        "not read, before a 422 (default %(default)s)",
    )
    serve.add_argument(
        "--allow-origin",
        action="append",
        metavar="ORIGIN",
        help="let web pages from ORIGIN (e.g. http://localhost:3000, or *) call the API from a browser (repeatable)",
    )
    _add_template_option(serve)
    # a chat client's side requests (a title, follow-ups) come between a conversation's turns: two kept
    _add_model_options(serve, sampling=False, prefix_cache=2)
    serve.set_defaults(run=cmd_serve)

    sudoku = commands.add_parser("sudoku", help="solve a sudoku (a fresh one, or --puzzle) and watch it converge")
    sudoku.add_argument("--puzzle", default=None, help="81 cells (0 . _ or * empty), in a line or drawn as a grid")
    sudoku.add_argument(
        "--givens",
        type=int,
        default=36,
        help="givens of a fresh puzzle (fewer is harder; 20 at least, below 22 seconds to make)",
    )
    _add_tries_option(sudoku)
    _add_candidates_option(sudoku)
    _add_model_options(sudoku)
    sudoku.set_defaults(run=cmd_sudoku)

    puzzles = commands.add_parser("sudoku-puzzles", help="print fresh unique-solution puzzles, one a line")
    puzzles.add_argument("count", type=_at_least(1))
    puzzles.add_argument(
        "--givens", default="24:36", help="a number or a range A:B (20 at least; below 22, seconds a puzzle)"
    )
    puzzles.add_argument("--seed", type=int, default=0)
    puzzles.set_defaults(run=cmd_sudoku_puzzles)

    evaluate = commands.add_parser("eval", help="evaluate a task: `eval sudoku --puzzles FILE`")
    evaluate.add_argument("task", choices=["sudoku"])
    evaluate.add_argument(
        "--puzzles", required=True, help="one puzzle a line (81 cells; 0 . _ or * empty; CSV puzzle,solution lines too)"
    )
    evaluate.add_argument("--json", action="store_true", help="print one JSON object")
    _add_tries_option(evaluate)
    _add_candidates_option(evaluate)
    _add_model_options(evaluate)
    evaluate.set_defaults(run=cmd_eval_sudoku)

    trainer = commands.add_parser(
        "train", help="train: `train sudoku --out DIR`, or fine-tune on chat JSONL: `train chat --data F --out DIR`"
    )
    trainer.add_argument("task", choices=["sudoku", "chat"])
    trainer.add_argument("--out", required=True, help="folder for the model (or adapter) and the trainer state")
    trainer.add_argument("--steps", type=_at_least(1), default=None, help="optimizer steps (sudoku 20000, chat 1000)")
    trainer.add_argument("--batch-size", type=_at_least(1), default=None, help="examples a step (sudoku 64, chat 8)")
    trainer.add_argument("--lr", type=float, default=None, help="peak learning rate (sudoku 2e-3, chat 1e-4)")
    trainer.add_argument(
        "--ar-weight", type=float, default=None, help="weight of the encoder's next-token term (sudoku 0, chat 1)"
    )
    trainer.add_argument(
        "--eval-every",
        type=int,
        default=None,
        help="steps between checkpoints and evaluations (sudoku 500, chat 100; 0: only the final checkpoint)",
    )
    trainer.add_argument("--seed", type=int, default=0)
    trainer.add_argument("--resume", action="store_true", help="continue the run saved in --out")
    trainer.add_argument("--init", default=None, help="sudoku: start from this checkpoint's weights (a new stage)")
    trainer.add_argument(
        "--objective",
        choices=["diffusion", "autoregressive"],
        default="diffusion",
        help="sudoku: autoregressive trains the same network left to right (the baseline)",
    )
    trainer.add_argument(
        "--layers",
        type=int,
        default=None,
        help="sudoku: the network's depth (6); with --init, more than the init's repeats its layers, off at first",
    )
    trainer.add_argument(
        "--candidate-prior",
        action="store_true",
        help="sudoku: the first self-conditioning input is the puzzle's candidates (givens certain); kept by the model",
    )
    trainer.add_argument(
        "--masked-cells",
        action="store_true",
        help="sudoku: a corrupted cell shows empty instead of a random digit (solving re-noises to empty); kept",
    )
    trainer.add_argument(
        "--draft-temperature",
        default=None,
        help="sudoku: the detached drafts' temperature, a range A:B drawn per example (the sampler's is 0.8 -> 0.4)",
    )
    trainer.add_argument("--pool", type=_at_least(1), default=4000, help="sudoku: unique puzzles in the training pool")
    trainer.add_argument("--givens", default="24:36", help="sudoku: givens of the pool's puzzles, a number or A:B")
    trainer.add_argument(
        "--eval-puzzles", type=_at_least(1), default=64, help="sudoku: held-out puzzles scored at checkpoints"
    )
    trainer.add_argument(
        "--seconds", type=float, default=None, help="sudoku: a time budget; the first steps are timed to size the run"
    )
    trainer.add_argument(
        "--pool-workers", type=_at_least(1), default=1, help="sudoku: processes that make the puzzle pool"
    )
    trainer.add_argument("--pool-file", default=None, help="sudoku: cache of the puzzle pool (read, or written)")
    trainer.add_argument(
        "--self-conditioning-passes",
        type=int,
        default=1,
        help="sudoku: each batch runs 1 to this many detached passes, each feeding the next, before the scored one",
    )
    trainer.add_argument(
        "--data",
        help='chat: training data, JSONL: {"messages": [...]}, {"prompt": ..., "completion": ...} or {"text": ...}',
    )
    trainer.add_argument("--eval-data", help="chat: held-out conversations (default: a twentieth of --data)")
    trainer.add_argument(
        "--lora-rank", type=_at_least(0), default=0, help="chat: train LoRA adapters of this rank (0: full)"
    )
    trainer.add_argument(
        "--quant",
        default=None,
        choices=FORMATS,
        help="chat, with --lora-rank: quantize the frozen base while loading (QLoRA: the 26B in int4 fits 18 GB)",
    )
    trainer.add_argument("--lora-alpha", type=float, default=32.0)
    trainer.add_argument("--lora-self-conditioning", action="store_true", help="chat: adapt that block too")
    trainer.add_argument("--accumulation", type=_at_least(1), default=1, help="chat: micro-batches per optimizer step")
    trainer.add_argument("--thinking", action="store_true", help="chat: render prompts with thinking enabled")
    trainer.add_argument(
        "--max-length",
        type=_at_least(1),
        help="chat: leave out examples over this many tokens (the prompt and the response in whole canvases)",
    )
    _add_template_option(trainer)
    trainer.add_argument(
        "--gradient-checkpointing",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="chat: keep each layer's inputs for the backward pass and run the rest again there (a fraction of "
        "the activations for about a third more compute)",
    )
    _add_model_options(trainer, sampling=False, inference=False, dtype="float32")
    trainer.set_defaults(run=cmd_train)

    quantize = commands.add_parser("quantize", help="write a weight-quantized copy of a checkpoint (atomic)")
    quantize.add_argument("source", help="checkpoint folder")
    quantize.add_argument("destination", help="folder for the quantized checkpoint")
    quantize.add_argument("--to", required=True, choices=FORMATS)
    quantize.add_argument("--group-size", type=int, default=None, help="int4: weights sharing one scale (64)")
    quantize.add_argument(
        "--attention-group-size",
        type=int,
        default=None,
        help="int4: the same for attention's projections (16: finer scales where int4 hurts most)",
    )
    quantize.add_argument("--device", default="cpu", help="where to quantize (a GPU is much quicker)")
    quantize.add_argument("--dtype", default="bfloat16", help="dtype of what stays unquantized")
    quantize.set_defaults(run=cmd_quantize)

    lora = commands.add_parser("lora-merge", help="fold a LoRA adapter into its base model: a new full checkpoint")
    lora.add_argument("--adapter", required=True, help="adapter folder (PEFT layout)")
    lora.add_argument("--out", required=True, help="folder for the merged checkpoint")
    _add_model_options(lora, sampling=False, inference=False, dtype="stored", device=False)  # a shard at a time
    lora.set_defaults(run=cmd_lora_merge)

    info = commands.add_parser("info", help="summarise a checkpoint: shape, parameters, memory, sampler")
    info.add_argument("--model", help=f"checkpoint folder (default: ${MODEL_ENV})")
    info.add_argument("--context", type=int, default=4096, help="tokens of context for the memory estimate")
    info.add_argument("--batch", type=_at_least(1), default=1, help="rows for the memory estimate")
    info.set_defaults(run=cmd_info)

    random = commands.add_parser("random-checkpoint", help="write a random-weight checkpoint of a named shape")
    random.add_argument("folder")
    random.add_argument("--preset", default="tiny", help="tiny, bench-90m or 26b-a4b")
    random.add_argument("--seed", type=int, default=0)
    random.add_argument("--dtype", default="float32")
    random.set_defaults(run=cmd_random_checkpoint)
    return parser


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """A warning as one line for a person at a terminal, not a source location."""
    print(f"diffgemma: warning: {message}", file=file or sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning
            _set_threads(args)
            if getattr(args, "device", None) == "auto":
                from .api import resolve_device

                args.device = str(resolve_device("auto"))
            args.run(args)
    except DiffGemmaError as err:
        print(f"diffgemma: {err}", file=sys.stderr)
        return 2
    except (MemoryError, RuntimeError) as err:
        if not out_of_memory(err):
            raise
        print(
            f"diffgemma: out of memory ({first_line(err)}). `diffgemma info --model PATH --context N --batch B` "
            "gives what a load and a denoising step take; fewer rows (--batch-size), fewer tokens (training: "
            "--max-length) or --quant int4 take less",
            file=sys.stderr,
        )
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # the reader went away (`| head`): stop quietly, as other command-line tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # (Python's own flush at exit would fail)
        return 141
    return 0


if __name__ == "__main__":
    sys.exit(main())
