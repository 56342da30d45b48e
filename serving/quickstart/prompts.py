"""The quickstart's prompts: the bundled set (or any JSONL of id + prompt), split by hashed id."""

from __future__ import annotations

from pathlib import Path

from alignment.data_files import DataError, read_jsonl
from alignment.preference_data import in_eval_split
from serving.quickstart.config import PromptSettings


def load_split(settings: PromptSettings) -> tuple[list[str], list[str]]:
    """(train prompts, held-out prompts): the held-out side never reaches sampling or training."""
    path = Path(settings.path())
    train, heldout = [], []
    for line, row in read_jsonl(path):
        text, pid = row.get("prompt"), row.get("id")
        if not isinstance(text, str) or not text.strip() or not pid:
            raise DataError(f"{path}:{line}: expected 'id' and a non-empty 'prompt' string")
        (heldout if in_eval_split(str(pid), settings.heldout_fraction) else train).append(text)
    if not train or not heldout:
        raise DataError(f"{path}: the split left no train or no held-out prompts")
    return train[: settings.train_prompts], heldout[: settings.heldout_prompts]


def as_messages(prompt: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": prompt}]
