"""Supervised fine-tuning on chat data, full or with LoRA adapters: the `diffgemma train chat` command.

The output folder holds what a run has made so far (a full checkpoint, or the adapter in PEFT's layout)
and the trainer state beside it, rewritten atomically every `save_every` steps; `resume` continues from it
exactly. A held-out set (a file, or a slice of the data) is scored every `eval_every` steps.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..checkpoint import load_weights
from ..errors import DiffGemmaError
from .data import data_splits, read_chat_jsonl, read_examples
from .lora import CONFIG_FILE, LoraSettings, add_lora, load_adapter, save_adapter
from .objective import Example, response_canvases
from .trainer import TrainConfig, epoch_batches, evaluation_loss, save_state, train


@dataclass(frozen=True)
class FinetuneOptions:
    data: str
    out: str
    eval_data: str | None = None
    lora: LoraSettings | None = None
    steps: int = 1000
    batch_size: int = 8
    accumulation: int = 1
    peak_lr: float = 1e-4
    ar_weight: float = 1.0
    eval_every: int = 100
    save_every: int = 100
    seed: int = 0
    enable_thinking: bool = False
    resume: bool = False
    gradient_checkpointing: bool = True  # DiffusionGemma.checkpoint_layers
    max_length: int | None = None  # tokens an example may take (prompt and canvases); longer ones are left out


def example_length(example: Example, canvas: int) -> int:
    """The tokens an example's pass reads: its prompt, then its response in whole canvases."""
    return len(example.prompt) + response_canvases(example, canvas) * canvas


def within_length(
    examples: list[Example], max_length: int | None, canvas: int, what: str, log: Callable[[str], None]
) -> list[Example]:
    """The examples that take at most `max_length` tokens (`example_length`; None: all of them), saying how many
    were left out. Cut instead, an example would teach a response that stops mid-way, or one with no start."""
    if max_length is None:
        return examples
    kept = [example for example in examples if example_length(example, canvas) <= max_length]
    if len(kept) < len(examples):
        longest = max(example_length(example, canvas) for example in examples)
        log(
            f"{len(examples) - len(kept)} of {len(examples)} {what} examples are longer than --max-length "
            f"{max_length} tokens (the longest {longest:,}): left out"
        )
    return kept


def taught_to_end(model, examples: list, log: Callable[[str], None]) -> None:
    """Make the tokens the responses end with (a calling turn's `<|tool_response>`, where the model hands over
    to the tools) EOS ids of the model being trained, if they are not yet: generation then stops where
    training taught it to (a checkpoint whose EOS list lacks one would write on past the calls)."""
    eos_ids = model.settings.eos_token_id
    added = sorted({example.response[-1] for example in examples} - set(eos_ids))
    if added:
        model.settings = model.settings.replace(eos_token_id=[*eos_ids, *added])
        names = ", ".join(model.tokenizer.decode([token], skip_special_tokens=False) for token in added)
        log(f"responses end with {names} too: added to the EOS ids, so generation stops there")


def finetune(model, options: FinetuneOptions, log: Callable[[str], None] = print, show_progress: bool = True):
    """Fine-tune a loaded `DiffGemma` in place; returns the loss of every step."""
    if model.tokenizer is None:
        raise DiffGemmaError("fine-tuning on chat data needs the checkpoint's tokenizer and chat template")
    eos_ids = model.settings.eos_token_id
    if not eos_ids:
        raise DiffGemmaError("the checkpoint's generation config names no EOS token to end responses with")
    eos, pad = eos_ids[0], model.settings.pad_token_id
    training_files, held_out_files = data_splits(options.data)  # (a Hub dataset fetched once)
    examples = read_examples(training_files, options.data, model.tokenizer, eos, options.enable_thinking)
    if options.eval_data:
        held_out = read_chat_jsonl(options.eval_data, model.tokenizer, eos, options.enable_thinking, split="eval")
    else:  # the dataset's own test split, else a twentieth of the data (at least one) where there is enough
        held_out = read_examples(held_out_files, options.data, model.tokenizer, eos, options.enable_thinking)
        if not held_out:
            spare = len(examples) // 20 if len(examples) >= 20 else 0
            held_out, examples = examples[len(examples) - spare :], examples[: len(examples) - spare]
    canvas = model.config.canvas_length
    examples = within_length(examples, options.max_length, canvas, "training", log)
    if not examples:
        raise DiffGemmaError(f"no training example fits in --max-length {options.max_length} tokens")
    held_out = within_length(held_out, options.max_length, canvas, "held-out", log)
    taught_to_end(model, [*examples, *held_out], log)
    out = Path(options.out)
    model.network.checkpoint_layers(options.gradient_checkpointing)
    if options.lora is not None:
        if options.resume and (out / CONFIG_FILE).is_file():
            load_adapter(model.network, out)
        else:
            add_lora(model.network, options.lora)
    elif options.resume:  # the run's weights so far, read into the loaded model's tensors (no second model)
        load_weights(model.network, out)
    config = TrainConfig(
        steps=options.steps,
        batch_size=options.batch_size,
        accumulation=options.accumulation,
        peak_lr=options.peak_lr,
        warmup=max(1, min(100, options.steps // 10)),
        ar_weight=options.ar_weight,
        seed=options.seed,
    )
    longest = max(example_length(example, canvas) for example in [*examples, *held_out])
    log(f"{len(examples)} training examples, {len(held_out)} held out; the longest takes {longest:,} tokens")
    started = time.perf_counter()

    def checkpoint(step: int, optimizer, losses: list[float]) -> None:
        if options.lora is not None:
            base = str(getattr(model, "folder", ""))
            save_adapter(model.network, options.lora, out, base=base, generation=model.settings)
        else:
            model.save(out)
        save_state(out, step, optimizer, config, losses)
        if held_out and options.eval_every and (step % options.eval_every == 0 or step == options.steps):
            loss = evaluation_loss(model.network, held_out, config, eos, pad)
            log(f"step {step}: held-out loss {loss:.4f} ({(time.perf_counter() - started) / 60:.1f} min)")

    every = options.save_every if not options.eval_every else min(options.save_every, options.eval_every)
    return train(
        model.network,
        epoch_batches(examples, options.batch_size, options.seed),
        config,
        eos_id=eos,
        pad_id=pad,
        show_progress=show_progress,
        checkpoint=checkpoint,
        checkpoint_every=every,
        resume_from=out if options.resume else None,
    )
