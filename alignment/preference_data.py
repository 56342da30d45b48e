"""Preference pairs: one canonical row format, loaders, validation, dedup, decontamination and split.

The canonical row is the one TRL's preference trainers read (conversational, explicit prompt):

    {"prompt": [{"role": "user", "content": "..."}],
     "chosen": [{"role": "assistant", "content": "..."}],
     "rejected": [{"role": "assistant", "content": "..."}],
     "id": "3f2a...", "source": "argilla", "annotator_agreement": 0.8}

`load_preference_rows` reads JSONL files or `datasets` directories holding canonical rows, plain
strings (`prompt`/`chosen`/`rejected`), implicit-prompt conversations (`chosen`/`rejected` message lists
sharing a prefix) or Anthropic-HH raw text ("\\n\\nHuman: ... \\n\\nAssistant: ..."), and splits the
implicit forms at the last assistant turn. `prepare_preferences` then validates, deduplicates,
decontaminates and splits them into `datasets.Dataset`s, and says what it removed and why.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections import defaultdict
from pathlib import Path
from typing import Any, Literal

from datasets import Dataset
from pydantic import Field, field_validator

from alignment import dedup
from alignment.config import StrictModel
from alignment.data_files import DataError, read_rows, write_jsonl
from alignment.messages import Message, checked_messages

log = logging.getLogger(__name__)

EXAMPLE_PREFERENCES = Path(__file__).parent / "data" / "preferences_house_style.jsonl"

# Why a row was removed; the report keys.
INVALID_REASONS = {
    "identical": "chosen and rejected are identical",
    "empty_response": "chosen or rejected response is empty",
    "prompt_mismatch": "chosen and rejected follow different prompts",
    "overlength": "prompt + response is longer than max_length tokens",
    "duplicate_id": "id already used by a different pair",
}


class PreferenceDataSettings(StrictModel):
    train: Path = Field(EXAMPLE_PREFERENCES, description="JSONL, datasets directory or Anthropic-HH JSONL.")
    eval: Path | None = Field(
        None, description="Held-out pairs; when unset, eval_fraction of train is held out."
    )
    eval_fraction: float = Field(
        0.1, ge=0, lt=1, description="Split by hashed id, so it is stable across runs."
    )
    max_length: int = Field(512, gt=8, description="Tokens of prompt + response, for either side of a pair.")
    on_invalid: Literal["drop", "error"] = Field(
        "drop", description="Invalid pairs (identical, empty, prompt mismatch, over-length): drop or fail."
    )
    dedup: bool = Field(True, description="Remove exact duplicate pairs.")
    near_dup_threshold: float | None = Field(
        0.9, gt=0, le=1, description="MinHash Jaccard above which a pair is a near-duplicate; null disables."
    )
    decontaminate_against: list[Path] = Field(
        default_factory=list, description="Eval sets whose prompts must not appear in training data."
    )
    decontamination_threshold: float = Field(
        0.8, gt=0, le=1, description="MinHash Jaccard between prompts counted as contamination."
    )

    @field_validator("decontaminate_against", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return [value] if isinstance(value, str | Path) else value


# --- ids and text --------------------------------------------------------------------------------


def as_messages(value: str | list[Message], role: str) -> list[Message]:
    """A bare string is one message of `role`; a message list is returned as is."""
    return [{"role": role, "content": value}] if isinstance(value, str) else value


def pair_id(prompt: str | list[Message], chosen: str | list[Message], rejected: str | list[Message]) -> str:
    """Stable content hash of a pair: the same pair gets the same id in every file and every run."""
    payload = [
        as_messages(prompt, "user"),
        as_messages(chosen, "assistant"),
        as_messages(rejected, "assistant"),
    ]
    canonical = json.dumps(
        [[{"role": m["role"], "content": m["content"]} for m in part] for part in payload],
        ensure_ascii=False,
        separators=(",", ":"),
    )
    # surrogatepass: a lone surrogate (from a Python caller; files reject them) still hashes.
    return hashlib.sha256(canonical.encode("utf-8", "surrogatepass")).hexdigest()[:16]


def messages_text(messages: list[Message]) -> str:
    return "\n".join(m["content"] for m in messages)


# --- loading -------------------------------------------------------------------------------------

_HH_TURN = re.compile(r"(?:^|\n\n)(Human|Assistant):[ \t]?")


def parse_hh_text(text: str, where: str) -> tuple[list[Message], Message]:
    """Anthropic-HH raw text -> (prompt messages, final assistant message), split at the last assistant turn."""
    parts = _HH_TURN.split(text)
    if len(parts) < 3 or parts[0].strip():
        raise DataError(f"{where}: text does not start with a 'Human:' or 'Assistant:' turn")
    messages = [
        {"role": "user" if speaker == "Human" else "assistant", "content": content.strip()}
        for speaker, content in zip(parts[1::2], parts[2::2], strict=True)
    ]
    return split_last_assistant(messages, where)


def split_last_assistant(messages: list[Message], where: str) -> tuple[list[Message], Message]:
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
    if last is None or last == 0:
        raise DataError(f"{where}: conversation has no assistant turn after a prompt")
    return messages[:last], messages[last]


def _validate_messages(value: Any, where: str, field: str) -> list[Message]:
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: {field!r} must be a string or a non-empty list of messages")
    return checked_messages(value, where, field)


def _response(value: Any, where: str, field: str) -> list[Message]:
    messages = _validate_messages(
        as_messages(value, "assistant") if isinstance(value, str) else value, where, field
    )
    if messages[-1]["role"] != "assistant":
        raise DataError(f"{where}: {field!r} must end with an assistant message")
    return messages


def to_canonical(row: dict[str, Any], where: str) -> dict[str, Any]:
    """Any supported row shape -> canonical row. Structural problems raise `DataError` naming `where`.

    Semantic problems (identical or empty responses) are left for `validate_pair`; a prompt that
    differs between the two sides of an implicit-prompt row is kept under `rejected_prompt`.
    """
    for key in ("chosen", "rejected"):
        if key not in row:
            raise DataError(f"{where}: missing {key!r} (keys: {sorted(row)})")
    rejected_prompt = None
    if row.get("prompt") is not None:
        prompt = row["prompt"]
        prompt = _validate_messages(
            as_messages(prompt, "user") if isinstance(prompt, str) else prompt, where, "prompt"
        )
        chosen = _response(row["chosen"], where, "chosen")
        rejected = _response(row["rejected"], where, "rejected")
    elif isinstance(row["chosen"], str) and isinstance(row["rejected"], str):
        prompt, chosen_msg = parse_hh_text(row["chosen"], f"{where}: chosen")
        rejected_prompt, rejected_msg = parse_hh_text(row["rejected"], f"{where}: rejected")
        chosen, rejected = [chosen_msg], [rejected_msg]
    elif isinstance(row["chosen"], list) and isinstance(row["rejected"], list):
        prompt, chosen_msg = split_last_assistant(_validate_messages(row["chosen"], where, "chosen"), where)
        rejected_prompt, rejected_msg = split_last_assistant(
            _validate_messages(row["rejected"], where, "rejected"), where
        )
        chosen, rejected = [chosen_msg], [rejected_msg]
    else:
        raise DataError(
            f"{where}: no 'prompt', and 'chosen'/'rejected' are neither Anthropic-HH text nor message lists"
        )
    out: dict[str, Any] = {"prompt": prompt, "chosen": chosen, "rejected": rejected}
    out["id"] = str(row["id"]) if row.get("id") is not None else pair_id(prompt, chosen, rejected)
    if row.get("source") is not None:
        out["source"] = str(row["source"])
    if (agreement := row.get("annotator_agreement")) is not None:
        if not isinstance(agreement, int | float) or not 0 <= agreement <= 1:
            raise DataError(f"{where}: annotator_agreement must be a number in [0, 1], got {agreement!r}")
        out["annotator_agreement"] = float(agreement)
    if rejected_prompt is not None and rejected_prompt != prompt:
        out["rejected_prompt"] = rejected_prompt
    return out


def load_located_rows(path: Path) -> list[tuple[str, dict[str, Any]]]:
    """(location, canonical row) pairs, the location being `file:line` or `dir[row i]`."""
    rows = [(where, to_canonical(row, where)) for where, row in read_rows(Path(path))]
    if not rows:
        raise DataError(f"{path}: no preference rows")
    return rows


def load_preference_rows(path: str | Path) -> list[dict[str, Any]]:
    """Canonical rows from a JSONL file or `datasets` directory (see module docstring for the shapes)."""
    return [row for _, row in load_located_rows(Path(path))]


def write_preference_rows(path: str | Path, rows: list[dict[str, Any]]) -> None:
    """Canonical rows -> JSONL (atomic). Rows without an id get their content hash."""
    keys = ("prompt", "chosen", "rejected", "id", "source", "annotator_agreement")
    out = []
    for row in rows:
        row = {**row, "id": row.get("id") or pair_id(row["prompt"], row["chosen"], row["rejected"])}
        out.append({k: row[k] for k in keys if row.get(k) is not None})
    write_jsonl(Path(path), out)


# --- validation ----------------------------------------------------------------------------------


def validate_pair(row: dict[str, Any]) -> str | None:
    """The reason (a key of INVALID_REASONS) this pair cannot be trained on, or None. Length is checked apart."""
    if "rejected_prompt" in row:
        return "prompt_mismatch"
    if not messages_text(row["chosen"]).strip() or not messages_text(row["rejected"]).strip():
        return "empty_response"
    if dedup.normalise(messages_text(row["chosen"])) == dedup.normalise(messages_text(row["rejected"])):
        return "identical"
    return None


def pair_lengths(rows: list[dict[str, Any]], tokenizer: Any) -> list[int]:
    """Token count of the longer side (prompt + chosen, prompt + rejected) of each pair, chat template applied."""
    if not rows:
        return []
    texts = [
        tokenizer.apply_chat_template(row["prompt"] + row[side], tokenize=False)
        for row in rows
        for side in ("chosen", "rejected")
    ]
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return [max(len(ids[2 * i]), len(ids[2 * i + 1])) for i in range(len(rows))]


# --- duplicates and contamination (the building blocks live in alignment.dedup) ------------------


def _pair_text(row: dict[str, Any]) -> str:
    return "\n".join(messages_text(row[k]) for k in ("prompt", "chosen", "rejected"))


def near_duplicates(rows: list[dict[str, Any]], threshold: float) -> dict[int, str]:
    """Index of each row that near-duplicates an earlier kept row -> that row's id (first one wins)."""
    return dedup.near_duplicates([(row["id"], _pair_text(row)) for row in rows], threshold)


def prompt_messages(row: dict[str, Any], where: str) -> list[Message]:
    """The prompt of any row prefloop reads: a preference pair, an SFT conversation (up to its last
    assistant turn), or a row with a `prompt` string or message list."""
    if "chosen" in row and "rejected" in row:
        return to_canonical(row, where)["prompt"]
    if "messages" in row:
        messages = _validate_messages(row["messages"], where, "messages")
        if any(m["role"] == "assistant" for m in messages[1:]):
            return split_last_assistant(messages, where)[0]
        return messages
    if isinstance(row.get("prompt"), str | list):
        prompt = row["prompt"]
        return _validate_messages(
            as_messages(prompt, "user") if isinstance(prompt, str) else prompt, where, "prompt"
        )
    raise DataError(f"{where}: row has no 'prompt', 'messages' or 'chosen'/'rejected' (keys: {sorted(row)})")


def eval_prompt_texts(path: Path) -> list[str]:
    """The prompt text of every row of an eval set (any row shape `prompt_messages` reads)."""
    return [messages_text(prompt_messages(row, where)) for where, row in read_rows(Path(path))]


def contaminated(rows: list[dict[str, Any]], eval_paths: list[Path], threshold: float) -> dict[int, str]:
    """Index of each row whose prompt matches (exactly or MinHash-near) an eval prompt -> the eval file."""
    index = dedup.EvalIndex({str(path): eval_prompt_texts(path) for path in eval_paths}, threshold)
    return index.contaminated(messages_text(row["prompt"]) for row in rows)


# --- split and prepare ---------------------------------------------------------------------------


def in_eval_split(row_id: str, eval_fraction: float) -> bool:
    """Deterministic: a row lands on the same side in every run, whatever the file order or size."""
    bucket = int(hashlib.sha256(row_id.encode()).hexdigest()[:8], 16) / 2**32
    return bucket < eval_fraction


def to_dataset(rows: list[dict[str, Any]]) -> Dataset:
    """Fixed columns, so optional metadata missing from some rows never changes the schema."""
    return Dataset.from_dict(
        {
            "prompt": [r["prompt"] for r in rows],
            "chosen": [r["chosen"] for r in rows],
            "rejected": [r["rejected"] for r in rows],
            "id": [r["id"] for r in rows],
            "source": [r.get("source") or "" for r in rows],
            "annotator_agreement": [r.get("annotator_agreement") for r in rows],
        }
    )


class _Cleaner:
    """Collects removed rows per reason; in 'error' mode the first invalid rows end the run."""

    def __init__(self, on_invalid: str) -> None:
        self.on_invalid = on_invalid
        self.removed: dict[str, list[str]] = defaultdict(list)
        self.problems: list[str] = []

    def invalid(self, where: str, row: dict[str, Any], reason: str) -> None:
        self.removed[reason].append(row["id"])
        self.problems.append(f"{where} (id={row['id']}): {INVALID_REASONS[reason]}")

    def raise_if_strict(self) -> None:
        if self.on_invalid == "error" and self.problems:
            shown = "\n  ".join(self.problems[:10])
            more = f"\n  ... and {len(self.problems) - 10} more" if len(self.problems) > 10 else ""
            raise DataError(f"{len(self.problems)} invalid preference pair(s):\n  {shown}{more}")


def _clean(
    located: list[tuple[str, dict[str, Any]]],
    settings: PreferenceDataSettings,
    tokenizer: Any,
    cleaner: _Cleaner,
) -> list[dict[str, Any]]:
    """Validation, then id collisions, then over-length; returns the valid rows in input order."""
    valid: list[tuple[str, dict[str, Any]]] = []
    seen_ids: dict[str, str] = {}
    for where, row in located:
        if reason := validate_pair(row):
            cleaner.invalid(where, row, reason)
            continue
        content = pair_id(row["prompt"], row["chosen"], row["rejected"])
        if seen_ids.setdefault(row["id"], content) != content:
            cleaner.invalid(where, row, "duplicate_id")
            continue
        valid.append((where, row))
    if tokenizer is not None:
        lengths = pair_lengths([row for _, row in valid], tokenizer)
        kept = []
        for (where, row), n in zip(valid, lengths, strict=True):
            if n > settings.max_length:
                cleaner.invalid(where, row, "overlength")
            else:
                kept.append((where, row))
        valid = kept
    cleaner.raise_if_strict()
    return [row for _, row in valid]


def _deduplicate(rows: list[dict[str, Any]], settings: PreferenceDataSettings, removed: dict) -> list[dict]:
    if settings.dedup:
        exact = dedup.exact_duplicates([pair_id(r["prompt"], r["chosen"], r["rejected"]) for r in rows])
        removed["exact_duplicate"].extend(rows[i]["id"] for i in sorted(exact))
        rows = [row for i, row in enumerate(rows) if i not in exact]
    if settings.near_dup_threshold is not None and len(rows) > 1:
        near = near_duplicates(rows, settings.near_dup_threshold)
        removed["near_duplicate"].extend(rows[i]["id"] for i in sorted(near))
        rows = [row for i, row in enumerate(rows) if i not in near]
    return rows


def prepare_preferences(
    settings: PreferenceDataSettings, tokenizer: Any = None
) -> tuple[Dataset, Dataset | None, dict[str, Any]]:
    """Load, validate, deduplicate, decontaminate and split; returns (train, eval or None, report).

    The report counts every removed row by reason and lists their ids, so a user can find them.
    Without a tokenizer the over-length check is skipped.
    """
    located = load_located_rows(settings.train)
    cleaner = _Cleaner(settings.on_invalid)
    rows = _clean(located, settings, tokenizer, cleaner)
    rows = _deduplicate(rows, settings, cleaner.removed)
    if settings.decontaminate_against:
        hits = contaminated(rows, settings.decontaminate_against, settings.decontamination_threshold)
        cleaner.removed["contaminated"].extend(rows[i]["id"] for i in sorted(hits))
        rows = [row for i, row in enumerate(rows) if i not in hits]

    eval_rows: list[dict[str, Any]] = []
    if settings.eval is not None:
        eval_cleaner = _Cleaner(settings.on_invalid)
        eval_rows = _clean(load_located_rows(settings.eval), settings, tokenizer, eval_cleaner)
        for reason, ids in eval_cleaner.removed.items():
            cleaner.removed[f"eval_{reason}"].extend(ids)
    elif settings.eval_fraction > 0:
        eval_rows = [r for r in rows if in_eval_split(r["id"], settings.eval_fraction)]
        rows = [r for r in rows if not in_eval_split(r["id"], settings.eval_fraction)]
    if not rows:
        raise DataError(
            f"{settings.train}: no training pairs left after cleaning ({_summary(cleaner.removed)})"
        )

    removed = {reason: ids for reason, ids in cleaner.removed.items() if ids}
    report: dict[str, Any] = {
        "rows_read": len(located),
        "train_pairs": len(rows),
        "eval_pairs": len(eval_rows),
        "removed": {reason: len(ids) for reason, ids in removed.items()},
        "removed_ids": removed,
    }
    if removed:
        log.warning("preference data %s: removed %s", settings.train, _summary(removed))
    return to_dataset(rows), (to_dataset(eval_rows) if eval_rows else None), report


def _summary(removed: dict[str, list[str]]) -> str:
    return ", ".join(f"{len(ids)} {reason}" for reason, ids in removed.items() if ids) or "nothing removed"
