"""Files of records and the shapes conversations come in: JSONL (a record a line), a .json file of one array,
a .parquet file's rows (a null key read as the absent one it was); ShareGPT's and Alpaca's records read as
messages. Training (`train.data`) and the command line's `--file` runs read their data through it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from .config import read_json_value, read_jsonl
from .errors import DiffGemmaError

RECORD_SUFFIXES = (".parquet", ".jsonl", ".json")  # files of records (else a file is text, a prompt a line)


def read_records(path: str | Path) -> Iterator[tuple[str, object]]:
    """A data file's records with where each is: a .json file's top-level array or a .parquet file's rows
    ("FILE[i]"), else JSONL ("FILE:LINE")."""
    suffix = Path(path).suffix.lower()
    if suffix == ".parquet":
        records = _parquet_rows(path)
    elif suffix == ".json":
        records = read_json_value(path)
        if not isinstance(records, list):
            raise DiffGemmaError(f"{path}: a .json data file holds one array of records; JSONL holds a record a line")
    else:
        yield from read_jsonl(path)
        return
    for index, record in enumerate(records):
        yield f"{path}[{index}]", record


def _parquet_rows(path: str | Path) -> list[dict]:
    """A Parquet file's rows as records (the form datasets are kept in on the Hugging Face Hub)."""
    try:
        import pyarrow.parquet as parquet
    except ImportError:
        raise DiffGemmaError(f"{path}: reading Parquet takes pyarrow (pip install 'diffgemma[data]')") from None
    if not Path(path).is_file():
        raise DiffGemmaError(f"{path}: file not found")
    try:
        rows = parquet.read_table(path).to_pylist()
    except (OSError, ValueError) as err:  # (pyarrow's ArrowInvalid is a ValueError)
        raise DiffGemmaError(f"{path}: not a readable Parquet file ({err})") from None
    return [_without_nulls(row) for row in rows]


def _without_nulls(value: object) -> object:
    """A Parquet row as the JSON record it was: a column of objects gives every object every key any of them has,
    the others null (a message's `weight`, `tool_calls`), so a null key is taken for the absent one it was."""
    if isinstance(value, dict):
        return {key: _without_nulls(item) for key, item in value.items() if item is not None}
    if isinstance(value, list):
        return [_without_nulls(item) for item in value]
    return value


# ShareGPT's speakers (`from`), as the chat template's roles
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "model": "assistant",
    "tool": "tool",
    "function_response": "tool",
    "observation": "tool",
}


def sharegpt_messages(turns: object) -> list[dict]:
    """ShareGPT's conversation ({"from": "human", "value": "..."} turns; "role"/"content" read too) as messages."""
    if not isinstance(turns, list) or not turns:
        raise DiffGemmaError('"conversations" must be a non-empty list of {"from": ..., "value": ...} turns')
    messages = []
    for index, turn in enumerate(turns):
        speaker = turn.get("from", turn.get("role")) if isinstance(turn, dict) else None
        text = turn.get("value", turn.get("content")) if isinstance(turn, dict) else None
        if speaker not in SHAREGPT_ROLES or not isinstance(text, str):
            raise DiffGemmaError(
                f'conversations[{index}]: expected {{"from": one of {sorted(SHAREGPT_ROLES)}, "value": "..."}}, '
                f"got {turn!r:.120}"
            )
        message = {"role": SHAREGPT_ROLES[speaker], "content": text}
        if "weight" in turn:  # (a turn some ShareGPT data marks as context only, "weight": 0, as OpenAI's format)
            message["weight"] = turn["weight"]
        messages.append(message)
    return messages


def alpaca_messages(record: dict) -> list[dict]:
    """Alpaca's record as a conversation: the instruction (and its input, after a blank line) asked, the output
    answered; a "system" text first where the record has one."""
    instruction, extra = record.get("instruction") or "", record.get("input") or ""
    output, system = record.get("output"), record.get("system") or ""
    if not all(isinstance(value, str) for value in (instruction, extra, output, system)) or not output:
        raise DiffGemmaError('Alpaca\'s "instruction", "input", "output", "system" must be texts, "output" not empty')
    question = f"{instruction}\n\n{extra}" if instruction and extra else instruction or extra
    if not question:
        raise DiffGemmaError('an Alpaca record needs an "instruction" or an "input"')
    turns = [{"role": "user", "content": question}, {"role": "assistant", "content": output}]
    return [{"role": "system", "content": system}, *turns] if system else turns
