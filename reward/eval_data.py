"""The held-out prompts of `prefloop eval`: the split training left out, with reference answers.

Rows are preference pairs, conversations or bare prompts; a row is held out by the same hashed id
training split on (`alignment.preference_data.in_eval_split`), so no evaluated prompt was trained on.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from alignment.data_files import read_rows
from alignment.messages import Message
from alignment.preference_data import in_eval_split, pair_id, prompt_messages, to_canonical

Messages = list[Message]


def _reference(row: dict[str, Any], canonical: dict[str, Any] | None) -> str | None:
    """A reference answer where the row has one: a pair's chosen reply, a conversation's last reply,
    or a `reference` string."""
    if canonical is not None:
        return canonical["chosen"][-1]["content"]
    if isinstance(row.get("reference"), str):
        return row["reference"]
    messages = row.get("messages")
    if isinstance(messages, list) and len(messages) > 1 and isinstance(messages[-1], dict):
        last = messages[-1]
        if last.get("role") == "assistant" and isinstance(last.get("content"), str):
            return last["content"]
    return None


def load_eval_items(
    path: Path, eval_fraction: float | None, limit: int
) -> tuple[list[Messages], list[str | None]]:
    """(prompts, reference answers or None) of the held-out split, keyed by the hashed id training split on."""
    prompts, references = [], []
    for where, row in read_rows(Path(path)):
        canonical = None
        if "chosen" in row and "rejected" in row:
            canonical = to_canonical(row, where)
            prompt, row_id = canonical["prompt"], canonical["id"]
        else:
            prompt = prompt_messages(row, where)
            row_id = str(row["id"]) if row.get("id") is not None else pair_id(prompt, [], [])
        if eval_fraction is None or in_eval_split(row_id, eval_fraction):
            prompts.append(prompt)
            references.append(_reference(row, canonical))
    return prompts[:limit], references[:limit]


def load_eval_prompts(path: Path, eval_fraction: float | None, limit: int) -> list[Messages]:
    """Prompts of the held-out split, keyed by the same hashed id training split on."""
    return load_eval_items(path, eval_fraction, limit)[0]
