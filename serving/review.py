"""Human review of feedback pairs in Argilla before they are trained on (`feedback ingest --review`).

Production pairs are pushed with `annotation.push` (record ids are content hashes, so pushing the
next dataset version again adds only the new pairs), annotators vote as for any other pair, and
`annotation.pull` aggregates the votes. The reviewed pairs become `<output_dir>/reviewed/vNNNN`,
a dataset version of its own that the loop trains on instead of the raw feedback.
"""

from __future__ import annotations

import hashlib
import tempfile
from pathlib import Path

from alignment.config import load_config
from alignment.preference_data import load_preference_rows
from serving.ingest import DatasetVersion, write_version

DEFAULT_ANNOTATION_CONFIG = Path("configs/annotation.yaml")


def _annotation(config_path: Path | None, dataset: str):  # -> AnnotationConfig
    from annotation.config import AnnotationConfig

    path = config_path or (DEFAULT_ANNOTATION_CONFIG if DEFAULT_ANNOTATION_CONFIG.is_file() else None)
    config = load_config(AnnotationConfig, path)
    config.dataset.name = dataset
    return config


def push_for_review(
    data: DatasetVersion, config_path: Path | None = None, dataset: str = "feedback-review"
) -> str:
    """Push a dataset version's pairs; returns the Argilla dataset name."""
    from annotation.preference_dataset import CandidatePair
    from annotation.push import push_pairs
    from annotation.workspace import resolve_connection

    config = _annotation(config_path, dataset)
    pairs = []
    for row in load_preference_rows(data.preference_file):
        chosen, rejected = row["chosen"][-1]["content"], row["rejected"][-1]["content"]
        # Show the user's pick first or second at random (stable per pair): no position bias.
        if hashlib.sha256(row["id"].encode()).digest()[0] % 2:
            chosen, rejected = rejected, chosen
        pairs.append(
            CandidatePair(row["prompt"], chosen, rejected, source=f"feedback:{row.get('source', '')}")
        )
    push_pairs(resolve_connection(config.server).client(), config.dataset, pairs)
    return f"{config.dataset.workspace}/{config.dataset.name}"


def pull_reviewed(
    data: DatasetVersion, output_dir: Path, config_path: Path | None = None, dataset: str = "feedback-review"
) -> DatasetVersion:
    """Aggregate the votes so far into `<output_dir>/reviewed/vNNNN` (KTO rows carried over from `data`)."""
    import json

    from annotation.pull import pull
    from annotation.workspace import resolve_connection

    config = _annotation(config_path, dataset)
    with tempfile.TemporaryDirectory() as tmp:
        config.pull.output_dir = tmp
        result = pull(resolve_connection(config.server).client(), config.dataset, config.pull)
        rows = load_preference_rows(result.directory / "preferences.jsonl") if result.rows else []
    kto = (
        [json.loads(line) for line in data.kto_file.read_text().splitlines()]
        if data.kto_file.is_file()
        else []
    )
    reviewed = write_version(Path(output_dir) / "reviewed", rows, kto, {"reviewed_from": data.version})
    # The registry records data versions relative to the ingest output dir.
    return DatasetVersion(
        f"reviewed/{reviewed.version}",
        reviewed.path,
        reviewed.pairs,
        reviewed.kto,
        reviewed.new_pairs,
        reviewed.unchanged,
    )


def review_version(
    data: DatasetVersion, output_dir: Path, config_path: Path | None = None, dataset: str = "feedback-review"
) -> DatasetVersion:
    """The loop's review step: push what is new, train on what has been reviewed so far."""
    push_for_review(data, config_path, dataset)
    return pull_reviewed(data, output_dir, config_path, dataset)
