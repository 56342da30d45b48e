"""`prefloop annotate pull`: submitted votes -> a versioned preference dataset in TRL's format.

Per record: majority vote over submitted responses (records under `min_votes`, without a unique
majority, or whose majority is tie / both bad are left out and counted), the displayed A/B mapped
back through the stored order, and the share of votes agreeing with the majority as the row's
`annotator_agreement`. A pull whose result differs from the latest version publishes
`<output_dir>/<dataset>/v<N>/` with `preferences.jsonl` (canonical rows), `votes.jsonl` (every
vote, for audits) and `manifest.json` (counts, agreement, position bias, provenance, content hash),
staged and renamed into place (`alignment.versioned_dirs`); the same votes again give the same
version, and a killed pull leaves no `v<N>`.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import argilla as rg

from alignment.preference_data import write_preference_rows
from alignment.versioned_dirs import locked, next_number, remove_incomplete, staged_dir
from annotation.agreement import AgreementReport, Votes, agreement_report, majority
from annotation.config import DatasetSettings, PullSettings
from annotation.preference_dataset import NO_PAIR_LABELS, PREFERENCE, unmap_vote


@dataclass
class AnnotatedRecord:
    id: str
    prompt: list[dict[str, str]]
    response_a: str
    response_b: str
    swapped: bool
    votes: dict[str, str]  # annotator -> "a" | "b" | "tie" | "both_bad"


@dataclass
class Aggregation:
    rows: list[dict] = field(default_factory=list)
    audit: list[dict] = field(default_factory=list)
    skipped: Counter[str] = field(default_factory=Counter)


def fetch_annotated(client: rg.Argilla, dataset: rg.Dataset) -> list[AnnotatedRecord]:
    """Records with at least one submitted response, with usernames instead of user ids."""
    usernames = {str(u.id): u.username for u in client.users}
    query = rg.Query(filter=rg.Filter(("response.status", "==", "submitted")))
    out = []
    for record in dataset.records(query=query, with_responses=True, with_suggestions=False):
        responses = record.responses[PREFERENCE] or []
        votes = {
            usernames.get(str(r.user_id), str(r.user_id)): r.value
            for r in responses
            if getattr(r.status, "value", r.status) == "submitted"
        }
        if not votes:
            continue
        conversation = record.fields["conversation"]
        out.append(
            AnnotatedRecord(
                id=str(record.id),
                prompt=[_message(m) for m in conversation],
                response_a=record.fields["response_a"],
                response_b=record.fields["response_b"],
                swapped=record.metadata.get("swapped") == "yes",
                votes=votes,
            )
        )
    return out


def _message(value: object) -> dict[str, str]:
    # the SDK returns ChatFieldValue models; plain dicts when the record came from elsewhere
    get = value.get if isinstance(value, dict) else lambda key: getattr(value, key)
    return {"role": get("role"), "content": get("content")}


def aggregate(records: list[AnnotatedRecord], settings: PullSettings, source: str) -> Aggregation:
    result = Aggregation()
    for record in records:
        labels = list(record.votes.values())
        winner = majority(labels) if len(labels) >= settings.min_votes else None
        result.audit.append(
            {
                "id": record.id,
                "votes": record.votes,
                "winner": winner,
                "swapped": record.swapped,
                "winner_position": unmap_vote(winner, record.swapped) if winner else None,
            }
        )
        if len(labels) < settings.min_votes:
            result.skipped["too_few_votes"] += 1
            continue
        if winner is None:
            result.skipped["no_majority"] += 1
            continue
        if winner in NO_PAIR_LABELS:
            result.skipped[winner] += 1
            continue
        chosen, rejected = (
            (record.response_a, record.response_b)
            if winner == "a"
            else (record.response_b, record.response_a)
        )
        result.rows.append(
            {
                "id": record.id,
                "prompt": record.prompt,
                "chosen": [{"role": "assistant", "content": chosen}],
                "rejected": [{"role": "assistant", "content": rejected}],
                "source": source,
                "annotator_agreement": round(labels.count(winner) / len(labels), 4),
            }
        )
    return result


def position_bias(records: list[AnnotatedRecord]) -> float | None:
    """Share of A among A/B votes: ~0.5 when annotators judge content, not slot."""
    ab = [v for r in records for v in r.votes.values() if v in ("a", "b")]
    return ab.count("a") / len(ab) if ab else None


VERSION_PATTERN = r"v(\d+)"
MANIFEST = "manifest.json"


def _is_complete(path: Path) -> bool:
    return (path / MANIFEST).is_file()


def content_hash(aggregation: Aggregation, manifest: dict) -> str:
    """What a pull produced, without when it ran: two pulls of the same votes hash the same."""
    stable = {k: v for k, v in manifest.items() if k != "pulled_at"}
    body = json.dumps([aggregation.rows, aggregation.audit, stable], sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(body.encode()).hexdigest()


def latest_version_dir(root: Path) -> Path | None:
    complete = [p for p in root.glob("v*") if re.fullmatch(VERSION_PATTERN, p.name) and _is_complete(p)]
    return max(complete, key=lambda p: int(p.name[1:]), default=None)


@dataclass
class PullResult:
    directory: Path
    rows: int
    skipped: dict[str, int]
    agreement: AgreementReport
    position_bias: float | None
    unchanged: bool = False  # the votes gave exactly the latest version again: no new folder


def write_version(root: Path, aggregation: Aggregation, manifest: dict) -> tuple[Path, bool]:
    """Publish `aggregation` as the next `v<N>` under `root` (staged, then renamed), unless it equals
    the latest version; returns (folder, unchanged)."""
    digest = content_hash(aggregation, manifest)
    with locked(root):
        remove_incomplete(root, VERSION_PATTERN, _is_complete)
        latest = latest_version_dir(root)
        if latest is not None and json.loads((latest / MANIFEST).read_text()).get("content_hash") == digest:
            return latest, True
        name = f"v{next_number(root, VERSION_PATTERN)}"
        with staged_dir(root, name) as staging:
            write_preference_rows(staging / "preferences.jsonl", aggregation.rows)
            with (staging / "votes.jsonl").open("w") as fh:
                fh.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in aggregation.audit)
            # written last: a folder with a manifest is a complete version
            (staging / MANIFEST).write_text(json.dumps({**manifest, "content_hash": digest}, indent=2))
        return root / name, False


def pull(client: rg.Argilla, dataset_settings: DatasetSettings, settings: PullSettings) -> PullResult:
    from annotation.push import get_dataset

    dataset = get_dataset(client, dataset_settings)
    records = fetch_annotated(client, dataset)
    source = f"argilla:{dataset_settings.workspace}/{dataset_settings.name}"
    aggregation = aggregate(records, settings, source)
    votes: Votes = {r.id: r.votes for r in records}
    report = agreement_report(votes, settings.agreement_threshold)
    bias = position_bias(records)
    manifest = {
        "source": source,
        "argilla_url": client.api_url,
        "dataset_id": str(dataset.id),
        "pulled_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "records_with_votes": len(records),
        "pairs": len(aggregation.rows),
        "skipped": dict(aggregation.skipped),
        "settings": settings.model_dump(mode="json"),
        "agreement": report.as_dict(),
        "position_bias_share_a": bias,
    }
    directory, unchanged = write_version(
        Path(settings.output_dir) / dataset_settings.name, aggregation, manifest
    )
    return PullResult(directory, len(aggregation.rows), dict(aggregation.skipped), report, bias, unchanged)
