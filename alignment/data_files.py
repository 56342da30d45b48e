"""Reading user data files: JSONL with line-numbered errors, and `datasets` directories.

Every loader in prefloop reads through here, so every bad row is reported as `file:line: reason`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any


class DataError(ValueError):
    """Input data that cannot be used; the message names the file and line (or row)."""


def read_jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (line number, object) for each non-blank line; malformed JSON names file and line."""
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(
                    f"{path}:{lineno}: malformed JSON ({exc.msg} at column {exc.colno})"
                ) from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
            yield lineno, row


def read_rows(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """Rows of a JSONL file or a `datasets` directory (saved with save_to_disk), with a location label."""
    if path.is_dir():
        from datasets import Dataset, DatasetDict, load_from_disk

        try:
            loaded = load_from_disk(str(path))
        except (FileNotFoundError, ValueError) as exc:
            raise DataError(f"{path}: not a datasets directory ({exc})") from None
        dataset: Dataset = loaded["train"] if isinstance(loaded, DatasetDict) else loaded
        for i, row in enumerate(dataset):
            yield f"{path}[row {i}]", dict(row)
        return
    if path.suffix not in {".jsonl", ".json"}:
        raise DataError(
            f"{path}: unsupported file type {path.suffix!r}; expected .jsonl or a datasets directory"
        )
    for lineno, row in read_jsonl(path):
        yield f"{path}:{lineno}", row


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    """Atomic write: a reader never sees a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    tmp.replace(path)
