"""Feedback -> versioned, deduplicated preference data.

Rules (each pair remembers which rule produced it, in `source`):
- pairwise pick            -> chosen = picked response, rejected = the other one;
- corrected response        -> chosen = the correction, rejected = the original response;
- star ratings, same prompt -> the higher-rated response over the lower one, if the mean ratings
                               differ by at least `min_rating_gap`;
- thumbs, same prompt       -> thumbs-up responses over thumbs-down responses;
- thumbs with no opposite   -> unpaired KTO rows (`label` true/false).

A pair voted both ways keeps the direction with more votes (a tie drops it). Rows are in TRL's
conversational format. Every run that changes the data writes a new `vNNNN/` directory
(preference.jsonl, kto.jsonl, manifest.json), staged, fsynced and renamed into place
(`alignment.versioned_dirs`), so a trainer never reads a half-written version and a killed ingest
leaves nothing that counts; an unchanged result reuses the latest version.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter, defaultdict
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path
from typing import Any

from alignment.data_files import read_jsonl, write_jsonl
from alignment.preference_data import pair_id, write_preference_rows
from alignment.versioned_dirs import locked, next_number, remove_incomplete, staged_dir
from serving.feedback_store import Completion, Feedback, FeedbackStore, feedback_with_completions, utcnow

MANIFEST = "manifest.json"
VERSION_PATTERN = r"v(\d{4})"


@dataclass(frozen=True)
class DatasetVersion:
    version: str
    path: Path
    pairs: int
    kto: int
    new_pairs: int  # pairs not in the previous version
    unchanged: bool = False

    @property
    def preference_file(self) -> Path:
        return self.path / "preference.jsonl"

    @property
    def kto_file(self) -> Path:
        return self.path / "kto.jsonl"


def _assistant(text: str) -> list[dict[str, str]]:
    return [{"role": "assistant", "content": text}]


def _row_id(*parts: str) -> str:
    return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()[:16]


def build_examples(
    records: list[tuple[Feedback, Completion, Completion | None]], min_rating_gap: int = 2
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(preference rows, KTO rows) from feedback joined with the completions it refers to."""
    prompts: dict[str, list[dict[str, Any]]] = {}
    votes: Counter[tuple[str, str, str]] = Counter()  # (prompt_hash, chosen, rejected) -> votes
    sources: dict[tuple[str, str, str], str] = {}
    stars: dict[str, list[int]] = defaultdict(list)  # completion id -> ratings
    thumbs: Counter[str] = Counter()  # completion id -> net thumbs
    by_prompt: dict[str, dict[str, Completion]] = defaultdict(dict)

    def vote(c: Completion, chosen: str, rejected: str, source: str) -> None:
        if chosen.strip() and chosen != rejected:
            key = (c.prompt_hash, chosen, rejected)
            votes[key] += 1
            sources.setdefault(key, source)

    for fb, completion, rejected in records:
        prompts[completion.prompt_hash] = completion.prompt
        by_prompt[completion.prompt_hash][completion.id] = completion
        if fb.kind == "pairwise" and rejected is not None:
            vote(completion, completion.response, rejected.response, "pairwise")
        elif fb.kind == "rating" and fb.value is not None:
            stars[completion.id].append(fb.value)
        elif fb.kind == "thumbs" and fb.value is not None:
            thumbs[completion.id] += fb.value
        if fb.corrected_response:
            vote(completion, fb.corrected_response, completion.response, "correction")

    kto_rows: list[dict[str, Any]] = []
    for prompt, completions in by_prompt.items():
        rated = [(sum(stars[c]) / len(stars[c]), completions[c]) for c in completions if stars[c]]
        for (score_a, a), (score_b, b) in combinations(rated, 2):
            if abs(score_a - score_b) >= min_rating_gap:
                hi, lo = (a, b) if score_a > score_b else (b, a)
                vote(hi, hi.response, lo.response, "rating")
        liked = [completions[c] for c in completions if thumbs[c] > 0]
        disliked = [completions[c] for c in completions if thumbs[c] < 0]
        for up in liked:
            for down in disliked:
                vote(up, up.response, down.response, "thumbs")
        if not (liked and disliked):
            for c in liked + disliked:
                kto_rows.append(
                    {
                        "prompt": prompts[prompt],
                        "completion": _assistant(c.response),
                        "label": thumbs[c.id] > 0,
                        "id": _row_id(prompt, c.response, str(thumbs[c.id] > 0)),
                        "source": "thumbs",
                    }
                )

    pairs = []
    for (prompt, chosen, rejected), n in votes.items():
        if n > votes[(prompt, rejected, chosen)]:  # contradicting votes: the majority wins, a tie drops it
            pairs.append(
                {
                    "prompt": prompts[prompt],
                    "chosen": _assistant(chosen),
                    "rejected": _assistant(rejected),
                    "id": pair_id(prompts[prompt], _assistant(chosen), _assistant(rejected)),
                    "source": sources[(prompt, chosen, rejected)],
                }
            )
    pairs.sort(key=lambda r: r["id"])  # stable order: the same feedback always gives the same file
    kto_rows = sorted({r["id"]: r for r in kto_rows}.values(), key=lambda r: r["id"])
    return pairs, kto_rows


def _versions(output_dir: Path) -> list[Path]:
    return sorted(p for p in output_dir.glob("v[0-9][0-9][0-9][0-9]") if (p / MANIFEST).is_file())


def load_version(path: Path) -> DatasetVersion:
    manifest = json.loads((path / MANIFEST).read_text())
    return DatasetVersion(
        manifest["version"], path, manifest["pairs"], manifest["kto"], manifest["new_pairs"]
    )


def latest_version(output_dir: Path) -> DatasetVersion | None:
    versions = _versions(Path(output_dir))
    return load_version(versions[-1]) if versions else None


def pair_ids(version: DatasetVersion | None) -> set[str]:
    if version is None or not version.preference_file.is_file():
        return set()
    return {row["id"] for _, row in read_jsonl(version.preference_file)}


def write_version(
    output_dir: Path,
    pairs: list[dict[str, Any]],
    kto_rows: list[dict[str, Any]],
    meta: dict[str, Any] | None = None,
) -> DatasetVersion:
    """Write pairs as the next version, unless they equal the latest version's content."""
    output_dir = Path(output_dir)
    digest = _row_id(*(r["id"] for r in pairs), "|", *(r["id"] for r in kto_rows))
    with locked(output_dir):
        remove_incomplete(output_dir, VERSION_PATTERN, lambda p: (p / MANIFEST).is_file())
        previous = latest_version(output_dir)
        if previous is not None:
            manifest = json.loads((previous.path / MANIFEST).read_text())
            if manifest.get("content_hash") == digest:
                return DatasetVersion(
                    previous.version, previous.path, previous.pairs, previous.kto, 0, unchanged=True
                )
        version = f"v{next_number(output_dir, VERSION_PATTERN):04d}"
        new_pairs = len({r["id"] for r in pairs} - pair_ids(previous))
        manifest = {
            "version": version,
            "created_at": utcnow().isoformat(),
            "parent": previous.version if previous else None,
            "pairs": len(pairs),
            "kto": len(kto_rows),
            "new_pairs": new_pairs,
            "content_hash": digest,
            "sources": dict(Counter(r["source"] for r in pairs)),
            **(meta or {}),
        }
        with staged_dir(output_dir, version) as staging:
            write_preference_rows(staging / "preference.jsonl", pairs)
            write_jsonl(staging / "kto.jsonl", kto_rows)
            (staging / MANIFEST).write_text(json.dumps(manifest, indent=2))  # last: marks it complete
    return DatasetVersion(version, output_dir / version, len(pairs), len(kto_rows), new_pairs)


def ingest(store: FeedbackStore, output_dir: Path, min_rating_gap: int = 2) -> DatasetVersion:
    """Turn all feedback in the store into the next dataset version."""
    with store.session() as session:
        records = feedback_with_completions(session)
    pairs, kto_rows = build_examples(records, min_rating_gap)
    meta = {
        "min_rating_gap": min_rating_gap,
        "feedback_rows": len(records),
        "last_feedback_id": max((f.id for f, _, _ in records), default=0),
    }
    return write_version(output_dir, pairs, kto_rows, meta)
