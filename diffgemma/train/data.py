"""Chat data for supervised fine-tuning: JSONL files of {"messages": [...]} through the chat template.

Each assistant turn becomes one example: the prompt is the conversation before it, rendered with the
generation prompt (what inference would see), and the response is the rest of the rendered conversation
up to and including that turn's closing markup, then EOS. Supervision starts at the model's turn.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import DiffGemmaError
from ..tokenizer import Tokenizer
from .objective import Example


def _common_prefix(a: str, b: str) -> int:
    length = min(len(a), len(b))
    for i in range(length):
        if a[i] != b[i]:
            return i
    return length


def conversation_examples(
    messages: list[dict], tokenizer: Tokenizer, eos_id: int, first_id: int = 0, enable_thinking: bool = False
) -> list[Example]:
    """One example per assistant turn of a conversation."""
    examples = []
    for turn, message in enumerate(messages):
        if message.get("role") != "assistant":
            continue
        history = messages[:turn]
        if not history:
            raise DiffGemmaError(f"messages[{turn}]: an assistant turn needs something before it to answer")
        prompt_text = tokenizer.apply_chat_template(
            history, add_generation_prompt=True, enable_thinking=enable_thinking
        )
        full_text = tokenizer.apply_chat_template(
            messages[: turn + 1], add_generation_prompt=False, enable_thinking=enable_thinking
        )
        # The generation prompt may add markup the rendered turn lacks (an empty thought channel); the
        # response is whatever the rendered turn has past the point where the two texts part.
        response_text = full_text[_common_prefix(prompt_text, full_text) :]
        if not response_text.strip():
            raise DiffGemmaError(f"messages[{turn}]: the assistant turn renders to nothing")
        prompt = tokenizer.encode(prompt_text, add_special_tokens=False)
        response = [*tokenizer.encode(response_text, add_special_tokens=False), eos_id]
        examples.append(Example(prompt, response, id=first_id + len(examples)))
    return examples


def read_chat_jsonl(
    path: str | Path, tokenizer: Tokenizer, eos_id: int, enable_thinking: bool = False
) -> list[Example]:
    """Examples from a JSONL file, one conversation a line; errors name the file and line."""
    file = Path(path)
    if not file.is_file():
        raise DiffGemmaError(f"{file}: file not found")
    examples: list[Example] = []
    for number, line in enumerate(file.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{file}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise DiffGemmaError(f"{where}: not valid JSON ({err.msg})") from None
        messages = record.get("messages") if isinstance(record, dict) else None
        if not isinstance(messages, list) or not messages:
            raise DiffGemmaError(f'{where}: expected an object with a non-empty "messages" list')
        try:
            found = conversation_examples(messages, tokenizer, eos_id, len(examples), enable_thinking)
        except DiffGemmaError as err:
            raise DiffGemmaError(f"{where}: {err}") from None
        if not found:
            raise DiffGemmaError(f"{where}: no assistant turn to learn from")
        examples += found
    if not examples:
        raise DiffGemmaError(f"{file}: no conversations")
    return examples
