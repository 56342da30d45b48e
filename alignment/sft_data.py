"""SFT data: conversational (`messages`) or Alpaca (`instruction`/`input`/`output`) rows -> conversations.

Rows are validated as they are read (file:line in every error) and normalised to one shape,
`{"messages": [{"role", "content"}, ...]}` ending in a non-empty assistant turn.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from alignment.data_files import DataError, read_rows
from alignment.messages import Message, checked_messages


def _from_alpaca(row: dict[str, Any], where: str) -> list[Message]:
    for key in ("instruction", "output"):
        if not isinstance(row.get(key), str):
            raise DataError(f"{where}: Alpaca row needs a string {key!r} field")
    prompt = row["instruction"].strip()
    if extra := str(row.get("input") or "").strip():
        prompt = f"{prompt}\n\n{extra}"
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": row["output"]}]


def validate_messages(messages: Any, where: str) -> list[Message]:
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: 'messages' must be a non-empty list")
    clean = checked_messages(messages, where, "messages")
    for i, msg in enumerate(clean):
        if msg["role"] == "assistant" and not msg["content"].strip():
            raise DataError(f"{where}: messages[{i}] is an empty assistant turn")
    if clean[-1]["role"] != "assistant":
        raise DataError(f"{where}: the last message must be the assistant's (got {clean[-1]['role']!r})")
    return clean


def to_conversation(row: dict[str, Any], where: str) -> list[Message]:
    if "messages" in row:
        return validate_messages(row["messages"], where)
    if "instruction" in row or "output" in row:
        return validate_messages(_from_alpaca(row, where), where)
    raise DataError(f"{where}: row has neither 'messages' nor 'instruction'/'output' (keys: {sorted(row)})")


def load_conversations(path: Path) -> list[list[Message]]:
    conversations = [to_conversation(row, where) for where, row in read_rows(path)]
    if not conversations:
        raise DataError(f"{path}: no rows")
    return conversations


def to_prompt_completion(conversations: list[list[Message]]) -> list[dict[str, list[Message]]]:
    """One example per assistant turn, so every assistant token is trained on with any chat template
    (TRL's assistant masks need `{% generation %}` markers that most templates lack)."""
    examples = []
    for conv in conversations:
        for i, msg in enumerate(conv):
            if msg["role"] == "assistant" and i > 0:
                examples.append({"prompt": conv[:i], "completion": [msg]})
    return examples
