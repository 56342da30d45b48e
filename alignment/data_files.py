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
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(f"{path}:{lineno}: not UTF-8 ({exc.reason} at byte {exc.start})") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(
                    f"{path}:{lineno}: malformed JSON ({exc.msg} at column {exc.colno})"
                ) from None
            except RecursionError:
                raise DataError(f"{path}:{lineno}: JSON nested too deeply") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
            if "\\ud" in line.lower() and _has_lone_surrogate(row):
                raise DataError(f"{path}:{lineno}: invalid Unicode (a lone surrogate escape such as \\ud800)")
            yield lineno, row


def _has_lone_surrogate(row: dict[str, Any]) -> bool:
    """JSON's \\uXXXX escapes can spell half a UTF-16 pair, which no UTF-8 text (or file) can hold."""
    try:
        json.dumps(row, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


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
