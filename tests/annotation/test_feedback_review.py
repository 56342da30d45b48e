"""Production feedback through human review (`feedback ingest --review`, the loop's review step) on a
real Argilla server: pushed pairs are voted on, and the reviewed dataset version keeps what reviewers
agreed with, flips what they overturned and leaves out what they have not seen yet."""

from __future__ import annotations

import json
from pathlib import Path
from uuid import uuid4

import pytest

from annotation.push import get_dataset
from annotation.users import add_user
from serving.ingest import write_version
from serving.review import review_version
from tests.annotation.test_workflow import Annotator

pytestmark = pytest.mark.argilla


def feedback_rows() -> list[dict]:
    return [
        {
            "id": f"fb-{i}",
            "prompt": [{"role": "user", "content": f"Feedback question {i}?"}],
            "chosen": [{"role": "assistant", "content": f"The answer the user picked for {i}."}],
            "rejected": [{"role": "assistant", "content": f"The answer the user passed over for {i}."}],
            "source": "thumbs",
        }
        for i in range(3)
    ]


def test_review_round_trip_keeps_agreed_flips_overturned_and_waits_for_the_rest(
    argilla_sqlite, dataset_settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, conn = argilla_sqlite
    monkeypatch.setenv("ARGILLA_API_URL", conn.url)
    monkeypatch.setenv("ARGILLA_API_KEY", conn.api_key)
    config = tmp_path / "annotation.yaml"
    config.write_text("dataset:\n  workspace: tests\n  min_submitted: 2\npull:\n  min_votes: 2\n")
    kto = [{"id": "k-1", "prompt": [{"role": "user", "content": "hi"}], "completion": [], "label": True}]
    data = write_version(tmp_path / "feedback", feedback_rows(), kto)

    nothing_yet = review_version(data, tmp_path / "feedback", config, dataset_settings.name)
    assert nothing_yet.pairs == 0  # pushed, not reviewed: nothing to train on yet
    assert nothing_yet.kto == 1  # unpaired thumbs are carried over untouched

    client = conn.client()
    dataset = get_dataset(client, dataset_settings)
    reviewers = [
        Annotator(conn.url, str(dataset.id), add_user(client, f"rev{i}-{uuid4().hex[:8]}", "tests").api_key)
        for i in (1, 2)
    ]
    assert len(reviewers[0].pending()) == 3

    def vote_for(text: str) -> None:
        record = next(
            r
            for r in reviewers[0].pending()
            if text in (r["fields"]["response_a"], r["fields"]["response_b"])
        )
        label = "a" if record["fields"]["response_a"] == text else "b"
        for reviewer in reviewers:
            reviewer.vote(record["external_id"], label)

    vote_for("The answer the user picked for 0.")  # reviewers agree with the user
    vote_for("The answer the user passed over for 1.")  # reviewers overturn the user
    reviewed = review_version(
        data, tmp_path / "feedback", config, dataset_settings.name
    )  # pair 2: unreviewed

    assert reviewed.version.startswith("reviewed/") and reviewed.pairs == 2 and reviewed.kto == 1
    rows = {
        r["prompt"][0]["content"]: r
        for r in map(json.loads, reviewed.preference_file.read_text().splitlines())
    }
    assert set(rows) == {"Feedback question 0?", "Feedback question 1?"}
    assert rows["Feedback question 0?"]["chosen"][-1]["content"] == "The answer the user picked for 0."
    assert rows["Feedback question 1?"]["chosen"][-1]["content"] == "The answer the user passed over for 1."
    assert json.loads(reviewed.kto_file.read_text().splitlines()[0])["id"] == "k-1"
