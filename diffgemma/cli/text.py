"""Commands that run the model on text: `generate`, `score`, `embed`, `chat` (with tools, or a file of
conversations), `infill`, `edit` and `serve`; the canvas watched live or the answer printed as it settles."""

from __future__ import annotations

import argparse
import codecs
import contextlib
import json
import os
import re
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..config import SAMPLER_FIELDS, as_path, read_json_value, read_text
from ..errors import DiffGemmaError
from ..records import RECORD_SUFFIXES, read_records, sharegpt_messages
from ..tool_servers import ToolServers
from ..toolcalls import check_tools, run_tool_calls
from .common import SAMPLER_OPTIONS, load_model, model_path, read_prompt, sampler_options
from .progress import ProgressNote, terminal_note

MAX_TOOL_ROUNDS = 16  # `chat --tools`: rounds of calls before the model is made to answer


def _watch(model, prompt: Any, args: argparse.Namespace, sampler: dict[str, Any], **extra: Any):
    """Run a generation, showing the canvas converge in place; returns the result."""
    from rich.console import Console
    from rich.live import Live
    from rich.panel import Panel
    from rich.text import Text

    from ..generate import Done, Draft

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
    its own, then `lead` and the answer. On a terminal a note after the text says how far the denoising is
    (`progress.ProgressNote`: a large model on a CPU takes minutes to a canvas). Returns (the result, the answer,
    the thinking)."""
    from ..generate import CanvasCommit, Done, Draft

    text = model.settled_text(chat, args.stop or ())
    limit = sampler.get("max_new_tokens", model.settings.max_new_tokens)
    started = {"reasoning": False, "content": False}
    note = _note(model, sampler)

    def show(content: str, reasoning: str, final: bool = False) -> None:
        if reasoning:
            note.write(("" if started["reasoning"] else "[thinking] ") + reasoning)
            started["reasoning"] = True
        if (content or final) and not started["content"]:  # (an empty answer still gets its line)
            note.write(("\n" if started["reasoning"] else "") + lead)
            started["content"] = True
        note.write(content + ("\n" if final else ""))

    committed: list[int] = []
    result = None
    with note:
        for event in model.stream(
            prompt, seed=args.seed, mode=args.mode, commit_stable_prefix=True, stop=text.stops, **sampler, **extra
        ):
            if isinstance(event, Draft) and event.settled is not None:
                note.step(event)
                show(*text.deltas((committed + event.ids[0, : int(event.settled[0])].tolist())[:limit]))
            elif isinstance(event, CanvasCommit):
                committed += event.ids[0].tolist()
            elif isinstance(event, Done):
                result = event.result
    show(*text.deltas(result.new_tokens[0], final=True), final=True)
    content, reasoning = text.parts(result.new_tokens[0])
    return result, content, reasoning


def _generated(model, prompt: Any, args: argparse.Namespace, sampler: dict[str, Any], **extra: Any):
    """`model.generate`'s result; on a terminal, with a transient note on stderr saying how far the denoising is
    while it runs (nothing else shows until it ends: minutes, with a large model on a CPU)."""
    with _note(model, sampler) as note:
        return model.generate(prompt, seed=args.seed, mode=args.mode, progress=note.step, **sampler, **extra)


def _note(model, sampler: dict[str, Any]) -> ProgressNote:
    """The terminal's progress note for a generation with these sampler settings (`progress.terminal_note`; a
    batch's rows may each have their own steps: the most)."""
    steps = sampler.get("max_denoising_steps", model.settings.max_denoising_steps)
    return terminal_note(max(steps) if isinstance(steps, list | tuple) else steps)


def _file_records(path: str) -> list[tuple[str, object]] | None:
    """A --file's records, each with where it is (a .jsonl file, a .json array, a .parquet file's rows), read
    once for the prompts and the records' own settings; None for a text file (a prompt a line)."""
    return list(read_records(path)) if Path(path).suffix.lower() in RECORD_SUFFIXES else None


def _file_prompts(path: str, records: list[tuple[str, object]] | None, key: str = "prompt") -> list[str]:
    """Prompts (texts) from a file: its {key: ...} records, else one a line (blank lines skipped)."""
    if records is None:
        return [line for line in read_text(path).splitlines() if line.strip()]
    prompts = []
    for where, record in records:
        if not isinstance(record, dict) or not isinstance(record.get(key), str):
            raise DiffGemmaError(f'{where}: expected an object with a "{key}" text')
        prompts.append(record[key])
    return prompts


def _record_settings(model, records: list[tuple[str, object]] | None) -> list[dict[str, Any]]:
    """Each --file record's own settings, over the options' ("seed", "max_new_tokens" and the sampler's: a sweep
    in one file), checked as the model's settings check them; none for a text file's lines."""
    owned = []
    for where, record in records or []:
        own = {key: record[key] for key in ("seed", "max_new_tokens", *SAMPLER_FIELDS) if key in record}
        try:
            if "seed" in own and (not isinstance(own["seed"], int) or isinstance(own["seed"], bool)):
                raise DiffGemmaError(f"`seed` must be a whole number, got {own['seed']!r}")
            model.settings.replace(**{key: value for key, value in own.items() if key != "seed"})
        except DiffGemmaError as err:
            raise DiffGemmaError(f"{where}: {err}") from None
        owned.append(own)
    return owned


def _file_conversations(
    model, path: str, records: list[tuple[str, object]] | None, system: str | None, thinking: bool
) -> list[tuple[list, list[int], list[Any]]]:
    """`chat --file`'s conversations, {"messages": [...]} records (or ShareGPT's {"conversations": [...]}) in a
    .jsonl file, a .json array or a .parquet file, each with its prompt ids (rendered as `chat` renders one;
    `system` first where it has no system message) and the pictures of its image parts; errors name the line."""
    if records is None:
        raise DiffGemmaError(f'{path}: chat --file reads a .jsonl (or .json, .parquet) file of {{"messages": [...]}}')
    conversations = []
    for where, record in records:
        try:
            conversations.append(_file_conversation(model, record, system, thinking))
        except DiffGemmaError as err:
            raise DiffGemmaError(f"{where}: {err}") from None
    if not conversations:
        raise DiffGemmaError(f"{path}: no conversations")
    return conversations


def _file_conversation(model, record: object, system: str | None, thinking: bool) -> tuple[list, list[int], list[Any]]:
    """One `chat --file` record's (messages, prompt ids with one image id a picture, pictures)."""
    from ..images import split_images  # (not at the top: the command line answers --help without torch)

    messages = record.get("messages") if isinstance(record, dict) else None
    if isinstance(record, dict) and "conversations" in record:
        messages = sharegpt_messages(record["conversations"])
    if not isinstance(messages, list):
        raise DiffGemmaError('expected an object with "messages": [...]')
    has_system = bool(messages) and isinstance(messages[0], dict) and messages[0].get("role") == "system"
    told = [{"role": "system", "content": system}, *messages] if system and not has_system else messages
    told, pictures = split_images(told)
    return messages, model.tokenizer.encode_chat(told, thinking), pictures


def _run_file(
    model,
    args: argparse.Namespace,
    sampler: dict[str, Any],
    prompts: list,
    records: list[tuple[str, object]] | None,
    stop: Any,
    record: Callable[[int, Any, int], dict[str, Any]],
    pictures: list[list[Any]] | None = None,
) -> None:
    """`--file`'s prompts (texts or ids; `pictures`: each one's), `--batch-size` rows at a time (prompt i seeded
    seed + i, or its record's own; a record's own settings are its row's: `_record_settings`), as JSONL on stdout
    in the file's order: `record(i, result, row)` for prompt i, row `row` of its batch's result; `records`: the
    file's (None for a text file)."""
    import json

    if not prompts:
        raise DiffGemmaError(f"{args.file}: no prompts")
    owned = _record_settings(model, records) or [{} for _ in prompts]
    size = 1 if args.mode == "reference" else args.batch_size  # (reference mode draws one stream for a batch)
    tokens, seconds = 0, 0.0
    for start in range(0, len(prompts), size):
        rows = prompts[start : start + size]
        own = owned[start : start + size]
        seeds = [row.get("seed", None if args.seed is None else args.seed + start + i) for i, row in enumerate(own)]
        seeds = None if all(seed is None for seed in seeds) else seeds
        seed = seeds[0] if seeds is not None and args.mode == "reference" else seeds
        shown = pictures[start : start + size] if pictures is not None and any(pictures) else None
        asked = dict(sampler)
        for key in {key for row in own for key in row} - {"seed"}:  # (a setting the rows differ in: one a row)
            values = [row.get(key, sampler.get(key, getattr(model.settings, key))) for row in own]
            asked[key] = values[0] if len(set(values)) == 1 else values
        with _note(model, asked) as note:
            result = model.generate(
                rows, seed=seed, mode=args.mode, stop=stop, images=shown, progress=note.step, **asked
            )
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
    records = _file_records(args.file)
    prompts = _file_prompts(args.file, records)

    def record(index: int, result, row: int) -> dict[str, Any]:
        return {"prompt": prompts[index], "text": result.text[row], "finish_reason": _finish_reason(result, row)}

    _run_file(model, args, sampler, prompts, records, args.stop, record)


def _chat_file(model, args: argparse.Namespace, sampler: dict[str, Any]) -> None:
    """`chat --file`: each conversation's next answer, {"messages", "text", "reasoning" (when it thought),
    "finish_reason"} a conversation."""
    reply = model.settled_text(True, args.stop or ())  # (first: a checkpoint without a tokenizer is told here)
    records = _file_records(args.file)
    conversations = _file_conversations(model, args.file, records, args.system, args.think)
    if args.think and args.thinking_budget is not None:
        sampler = {**sampler, "thinking_budget": args.thinking_budget}

    def record(index: int, result, row: int) -> dict[str, Any]:
        content, reasoning = reply.parts(result.new_tokens[row])
        answered = {"messages": conversations[index][0], "text": content}
        return {
            **answered,
            **({"reasoning": reasoning} if reasoning else {}),
            "finish_reason": _finish_reason(result, row),
        }

    prompts, pictures = [ids for _, ids, _ in conversations], [shown for _, _, shown in conversations]
    _run_file(model, args, sampler, prompts, records, reply.stops, record, pictures)


def cmd_generate(args: argparse.Namespace) -> None:
    if (args.prompt is None) == (args.file is None):
        raise DiffGemmaError("give a prompt (or - for stdin), or --file with one prompt a line")
    if args.file is not None and (args.watch or args.image or args.prediction):
        raise DiffGemmaError("--watch, --image and --prediction go with one prompt; --file runs many")
    _check_image_files(args.image)
    predicted = {"prediction": read_text(args.prediction)} if args.prediction else {}
    model = load_model(args)
    sampler = {**sampler_options(args), **predicted}
    if args.file is not None:
        _generate_file(model, args, sampler)
        return
    prompt = read_prompt(args.prompt)
    pictures = {"images": args.image} if args.image else {}
    if args.watch:
        result = _watch(model, prompt, args, sampler, stop=args.stop, **pictures)
        print(result.text)
    elif args.stream:
        result = _print_as_it_settles(model, prompt, args, sampler, chat=False, **pictures)[0]
    else:
        result = _generated(model, prompt, args, sampler, stop=args.stop, **pictures)
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
    text = read_text(args.file) if args.file else read_prompt(args.text)
    model = load_model(args)
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


def cmd_embed(args: argparse.Namespace) -> None:
    """Each text's vector (`DiffGemma.embed`) as a JSONL record {"text", "embedding"} in order, `--batch-size`
    texts at a time; or, with --similarity, the texts' cosine similarities as a table."""
    import json

    import torch

    if bool(args.texts) == (args.file is not None):
        raise DiffGemmaError("give texts (- reads one from stdin), or --file with one text a line")
    texts = (
        _file_prompts(args.file, _file_records(args.file), "text")
        if args.file
        else [read_prompt(text) for text in args.texts]
    )
    if not texts:
        raise DiffGemmaError(f"{args.file}: no texts")
    if args.similarity and (len(texts) < 2 or args.no_normalize):
        raise DiffGemmaError("--similarity compares two texts or more, at unit length (not with --no-normalize)")
    model = load_model(args)
    vectors = []
    for start in range(0, len(texts), args.batch_size):
        batch = texts[start : start + args.batch_size]
        embedded = model.embed(batch, normalize=not args.no_normalize, dimensions=args.dimensions)
        if args.similarity:
            vectors.append(embedded)
            continue
        for text, vector in zip(batch, embedded.tolist(), strict=True):
            print(json.dumps({"text": text, "embedding": vector}, ensure_ascii=False), flush=True)
    if args.similarity:
        stacked = torch.cat(vectors)
        similarity = (stacked @ stacked.T).tolist()
        width = len(str(len(texts)))
        print(" " * width + "".join(f"{i + 1:>8}" for i in range(len(texts))))
        for i, (row, text) in enumerate(zip(similarity, texts, strict=True)):
            print(f"{i + 1:>{width}}" + "".join(f"{value:8.3f}" for value in row) + f"   {text[:60]!r}")


def _say_if_cut(result) -> None:
    """A text cut at the token limit (no EOS before it) says so on stderr, rather than ending as if finished."""
    if result.reached_limit[0]:
        limit = len(result.new_tokens[0])
        print(f"[cut at the {limit}-token limit; --max-new-tokens sets it]", file=sys.stderr, flush=True)


def _check_image_files(paths: list[str]) -> None:
    """Pictures named on the command line exist (told before the model loads)."""
    for path in paths:
        if not Path(path).is_file():
            raise DiffGemmaError(f"{path}: image file not found")


def _with_pictures(text: str, pictures: list[str]) -> str | list[dict[str, Any]]:
    """A user message's content: its text, after its pictures' image parts if it has any."""
    if not pictures:
        return text
    return [*({"type": "image", "image": path} for path in pictures), {"type": "text", "text": text}]


def cmd_chat(args: argparse.Namespace) -> None:
    if args.file is not None and (args.message is not None or args.tools or args.mcp or args.watch or args.image):
        raise DiffGemmaError(
            "--file answers many conversations, each once: not with a message, tools, --watch or --image"
        )
    if args.prediction and (args.file is not None or args.tools or args.mcp):
        raise DiffGemmaError("--prediction is one answer's expected text: not with --file, --tools or --mcp")
    _check_image_files(args.image)
    if args.stats and args.file is None:
        raise DiffGemmaError("--stats sums up a --file run")
    functions = _tool_functions(args.tools) if args.tools else []  # (a bad file is told before the model loads)
    with ToolServers(args.mcp) as servers:  # (and a server that does not start)
        served = {tool.__name__ for tool in servers.tools} & {function.__name__ for function in functions}
        if served:
            raise DiffGemmaError(f"--tools and --mcp both offer a tool named {sorted(served)[0]!r}")
        _chat(args, functions + servers.tools)


def _chat(args: argparse.Namespace, functions: list[Callable[..., Any]]) -> None:
    if args.system_file is not None:  # (read before the model loads: a wrong path is said at once)
        args.system = read_text(args.system_file).strip()
    model = load_model(args)
    sampler = sampler_options(args)
    # Answers run to EOS; the checkpoint's max_new_tokens (the reference's 256: one canvas) would cut most.
    sampler.setdefault("max_new_tokens", model.chat_limit())
    if args.file is not None:
        _chat_file(model, args, sampler)
        return
    opening = [{"role": "system", "content": args.system}] if args.system else []
    history: list[dict[str, Any]] = list(opening)
    thinking, thought_budget = args.think, args.thinking_budget
    terminal = sys.stdin.isatty()
    interactive = terminal and args.message is None
    pictures = list(args.image)  # shown with the next message
    predicted = [read_text(args.prediction)] if args.prediction else []  # the first answer's

    def answer(content: str | list[dict[str, Any]]) -> None:
        history.append({"role": "user", "content": content})
        budget = {"thinking_budget": thought_budget} if thinking and thought_budget is not None else {}
        asked = {**sampler, **budget, **({"prediction": predicted.pop()} if predicted else {})}
        if args.stream and not functions and not (args.watch and terminal):
            lead = "model> " if interactive else ""
            result, content, _ = _print_as_it_settles(
                model, history, args, asked, chat=True, lead=lead, enable_thinking=thinking
            )
        else:
            if functions:  # an agent: each call the model makes is run, its result told to it, until it answers
                settings = {"seed": args.seed, "mode": args.mode, "stop": args.stop, **sampler, **budget}
                reply = _agent_turn(model, history, functions, thinking, settings)
                result, content, reasoning = reply.result, reply.content, reply.reasoning
            else:
                text = model.settled_text(True, args.stop or ())
                if args.watch and terminal:
                    result = _watch(model, history, args, asked, enable_thinking=thinking, stop=text.stops)
                else:
                    result = _generated(model, history, args, asked, enable_thinking=thinking, stop=text.stops)
                content, reasoning = text.parts(result.new_tokens[0])
            if reasoning:
                print(f"[thinking] {reasoning}")
            print(f"model> {content}" if interactive else content)
        _say_if_cut(result)
        history.append({"role": "assistant", "content": content})

    if args.message is not None:  # one question, one answer
        answer(_with_pictures(args.message, pictures))
        return
    if interactive:
        with contextlib.suppress(ImportError):  # line editing and history for input(), where the platform has it
            import readline  # noqa: F401

        listing = ", /tools lists the tools" if functions else ""
        listing += ", /image FILE shows a picture" if model.config.vision is not None else ""
        print(
            "chat with the model; /reset clears the history, /retry answers again, /save FILE and /load FILE keep "
            f"it, /think on|off|N, /set NAME VALUE a sampler setting{listing}, /exit quits; a line ending in "
            '\\ goes on to the next, and text between """ lines (pasted code, say) is one message',
            file=sys.stderr,
        )
    while True:
        line = _read_message("you> " if interactive else "")
        if line is None:
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
        if line == "/tools":
            for tool in check_tools(functions):
                print(f"{tool['function']['name']}: {tool['function'].get('description') or '(no description)'}")
            if not functions:
                print("(no tools: --tools FILE.py or --mcp offers some)")
            continue
        if line.startswith("/think"):
            words = line.split()
            asked = words[1] if len(words) > 1 else ("off" if thinking else "on")  # (alone: the other way)
            if asked not in ("on", "off") and not asked.isdigit():
                print("(/think on, /think off, or /think N: on, at most N tokens of thought)")
                continue
            if asked.isdigit():
                thought_budget = int(asked)
            thinking = asked != "off"
            within = f", at most {thought_budget} tokens of thought" if thinking and thought_budget is not None else ""
            print(f"(thinking {'on' if thinking else 'off'}{within})")
            continue
        if line.split()[0] in ("/save", "/load"):
            _save_or_load(line, model, history, opening, thinking)
            continue
        if line.split()[0] == "/set":
            _set_sampler(line, model, sampler)
            continue
        if line.startswith("/image"):
            path = line[len("/image") :].strip()
            if not Path(path).is_file():
                print(f"(no image file {path!r}: /image FILE)")
                continue
            pictures.append(path)
            print(f"(image {path} goes with your next message)")
            continue
        if line == "/retry":  # the last question again, drawn anew
            asked_at = max((i for i, m in enumerate(history) if m["role"] == "user"), default=len(opening) - 1)
            if asked_at < len(opening):
                print("(nothing to answer again yet)")
                continue
            content = history[asked_at]["content"]
            del history[asked_at:]
            if args.seed is not None:  # (the same seed would draw the same answer)
                args.seed += 1
        else:
            content = _with_pictures(line, pictures)
            pictures.clear()
        turns = len(history)
        try:
            answer(content)
        except KeyboardInterrupt:  # Ctrl-C stops the answer, not the chat (at the prompt it quits)
            if not interactive:
                raise
            del history[turns:]  # the question goes with its unfinished answer
            print("\n(interrupted)")


def _set_sampler(line: str, model, sampler: dict[str, Any]) -> None:
    """`/set NAME VALUE`: a sampler setting for the answers to come (NAME as its option is spelled, `t-max`, or as
    its field, `t_max`); `/set NAME default`: the model's again; `/set` alone: the settings in effect. What is
    wrong is said, and the chat goes on with the settings it had."""
    names = {"max-new-tokens": "max_new_tokens", "max_new_tokens": "max_new_tokens"}
    names |= {option.replace("_", "-"): field for option, field in SAMPLER_OPTIONS.items()}
    names |= {field: field for field in SAMPLER_FIELDS}
    words = line.split()[1:]
    if not words:
        settings = model.settings.replace(**sampler)
        print(
            "("
            + ", ".join(f"{field} {getattr(settings, field)}" for field in (*SAMPLER_FIELDS, "max_new_tokens"))
            + ")"
        )
        return
    if len(words) != 2 or words[0] not in names:
        listed = ", ".join(sorted(name for name in names if "_" not in name))
        print(f"(/set NAME VALUE or /set NAME default, NAME one of {listed}; /set alone lists them)")
        return
    field, value = names[words[0]], words[1]
    changed = {key: given for key, given in sampler.items() if key != field}
    if value == "default" and field == "max_new_tokens":
        changed[field] = model.chat_limit()  # (a chat's own default: its answers run to their EOS)
    elif value != "default":
        try:
            changed[field] = int(value) if type(getattr(model.settings, field)) is int else float(value)
        except ValueError:
            print(f"({words[0]} takes a number, got {value!r})")
            return
    try:
        settings = model.settings.replace(**changed)
    except DiffGemmaError as err:
        print(f"({err})")
        return
    sampler.clear()
    sampler.update(changed)
    print(f"({field} {getattr(settings, field)})")


def _save_or_load(
    line: str, model, history: list[dict[str, Any]], opening: list[dict[str, Any]], thinking: bool
) -> None:
    """`/save FILE`: the conversation so far as JSON, {"messages": [...]} (what `chat --file` and `train chat`
    read a record as), written atomically; `/load FILE`: a conversation saved so (or any such record) in place of
    this one, to go on from (`--system`'s prompt first where it has none); what fails is said, the chat goes on."""
    command, _, path = line.partition(" ")
    path = path.strip()
    if not path:
        print(f'({command} FILE: the conversation as JSON, {{"messages": [...]}})')
        return
    if command == "/save":
        saved = json.dumps({"messages": history}, ensure_ascii=False, indent=1, default=str)
        try:
            write_atomically(Path(path), saved, backup=False)
        except OSError as err:
            print(f"(cannot write {path}: {err.strerror or err})")
            return
        print(f"(saved {len(history)} messages to {path})")
        return
    try:
        messages = _file_conversation(model, read_json_value(path), None, thinking)[0]
    except DiffGemmaError as err:
        print(f"({err})")
        return
    has_system = bool(messages) and messages[0].get("role") == "system"
    history[:] = [*([] if has_system else opening), *messages]
    print(f"(loaded {len(messages)} messages from {path})")


BLOCK = '"""'  # a message of several lines opens and closes with it (pasted code, say)


def _read_message(prompt: str) -> str | None:
    """One message from the terminal or a pipe (None: the input has ended): a line; lines ending in a backslash
    and the line after them; or the lines between a line that begins with \"\"\" and one that ends with it."""
    try:
        line = input(prompt)
    except EOFError:
        return None
    more = "... " if prompt else ""  # (a terminal's prompt for the lines that follow)
    lines: list[str] = []
    try:
        if line.lstrip().startswith(BLOCK):
            line = line.lstrip()[len(BLOCK) :]
            while not line.rstrip().endswith(BLOCK):
                lines.append(line)
                line = input(more)
            lines.append(line.rstrip()[: -len(BLOCK)])
        else:
            while line.endswith("\\"):
                lines.append(line[:-1])
                line = input(more)
            lines.append(line)
    except EOFError:  # the input ended inside the message: what came is the message
        pass
    return "\n".join(lines).strip("\n")


def _agent_turn(model, history: list[dict[str, Any]], functions: list[Callable[..., Any]], thinking: bool, settings):
    """One answer with tools: each round's calls run and shown, their results added to `history` for the model,
    until it answers; after MAX_TOOL_ROUNDS of calls it is made to answer without them. Returns its reply."""
    for _ in range(MAX_TOOL_ROUNDS):
        with _note(model, settings) as note:
            reply = model.chat(history, thinking, tools=functions, progress=note.step, **settings)
        if not reply.tool_calls:
            return reply
        turn = run_tool_calls(reply.tool_calls, functions, reply.content)
        for call, result in zip(reply.tool_calls, turn[1:], strict=True):
            shown = ", ".join(f"{key}={value!r}" for key, value in call.arguments.items())
            print(f"[tool] {call.name}({shown}) -> {result['content']}")
        history.extend(turn)
    print(f"[{MAX_TOOL_ROUNDS} rounds of tool calls; answering without tools]", file=sys.stderr)
    with _note(model, settings) as note:
        return model.chat(history, thinking, tools=functions, tool_choice="none", progress=note.step, **settings)


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
    model = load_model(args)
    sampler = sampler_options(args)
    with _note(model, sampler) as note:
        result = model.infill(
            args.prefix, args.suffix, args.length, seed=args.seed, mode=args.mode, progress=note.step, **sampler
        )
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
    if args.instruction is not None:
        _rewrite(path, mark, text, args)
        return
    lines = re.findall(r"[^\n]*\n|[^\n]+\Z", text)
    first, last = _lines(args.lines, len(lines))
    start = sum(len(line) for line in lines[: first - 1])
    end = start + sum(len(line) for line in lines[first - 1 : last])
    end -= 2 if lines[last - 1].endswith("\r\n") else lines[last - 1].endswith("\n")  # keep the span's line end
    model = load_model(args)
    sampler = sampler_options(args)
    with _note(model, sampler) as note:
        result = model.edit(text, start, end, args.length, args.seed, args.mode, progress=note.step, **sampler)
    if args.write:
        write_atomically(path, mark + result.text, backup=not args.no_backup)
        print(f"rewrote lines {first}-{last} of {path}" + ("" if args.no_backup else f" (backup: {path.name}.bak)"))
    else:
        print(result.text, end="")


def _rewrite(path: Path, mark: str, text: str, args: argparse.Namespace) -> None:
    """`edit --instruction`: the file rewritten as asked (`DiffGemma.rewrite`), as a unified diff or written."""
    import difflib

    if args.length is not None:
        raise DiffGemmaError("--length goes with --lines (an instruction's answer is as long as it needs)")
    model = load_model(args)
    sampler = sampler_options(args)
    with _note(model, sampler) as note:
        new = model.rewrite(text, args.instruction, args.seed, mode=args.mode, progress=note.step, **sampler).content
    if new == text:
        print(f"no change to {path}")
    elif args.write:
        write_atomically(path, mark + new, backup=not args.no_backup)
        print(f"rewrote {path}" + ("" if args.no_backup else f" (backup: {path.name}.bak)"))
    else:
        diff = difflib.unified_diff(text.splitlines(True), new.splitlines(True), str(path), f"{path} (rewritten)")
        for line in diff:  # (as diff marks a last line with no newline)
            sys.stdout.write(line if line.endswith("\n") else line + "\n\\ No newline at end of file\n")


def cmd_serve(args: argparse.Namespace) -> None:
    from ..server import ServerOptions, check_address, serve
    from ..train.lora import read_adapter_config

    check_address(args.host, args.port)  # before the load, which may take minutes
    served = args.name or Path(model_path(args)).name
    names = [name for name, _ in args.lora_modules]
    if len(set(names)) < len(names) or served in names:
        message = f"--lora-modules: each adapter needs a name of its own, not the model's ({served!r}), got {names}"
        raise DiffGemmaError(message)
    if args.lora_modules and args.adapter is not None:
        raise DiffGemmaError("--adapter folds one adapter into the model: serve it with --lora-modules beside others")
    for _, folder in args.lora_modules:  # (each adapter's config read before the load, which may take minutes)
        read_adapter_config(as_path(folder, "an adapter (its folder)"))
    model = load_model(args)
    for name, folder in args.lora_modules:
        model.add_adapter(name, folder)
    model.settings = model.settings.replace(**sampler_options(args))  # (--steps, --top-p, ...: the defaults)
    options = ServerOptions(
        model_name=served,
        api_key=args.api_key or os.environ.get("DIFFGEMMA_API_KEY"),
        max_prompt_tokens=args.max_prompt_tokens,
        max_tokens=args.max_tokens_limit,
        max_concurrent=args.max_concurrent,
        max_batch=args.max_batch,
        max_runs=args.max_runs,
        join_first=args.join_first,
        allowed_origins=tuple(args.allow_origin or ()),
        format_tries=args.format_tries,
        allow_adapter_loading=args.allow_adapter_loading,
        thinking_budget=args.thinking_budget,
    )
    serve(model, args.host, args.port, options)
