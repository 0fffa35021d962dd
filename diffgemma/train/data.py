"""Data for supervised fine-tuning: JSONL files, a record a line, in the formats TRL's trainers read.

- conversations, {"messages": [...]} through the chat template: each assistant turn becomes one example, its
  prompt the conversation before it, rendered with the generation prompt (what inference would see), its
  response the rest of the rendered conversation up to and including that turn's closing markup, then EOS; a
  record's "tools" (TRL's column) are offered through the template, and a turn that calls them ends after its
  last call with <|tool_response>, where the tools' answers come in (the EOS a call ends with at inference);
- prompt and completion, {"prompt": [...], "completion": [...]} as messages: the same, learning only the
  completion's assistant turns;
- prompt and completion as text, {"prompt": "...", "completion": "..."}: plain continuation, no template (the
  prompt encoded as `generate` encodes it, the completion then EOS);
- text alone, {"text": "..."}: the whole text as the response to an empty prompt (BOS alone);
- and two formats fine-tuning datasets often come in, read as the conversations they are: ShareGPT's
  {"conversations": [{"from": "human" | "gpt" | "system" | ..., "value": "..."}, ...]} and Alpaca's
  {"instruction": "...", "input": "...", "output": "..."} (the instruction, then the input if any, as the user's
  turn; the output as the answer; an optional "system").
A file is JSONL (a record a line), a .json file of one array of records (as Alpaca's data is published), or a
.parquet file, a record a row (as datasets are kept on the Hugging Face Hub; pyarrow reads it).
Supervision starts at the response. An assistant turn with `"weight": 0` (OpenAI's fine-tuning format) is
context for the turns after it, not an example.
"""

from __future__ import annotations

import re
from pathlib import Path

from ..errors import DiffGemmaError
from ..images import split_images
from ..records import RECORD_SUFFIXES, alpaca_messages, read_records, sharegpt_messages
from ..tokenizer import Tokenizer, check_messages
from ..toolcalls import TOOL_CALL_CLOSE, TOOL_RESPONSE_OPEN
from .objective import Example


def _parting(prompt: str, full: str, markers: tuple[str, ...]) -> int:
    """Where `full` stops following `prompt`, moved back to the start of a special token the two part inside
    (`<|channel>` and `<|tool_call>` share their first characters)."""
    length = min(len(prompt), len(full))
    split = next((i for i in range(length) if prompt[i] != full[i]), length)
    for marker in markers:
        inside = [start for start in range(max(0, split - len(marker) + 1), split) if full.startswith(marker, start)]
        split = min(inside, default=split)
    return split


def conversation_examples(
    messages: list[dict],
    tokenizer: Tokenizer,
    eos_id: int,
    first_id: int = 0,
    enable_thinking: bool = False,
    tools: list[dict] | None = None,
    first_turn: int = 0,
) -> list[Example]:
    """One example per assistant turn of a conversation (with the `tools` it was offered) from `first_turn` on."""
    check_messages(messages)
    if split_images(messages)[1]:
        raise DiffGemmaError("a conversation has image parts: training reads text only (no images)")
    examples = []
    for turn, message in enumerate(messages):
        if turn < first_turn or message.get("role") != "assistant" or not _learned(message, turn):
            continue
        history = messages[:turn]
        if not history:
            raise DiffGemmaError(f"messages[{turn}]: an assistant turn needs something before it to answer")
        prompt_text = tokenizer.apply_chat_template(history, True, enable_thinking, tools=tools)
        full_text = tokenizer.apply_chat_template(messages[: turn + 1], False, enable_thinking, tools=tools)
        # The generation prompt may add markup the rendered turn lacks (an empty thought channel); the
        # response is whatever the rendered turn has past the point where the two texts part.
        response_text = full_text[_parting(prompt_text, full_text, tokenizer.special_strings) :]
        if not response_text.strip():
            raise DiffGemmaError(f"messages[{turn}]: the assistant turn renders to nothing")
        end = eos_id
        if message.get("tool_calls") and TOOL_CALL_CLOSE in response_text:
            response_text = response_text[: response_text.rindex(TOOL_CALL_CLOSE) + len(TOOL_CALL_CLOSE)]
            end = tokenizer.token_id(TOOL_RESPONSE_OPEN) or eos_id
        prompt = tokenizer.encode(prompt_text, add_special_tokens=False)
        response = [*tokenizer.encode(response_text, add_special_tokens=False), end]
        examples.append(Example(prompt, response, id=first_id + len(examples)))
    return examples


def _learned(message: dict, turn: int) -> bool:
    """Whether an assistant turn is learned: OpenAI's `weight`, 1 (the default) or 0 (context only)."""
    weight = message.get("weight", 1)
    if weight not in (0, 1) or isinstance(weight, bool):
        raise DiffGemmaError(f"messages[{turn}].weight must be 0 or 1, got {weight!r}")
    return weight == 1


RECORD_FORMATS = (
    '{"messages": [...]}, {"prompt": ..., "completion": ...} (texts or messages), {"text": "..."}, ShareGPT\'s '
    '{"conversations": [{"from", "value"}, ...]} or Alpaca\'s {"instruction", "input", "output"}'
)


def record_examples(
    record: object, tokenizer: Tokenizer, eos_id: int, first_id: int = 0, enable_thinking: bool = False
) -> list[Example]:
    """The examples of one JSONL record, in any of the formats above."""
    if not isinstance(record, dict):
        raise DiffGemmaError(f"expected an object: {RECORD_FORMATS}")
    tools = record.get("tools")
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise DiffGemmaError('"messages" must be a non-empty list')
        return conversation_examples(messages, tokenizer, eos_id, first_id, enable_thinking, tools)
    prompt, completion = record.get("prompt"), record.get("completion")
    if isinstance(prompt, list) and isinstance(completion, list) and completion:
        messages = prompt + completion
        return conversation_examples(messages, tokenizer, eos_id, first_id, enable_thinking, tools, len(prompt))
    if isinstance(prompt, str) and isinstance(completion, str) and completion:
        return [_continuation(tokenizer, prompt, completion, eos_id, first_id)]
    # a dataset's "text" column beside its turns is their rendering in some template: the turns come first
    if "conversations" in record:
        messages = sharegpt_messages(record["conversations"])
        return conversation_examples(messages, tokenizer, eos_id, first_id, enable_thinking, tools)
    if "output" in record and ("instruction" in record or "input" in record):
        return conversation_examples(alpaca_messages(record), tokenizer, eos_id, first_id, enable_thinking, tools)
    if isinstance(record.get("text"), str) and record["text"]:  # a text alone continues an empty prompt
        return [_continuation(tokenizer, "", record["text"], eos_id, first_id)]
    raise DiffGemmaError(f"expected one of {RECORD_FORMATS} (non-empty), got the keys {sorted(record)}")


def _continuation(tokenizer: Tokenizer, prompt: str, completion: str, eos_id: int, example_id: int) -> Example:
    """Plain text, no template: the prompt encoded as `generate` encodes it, the completion then EOS."""
    response = [*tokenizer.encode(completion, add_special_tokens=False), eos_id]
    return Example(tokenizer.encode(prompt), response, id=example_id)


DATA_PATTERNS = tuple(f"*{suffix}" for suffix in RECORD_SUFFIXES)  # a dataset's record files, in the order tried
HELD_OUT_SPLITS = ("test", "validation", "valid", "dev", "eval")  # the names a dataset's held-out split goes by


def _held_out_name(name: str) -> bool:
    """A file named for a held-out split (`test-00000-of-00001.parquet`, `validation.jsonl`; the split a word of
    its name, so `developer_chats.jsonl` is no `dev` split), not for training."""
    words = set(re.split(r"[^a-z0-9]+", name.lower()))
    return "train" not in words and bool(words & set(HELD_OUT_SPLITS))


def data_splits(source: str | Path) -> tuple[list[Path], list[Path]]:
    """The files `--data` names, (training files, held-out files): a file (training data); a folder's record files
    (a dataset downloaded whole: its Parquet files, else its JSONL, else its JSON); or a Hugging Face Hub dataset
    id (`owner/name`), its record files fetched. Files named for a test or validation split (`test-00000.parquet`,
    `validation.jsonl`) are held out, the others trained on (a folder of held-out files alone: those are trained
    on, and none held out)."""
    from ..api import download, on_hub

    path = Path(source).expanduser()
    if path.is_file():
        return [path], []
    if not path.is_dir():
        if path.suffix.lower() in RECORD_SUFFIXES or not on_hub(source):  # (`data/chat.jsonl` is no dataset id)
            raise DiffGemmaError(f"{source}: file not found")
        path = download(str(source), DATA_PATTERNS, kind="dataset")
    for pattern in DATA_PATTERNS:
        found = sorted(file for file in path.rglob(pattern) if file.is_file() and ".cache" not in file.parts)
        if found:
            held_out = [file for file in found if _held_out_name(file.name)]
            train = [file for file in found if file not in held_out]
            return (train, held_out) if train else (found, [])
    raise DiffGemmaError(f"{source}: no data files in it ({', '.join(DATA_PATTERNS)})")


def read_chat_jsonl(
    source: str | Path, tokenizer: Tokenizer, eos_id: int, enable_thinking: bool = False, split: str = "train"
) -> list[Example]:
    """Examples from data (`data_splits`: a JSONL file, a conversation a line; a .json file's array; a .parquet
    file's rows; a folder or Hub dataset of them): its training split; ("held_out") its held-out split, if any;
    ("eval", what `--eval-data` names) its held-out split where it has one, else all of it."""
    if split not in ("train", "held_out", "eval"):
        raise ValueError(f"split must be 'train', 'held_out' or 'eval', got {split!r}")
    train, held_out = data_splits(source)
    files = train if split == "train" else held_out if split == "held_out" or held_out else train
    return read_examples(files, source, tokenizer, eos_id, enable_thinking)


def read_examples(
    files: list[Path], source: str | Path, tokenizer: Tokenizer, eos_id: int, enable_thinking: bool = False
) -> list[Example]:
    """Examples from data files (`data_splits`'s, of `source`; none: none); errors name the file and the line (or
    the row)."""
    examples: list[Example] = []
    if not files:  # (a dataset without a held-out split)
        return []
    for path in files:
        for where, record in read_records(path):
            try:
                found = record_examples(record, tokenizer, eos_id, len(examples), enable_thinking)
            except DiffGemmaError as err:
                raise DiffGemmaError(f"{where}: {err}") from None
            if not found:
                raise DiffGemmaError(f"{where}: no assistant turn to learn from")
            examples += found
    if not examples:
        raise DiffGemmaError(f"{source}: no conversations")
    return examples
