"""`prefloop annotate pull`: submitted votes -> a versioned preference dataset in TRL's format.

Per record: majority vote over submitted responses (records under `min_votes`, without a unique
majority, or whose majority is tie / both bad are left out and counted), the displayed A/B mapped
back through the stored order, and the share of votes agreeing with the majority as the row's
`annotator_agreement`. Each pull writes `<output_dir>/<dataset>/v<N>/` with `preferences.jsonl`
(canonical rows), `votes.jsonl` (every vote, for audits) and `manifest.json` (counts, agreement,
position bias, provenance).
"""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import argilla as rg

from alignment.preference_data import write_preference_rows
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


def next_version_dir(root: Path) -> Path:
    versions = [int(p.name[1:]) for p in root.glob("v*") if p.name[1:].isdigit()]
    return root / f"v{max(versions, default=0) + 1}"


@dataclass
class PullResult:
    directory: Path
    rows: int
    skipped: dict[str, int]
    agreement: AgreementReport
    position_bias: float | None


def pull(client: rg.Argilla, dataset_settings: DatasetSettings, settings: PullSettings) -> PullResult:
    from annotation.push import get_dataset

    dataset = get_dataset(client, dataset_settings)
    records = fetch_annotated(client, dataset)
    source = f"argilla:{dataset_settings.workspace}/{dataset_settings.name}"
    aggregation = aggregate(records, settings, source)
    votes: Votes = {r.id: r.votes for r in records}
    report = agreement_report(votes, settings.agreement_threshold)
    bias = position_bias(records)

    directory = next_version_dir(Path(settings.output_dir) / dataset_settings.name)
    directory.mkdir(parents=True)
    write_preference_rows(directory / "preferences.jsonl", aggregation.rows)
    with (directory / "votes.jsonl").open("w") as fh:
        fh.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in aggregation.audit)
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
    (directory / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return PullResult(directory, len(aggregation.rows), dict(aggregation.skipped), report, bias)
