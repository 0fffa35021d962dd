"""The `diffgemma` command line: every command's options, each command's function to run."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from .. import __version__
from ..config import QUANT_FORMATS, SYSTEM_SNAPSHOTS
from ..structured import DEFAULT_TRIES
from . import bench as bench_command
from . import checkpoints, tasks, text, train
from .common import MODEL_ENV


class OneLineParser(argparse.ArgumentParser):
    """Bad options get one line on stderr and exit code 2 (no usage dump)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"diffgemma: {message} (see `{self.prog} --help`)", file=sys.stderr)
        raise SystemExit(2)


def _at_least(minimum: int, maximum: int | None = None) -> Callable[[str], int]:
    """An argparse type: a whole number from `minimum` (to `maximum`), else argparse's usage error."""

    def parse(given: str) -> int:
        try:
            value = int(given)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {given!r}") from None
        if value < minimum or (maximum is not None and value > maximum):
            bound = f"between {minimum} and {maximum}" if maximum is not None else f"at least {minimum}"
            raise argparse.ArgumentTypeError(f"must be {bound}, got {value}")
        return value

    return parse


def _named_folder(given: str) -> tuple[str, str]:
    """An argparse type: NAME=FOLDER (vLLM's form for --lora-modules), or a FOLDER named by its last part."""
    name, equals, folder = given.partition("=")
    if not equals:
        name, folder = Path(given.rstrip("/")).name, given
    if not name.strip() or not folder.strip():
        raise argparse.ArgumentTypeError(f"expected NAME=FOLDER (or a FOLDER), got {given!r}")
    return name.strip(), folder.strip()


def _add_tries_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--tries",
        type=int,
        default=None,
        help="solve again (fresh seed) while the grid breaks a rule, up to N times (default: the solver's 64; "
        "1: the model's first try alone)",
    )


def _add_candidates_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--no-candidates",
        dest="candidates",
        action="store_false",
        help="let an empty cell sample any digit, even one a given in its row, column or box holds (the model alone)",
    )


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
    length: bool = True,
) -> None:
    """--model, --device (unless `device` is False: a command that runs nothing there), --dtype (default `dtype`,
    one of DTYPE_CHOICES), --threads (`main` applies it); for a command that runs the model (`inference`,
    `load_model`) --quant, --adapter, --compile, --prefix-cache (default `prefix_cache`) and --system-cache; and with
    `sampling` the sampler's settings, --seed, --mode and (unless `length` is False: a command whose task sets how
    many tokens it writes) --max-new-tokens."""
    parser.add_argument("--model", help=f"checkpoint folder (default: ${MODEL_ENV})")
    if device:
        parser.add_argument("--device", default="auto", help="auto (a CUDA GPU if any, else the CPU), cpu, cuda:1, mps")
    others = ", ".join(name for name in ("auto", "stored", "float32", "bfloat16", "float16") if name != dtype)
    parser.add_argument("--dtype", default=dtype, help=f"{dtype} ({DTYPE_CHOICES[dtype]}), or {others}")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: one per core)")
    if inference:
        parser.add_argument("--quant", default=None, choices=QUANT_FORMATS, help="quantize weights while loading")
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
        parser.add_argument(
            "--system-cache",
            type=_at_least(0),
            default=SYSTEM_SNAPSHOTS,
            metavar="N",
            help="the system turns (instructions, tools) of the last N prompts that open with them, kept apart for "
            "new conversations that open with the same to encode only what follows; each costs a cache of its "
            "length; 0: none (default %(default)s)",
        )
    if not sampling:
        return
    parser.add_argument("--seed", type=int, default=None, help="the random draws' seed: the same output again")
    parser.add_argument(
        "--mode",
        default="fast",
        choices=["fast", "reference"],
        help="fast: diffgemma's sampler; reference: the reference's arithmetic and random draws, step for step",
    )
    if length:
        parser.add_argument("--max-new-tokens", type=int, default=None, help="the most tokens to write")
    _add_sampler_options(parser)


def _add_sampler_options(parser: argparse.ArgumentParser) -> None:
    """The sampler's settings (`common.SAMPLER_OPTIONS`): the checkpoint's defaults, overridden."""
    parser.add_argument("--steps", type=int, default=None, help="maximum denoising steps per canvas")
    parser.add_argument(
        "--entropy-bound",
        type=float,
        default=None,
        help="a step accepts its surest positions while their entropies sum to at most this (more: fewer steps)",
    )
    parser.add_argument("--t-max", type=float, default=None, help="temperature on the first step")
    parser.add_argument("--t-min", type=float, default=None, help="temperature towards the last step")
    parser.add_argument("--stability", type=int, default=None, help="steps the draft must stay unchanged")
    parser.add_argument("--confidence", type=float, default=None, help="mean entropy under which a canvas stops")
    _add_cut_options(parser)
    parser.add_argument(
        "--presence-penalty",
        type=float,
        default=None,
        help="taken off the logits of a token the answer holds so far (-2 to 2; 0: off)",
    )
    parser.add_argument(
        "--frequency-penalty",
        type=float,
        default=None,
        help="taken off a token's logits as many times as the answer holds it so far (-2 to 2; 0: off)",
    )
    parser.add_argument(
        "--repetition-penalty",
        type=float,
        default=None,
        help="a token the prompt or the answer holds has its logit divided by this where positive, multiplied "
        "where not (1: off)",
    )


def _add_cut_options(parser: argparse.ArgumentParser) -> None:
    """What a position may draw: top-k, top-p, min-p (the checkpoint's defaults, overridden)."""
    parser.add_argument(
        "--top-k", type=int, default=None, help="a position draws only among its k likeliest tokens (0: all)"
    )
    parser.add_argument(
        "--top-p",
        type=float,
        default=None,
        help="a position draws only among its likeliest tokens holding this much probability, at temperature 1 "
        "(1: all)",
    )
    parser.add_argument(
        "--min-p",
        type=float,
        default=None,
        help="a position draws only tokens at least this fraction as likely as its likeliest, at temperature 1 "
        "(0: all)",
    )


def _add_stream_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--stream",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="print the text as it settles, each canvas's leading tokens fixed once stable (the server's way); "
        "--no-stream prints it whole at the end, the text the Python API's generate gives for the seed",
    )


def _add_prediction_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--prediction",
        metavar="FILE",
        help="the answer expected, mostly (a file an edit will give back changed): the canvas starts from its "
        "text, so what the answer keeps of it settles in a step or two",
    )


def _add_thinking_budget_option(parser: argparse.ArgumentParser, help_text: str) -> None:
    parser.add_argument("--thinking-budget", type=_at_least(0), default=None, metavar="N", help=help_text)


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
    generate.add_argument(
        "--image",
        action="append",
        default=[],
        metavar="FILE",
        help="a picture for the prompt's next image token (repeatable; checkpoints with a vision tower)",
    )
    _add_stream_option(generate)
    _add_stop_option(generate)
    _add_prediction_option(generate)
    _add_model_options(generate)
    generate.set_defaults(run=text.cmd_generate)

    score = commands.add_parser("score", help="how likely the model finds a text: log-likelihood, perplexity")
    score.add_argument("text", nargs="?", help="the text, or - to read it from stdin")
    score.add_argument("--file", help="score this file's text")
    score.add_argument("--tokens", action="store_true", help="also each token's log-probability")
    score.add_argument("--json", action="store_true", help="one JSON record (with --tokens, each token's too)")
    _add_model_options(score, sampling=False)
    score.set_defaults(run=text.cmd_score)

    embed = commands.add_parser(
        "embed", help="texts' vectors from the causal encoder (JSONL), or how alike they are (--similarity)"
    )
    embed.add_argument("texts", nargs="*", help="the texts (- reads one from stdin)")
    embed.add_argument("--file", help='texts: one a line, or a .jsonl (.json, .parquet) of {"text": ...}')
    embed.add_argument("--dimensions", type=_at_least(1), default=None, help="keep each vector's first N values")
    embed.add_argument("--no-normalize", action="store_true", help="the mean state as it is, not at unit length")
    embed.add_argument("--similarity", action="store_true", help="print the texts' cosine similarities instead")
    embed.add_argument("--batch-size", type=_at_least(1), default=32, help="texts read together")
    _add_model_options(embed, sampling=False)
    embed.set_defaults(run=text.cmd_embed)

    chat = commands.add_parser(
        "chat",
        help="an interactive chat (/reset, /retry, /save FILE, /load FILE, /think on|off|N, /set NAME VALUE, /exit), "
        "one message, or --file of conversations",
    )
    chat.add_argument("message", nargs="?", help="answer this one message and exit (default: a conversation)")
    system = chat.add_mutually_exclusive_group()
    system.add_argument("--system", help="a system prompt, kept across /reset")
    system.add_argument("--system-file", metavar="FILE", help="the system prompt in a text file (a long one, say)")
    chat.add_argument(
        "--image",
        action="append",
        default=[],
        metavar="FILE",
        help="a picture shown with the first message (repeatable; /image FILE adds one to the next message)",
    )
    _add_stream_option(chat)
    chat.add_argument("--think", action="store_true", help="start with thinking on")
    _add_thinking_budget_option(chat, "while thinking is on: at most N tokens of thought, then the answer")
    chat.add_argument("--watch", action="store_true", help="show each answer's canvas converge")
    chat.add_argument(
        "--tools",
        metavar="FILE.py",
        help="a Python file whose functions the model may call (run here; answers print whole)",
    )
    chat.add_argument(
        "--mcp",
        action="append",
        default=[],
        metavar="COMMAND",
        help="an MCP server (a command line to start, or an http(s) URL) whose tools the model may call; repeatable",
    )
    chat.add_argument(
        "--file",
        help='many conversations: a .jsonl of {"messages": [...]}, each answered once; JSONL out',
    )
    chat.add_argument("--batch-size", type=_at_least(1), default=8, help="--file: conversations denoised together")
    chat.add_argument("--stats", action="store_true", help="--file: print tokens and speed to stderr")
    _add_stop_option(chat)
    _add_prediction_option(chat)
    _add_template_option(chat)
    _add_model_options(chat)
    chat.set_defaults(run=text.cmd_chat)

    infill = commands.add_parser("infill", help="fill the middle between a prefix and a suffix")
    infill.add_argument("--prefix", required=True, help="the text before the gap (read as the prompt)")
    infill.add_argument("--suffix", required=True, help="the text after it (held in place on the canvas)")
    infill.add_argument("--length", type=int, default=32, help="tokens to fill")
    _add_model_options(infill, length=False)  # (its length: --length)
    infill.set_defaults(run=text.cmd_infill)

    edit = commands.add_parser(
        "edit", help="rewrite a file as an instruction asks (a diff), or regenerate some of its lines in place"
    )
    edit.add_argument("file")
    how = edit.add_mutually_exclusive_group(required=True)
    how.add_argument(
        "--instruction",
        metavar="TEXT",
        help="what to change: the model gives the whole file back changed, its canvas starting from the file "
        "(a prediction), and the change prints as a unified diff",
    )
    how.add_argument("--lines", help="A:B, 1-based and inclusive: those lines regenerated in place (no instruction)")
    edit.add_argument("--length", type=int, default=None, help="tokens for the new lines (default: as many as before)")
    edit.add_argument("--write", action="store_true", help="write the file (atomically) instead of printing")
    edit.add_argument("--no-backup", action="store_true", help="with --write, keep no FILE.bak")
    _add_model_options(edit, length=False)  # (its length: --length)
    edit.set_defaults(run=text.cmd_edit)

    serve = commands.add_parser(
        "serve", help="a server for OpenAI, Anthropic, Ollama and llama.cpp clients, with a playground page"
    )
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    serve.add_argument("--port", type=_at_least(0, 65535), default=8000, help="port to listen on (0: any free one)")
    serve.add_argument("--name", default=None, help="model id the API reports")
    serve.add_argument("--api-key", default=None, help="require this Bearer key (or set DIFFGEMMA_API_KEY)")
    for flag, default, meaning in (  # the server's limits, each at least 1
        ("--max-prompt-tokens", 8192, "longest prompt taken"),
        ("--max-tokens-limit", 4096, "most tokens an answer may ask"),
        ("--max-concurrent", 16, "answers (a request's n choices each) under way or waiting at once; more get 429"),
        ("--max-batch", 8, "rows denoised together in one batch"),
        (
            "--max-runs",
            2,
            "batches denoised at once, a step of each in turn: a request that arrives while a batch runs starts at "
            "once instead of waiting for it to end; 1: one batch after another",
        ),
    ):
        serve.add_argument(flag, type=_at_least(1), default=default, help=f"{meaning} (default %(default)s)")
    serve.add_argument(
        "--join-first",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="a request a running batch of its settings can take joins it after its canvas, sharing its passes, "
        "rather than start a batch of its own (default: on a GPU, where a pass costs about the same for more "
        "rows; not on the CPU, where a batch of its own starts it at once)",
    )
    serve.add_argument(
        "--format-tries",
        type=_at_least(1),
        default=DEFAULT_TRIES,
        help="draws of an answer asked for in a form (response_format: JSON; vLLM's structured outputs) that does "
        "not read, before a 422 (default %(default)s)",
    )
    _add_thinking_budget_option(
        serve,
        "the most tokens of thought a reply that thinks writes, where its request asks no budget (default: none; an "
        "effort buys one: low 1,024, medium 8,192, high 24,576)",
    )
    serve.add_argument(
        "--allow-origin",
        action="append",
        metavar="ORIGIN",
        help="let web pages from ORIGIN (e.g. http://localhost:3000, or *) call the API from a browser (repeatable)",
    )
    serve.add_argument(
        "--lora-modules",
        nargs="+",
        type=_named_folder,
        default=[],
        metavar="NAME=FOLDER",
        help="LoRA adapters (PEFT's layout, as `train chat --lora-rank` saves them) served beside the model, each "
        "as a model of its own: a request's `model` field picks one by NAME (a FOLDER alone: its last part), the "
        "base model by --name",
    )
    serve.add_argument(
        "--allow-adapter-loading",
        action="store_true",
        help="let requests load and unload LoRA adapters while the server runs (vLLM's /v1/load_lora_adapter and "
        "/v1/unload_lora_adapter; a folder on this machine, read by the server: for clients you trust)",
    )
    _add_template_option(serve)
    # a chat client's side requests (a title, follow-ups) come between a conversation's turns: two kept
    _add_model_options(serve, sampling=False, prefix_cache=2)
    _add_sampler_options(serve)  # the server's defaults: a request's own fields override them
    serve.set_defaults(run=text.cmd_serve)

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
    _add_model_options(sudoku, length=False)  # (81 cells)
    sudoku.set_defaults(run=tasks.cmd_sudoku)

    puzzles = commands.add_parser("sudoku-puzzles", help="print fresh unique-solution puzzles, one a line")
    puzzles.add_argument("count", type=_at_least(1))
    puzzles.add_argument(
        "--givens", default="24:36", help="a number or a range A:B (20 at least; below 22, seconds a puzzle)"
    )
    puzzles.add_argument("--seed", type=int, default=0, help="the same seed, the same puzzles")
    puzzles.set_defaults(run=tasks.cmd_sudoku_puzzles)

    evaluate = commands.add_parser("eval", help="evaluate a task: `eval sudoku --puzzles FILE`")
    evaluate.add_argument("task", choices=["sudoku"])
    evaluate.add_argument(
        "--puzzles", required=True, help="one puzzle a line (81 cells; 0 . _ or * empty; CSV puzzle,solution lines too)"
    )
    evaluate.add_argument("--json", action="store_true", help="print one JSON object")
    _add_tries_option(evaluate)
    _add_candidates_option(evaluate)
    _add_model_options(evaluate, length=False)  # (a puzzle: 81 cells)
    evaluate.set_defaults(run=tasks.cmd_eval_sudoku)

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
    trainer.add_argument(
        "--seed", type=int, default=0, help="the run's random draws: new weights, data order, corruption"
    )
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
        help="chat: training data (a file, a dataset folder or a Hub dataset id), JSONL, a .json array or .parquet: "
        '{"messages": [...]}, {"prompt": ..., "completion": ...}, '
        '{"text": ...}, ShareGPT\'s {"conversations": [...]} or Alpaca\'s {"instruction", "input", "output"}',
    )
    trainer.add_argument(
        "--eval-data",
        help="chat: held-out conversations, like --data (of a dataset, its test or validation split where it has one); "
        "default: --data's own such split, else a twentieth of it",
    )
    trainer.add_argument(
        "--lora-rank", type=_at_least(0), default=0, help="chat: train LoRA adapters of this rank (0: full)"
    )
    trainer.add_argument(
        "--quant",
        default=None,
        choices=QUANT_FORMATS,
        help="chat, with --lora-rank: quantize the frozen base while loading (QLoRA: the 26B in int4 fits 18 GB)",
    )
    trainer.add_argument("--lora-alpha", type=float, default=32.0, help="chat: LoRA's scale is alpha / rank")
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
    trainer.set_defaults(run=train.cmd_train)

    quantize = commands.add_parser("quantize", help="write a weight-quantized copy of a checkpoint (atomic)")
    quantize.add_argument("source", help="checkpoint folder")
    quantize.add_argument("destination", help="folder for the quantized checkpoint")
    quantize.add_argument("--to", required=True, choices=QUANT_FORMATS, help="the weights' format")
    quantize.add_argument("--group-size", type=int, default=None, help="int4: weights sharing one scale (64)")
    quantize.add_argument(
        "--attention-group-size",
        type=int,
        default=None,
        help="int4: the same for attention's projections (16: finer scales where int4 hurts most)",
    )
    quantize.add_argument("--device", default="cpu", help="where to quantize (a GPU is much quicker)")
    quantize.add_argument("--dtype", default="bfloat16", help="dtype of what stays unquantized")
    quantize.set_defaults(run=checkpoints.cmd_quantize)

    lora = commands.add_parser("lora-merge", help="fold a LoRA adapter into its base model: a new full checkpoint")
    lora.add_argument("--adapter", required=True, help="adapter folder (PEFT layout)")
    lora.add_argument("--out", required=True, help="folder for the merged checkpoint")
    _add_model_options(lora, sampling=False, inference=False, dtype="stored", device=False)  # a shard at a time
    lora.set_defaults(run=checkpoints.cmd_lora_merge)

    bench = commands.add_parser("bench", help="how fast the model denoises here: ms a step, tokens/s, memory")
    bench.add_argument(
        "--batch", type=_at_least(1), nargs="+", default=[1], metavar="N", help="rows denoised together (each N)"
    )
    bench.add_argument("--prompt-tokens", type=_at_least(1), default=128, help="a random prompt's length")
    bench.add_argument("--canvases", type=_at_least(1), default=2, help="canvases a row writes")
    bench.add_argument("--steps", type=_at_least(2), default=16, help="denoising steps a canvas, each one run")
    bench.add_argument("--seed", type=int, default=0, help="the random prompts'")
    bench.add_argument("--json", action="store_true", help="a JSON line a row count, for scripts")
    _add_cut_options(bench)  # (what a client's top-k / top-p / min-p costs a step)
    _add_model_options(bench, sampling=False, prefix_cache=0)
    bench.set_defaults(run=bench_command.cmd_bench)

    info = commands.add_parser("info", help="summarise a checkpoint: shape, parameters, memory, sampler")
    info.add_argument("--model", help=f"checkpoint folder (default: ${MODEL_ENV})")
    info.add_argument("--context", type=int, default=4096, help="tokens of context for the memory estimate")
    info.add_argument("--batch", type=_at_least(1), default=1, help="rows for the memory estimate")
    info.set_defaults(run=checkpoints.cmd_info)

    random = commands.add_parser("random-checkpoint", help="write a random-weight checkpoint of a named shape")
    random.add_argument("folder")
    random.add_argument("--preset", default="tiny", help="tiny, bench-90m or 26b-a4b")
    random.add_argument("--seed", type=int, default=0, help="the random weights' seed")
    random.add_argument("--dtype", default="float32", help="the weights' dtype as written")
    random.set_defaults(run=checkpoints.cmd_random_checkpoint)
    return parser
