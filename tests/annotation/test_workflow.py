"""Push -> annotate -> pull against the real Argilla server (SQLite): idempotence, per-annotator
queues, overlap completion, aggregation and agreement on hand-made votes, and A/B un-mapping."""

from __future__ import annotations

import json

import httpx
import pytest

from annotation.agreement import cohen_kappa
from annotation.config import PullSettings
from annotation.preference_dataset import CandidatePair, is_swapped, record_id
from annotation.pull import pull
from annotation.push import get_dataset, push_pairs
from annotation.users import add_user

pytestmark = pytest.mark.argilla

PENDING_FOR_ME = {
    "filters": {
        "and": [
            {"type": "terms", "scope": {"entity": "response", "property": "status"}, "values": ["pending"]},
            {"type": "terms", "scope": {"entity": "record", "property": "status"}, "values": ["pending"]},
        ]
    }
}


def pairs(n: int, margins: list[float] | None = None) -> list[CandidatePair]:
    margins = margins or [None] * n  # type: ignore[list-item]
    return [
        CandidatePair(
            prompt=[{"role": "user", "content": f"Question number {i}?"}],
            first=f"first answer to {i}",
            second=f"a different second reply for {i}",
            first_reward=None if m is None else m,
            second_reward=None if m is None else 0.0,
        )
        for i, m in enumerate(margins)
    ]


class Annotator:
    def __init__(self, url: str, dataset_id: str, api_key: str) -> None:
        self.url, self.dataset_id, self.headers = url, dataset_id, {"X-Argilla-Api-Key": api_key}

    def pending(self) -> list[dict]:
        """What the annotation page lists: my pending records among the dataset's pending ones."""
        response = httpx.post(
            f"{self.url}/api/v1/me/datasets/{self.dataset_id}/records/search",
            json=PENDING_FOR_ME,
            params={"limit": 100},
            headers=self.headers,
            timeout=30,
        )
        assert response.status_code == 200, response.text
        return [item["record"] for item in response.json()["items"]]

    def vote(self, external_id: str, label: str) -> None:
        record = next(r for r in self.pending() if r["external_id"] == external_id)
        response = httpx.post(
            f"{self.url}/api/v1/records/{record['id']}/responses",
            json={"values": {"preference": {"value": label}}, "status": "submitted"},
            headers=self.headers,
            timeout=30,
        )
        assert response.status_code == 201, response.text


@pytest.fixture(scope="module")
def team(argilla_sqlite) -> dict:
    _, conn = argilla_sqlite
    client = conn.client()
    creds = {name: add_user(client, f"{name}-wf", "tests") for name in ("ann1", "ann2", "ann3")}
    return {"conn": conn, "client": client, "creds": creds}


def annotators(team: dict, dataset_settings) -> dict[str, Annotator]:
    dataset = get_dataset(team["client"], dataset_settings)
    return {n: Annotator(team["conn"].url, str(dataset.id), c.api_key) for n, c in team["creds"].items()}


def test_push_is_idempotent_and_order_independent(team, dataset_settings) -> None:
    batch = pairs(4)
    assert push_pairs(team["client"], dataset_settings, batch) == 4
    push_pairs(team["client"], dataset_settings, batch)
    flipped = [CandidatePair(p.prompt, p.second, p.first) for p in batch]  # same pair, other order
    push_pairs(team["client"], dataset_settings, flipped)
    dataset = get_dataset(team["client"], dataset_settings)
    external_ids = [r.id for r in dataset.records]
    assert sorted(external_ids) == sorted(record_id(p) for p in batch)


def test_records_are_served_uncertainty_first(team, dataset_settings) -> None:
    batch = pairs(4, margins=[3.0, 0.1, 2.0, 0.5])
    push_pairs(team["client"], dataset_settings, batch)
    queue = [r["external_id"] for r in annotators(team, dataset_settings)["ann1"].pending()]
    assert queue == [record_id(batch[i]) for i in (1, 3, 2, 0)]


def test_annotators_see_only_their_pending_records(team, dataset_settings) -> None:
    batch = pairs(3)
    push_pairs(team["client"], dataset_settings, batch)
    ann = annotators(team, dataset_settings)
    ann["ann1"].vote(record_id(batch[0]), "a")
    mine = {r["external_id"] for r in ann["ann1"].pending()}
    theirs = {r["external_id"] for r in ann["ann2"].pending()}
    assert record_id(batch[0]) not in mine and len(mine) == 2
    assert record_id(batch[0]) in theirs and len(theirs) == 3


def test_overlap_completes_a_record_after_min_submitted(team, dataset_settings) -> None:
    batch = pairs(2)
    push_pairs(team["client"], dataset_settings, batch)
    ann = annotators(team, dataset_settings)
    target = record_id(batch[0])
    ann["ann1"].vote(target, "a")
    assert target in {r["external_id"] for r in ann["ann3"].pending()}  # 1 of 2 votes: still open
    ann["ann2"].vote(target, "b")
    assert target not in {r["external_id"] for r in ann["ann3"].pending()}  # completed: off everyone's queue
    progress = get_dataset(team["client"], dataset_settings).progress()
    assert (progress["total"], progress["completed"], progress["pending"]) == (2, 1, 1)


def test_pull_aggregates_votes_unmaps_positions_and_reports_agreement(
    team, dataset_settings, tmp_path
) -> None:
    dataset_settings.min_submitted = 3
    batch = pairs(6)
    push_pairs(team["client"], dataset_settings, batch)
    ann = annotators(team, dataset_settings)
    ids = [record_id(p) for p in batch]
    # record -> votes of ann1, ann2, ann3 (None = no vote)
    plan = {
        ids[0]: ("a", "a", "b"),  # majority a, agreement 2/3
        ids[1]: ("b", "b", "b"),  # unanimous b
        ids[2]: ("tie", "tie", "a"),  # majority tie -> excluded
        ids[3]: ("a", "b", "both_bad"),  # no majority -> excluded
        ids[4]: ("a", None, None),  # one vote < min_votes -> excluded
        ids[5]: ("both_bad", "both_bad", "both_bad"),  # excluded
    }
    for rid, votes in plan.items():
        for name, label in zip(("ann1", "ann2", "ann3"), votes, strict=True):
            if label:
                ann[name].vote(rid, label)

    result = pull(team["client"], dataset_settings, PullSettings(min_votes=2, output_dir=str(tmp_path)))
    rows = [json.loads(line) for line in (result.directory / "preferences.jsonl").read_text().splitlines()]
    assert result.directory.name == "v1" and result.rows == 2
    assert result.skipped == {"tie": 1, "no_majority": 1, "too_few_votes": 1, "both_bad": 1}

    by_id = {r["id"]: r for r in rows}
    for rid, pair, winner in ((ids[0], batch[0], "a"), (ids[1], batch[1], "b")):
        # un-map the screen position through the stored order: A shows `second` when swapped
        shown_a, shown_b = (pair.second, pair.first) if is_swapped(rid) else (pair.first, pair.second)
        chosen, rejected = (shown_a, shown_b) if winner == "a" else (shown_b, shown_a)
        assert by_id[rid]["chosen"] == [{"role": "assistant", "content": chosen}]
        assert by_id[rid]["rejected"] == [{"role": "assistant", "content": rejected}]
        assert by_id[rid]["prompt"] == pair.prompt
    assert by_id[ids[0]]["annotator_agreement"] == pytest.approx(2 / 3, abs=1e-3)
    assert by_id[ids[1]]["annotator_agreement"] == 1.0
    assert all(r["source"] == f"argilla:tests/{dataset_settings.name}" for r in rows)

    audit = {a["id"]: a for a in map(json.loads, (result.directory / "votes.jsonl").read_text().splitlines())}
    # a vote for B picked the pair's `second` response, unless the record showed them swapped
    assert audit[ids[1]]["winner_position"] == ("first" if is_swapped(ids[1]) else "second")

    # agreement numbers equal the textbook formula on the same votes
    u1, u2 = "ann1-wf", "ann2-wf"
    shared = [v for v in plan.values() if v[0] and v[1]]
    assert result.agreement.pairwise_kappa[(u1, u2)] == pytest.approx(
        cohen_kappa([v[0] for v in shared], [v[1] for v in shared])
    )
    manifest = json.loads((result.directory / "manifest.json").read_text())
    assert manifest["pairs"] == 2 and manifest["agreement"]["krippendorff_alpha"] == result.agreement.alpha

    again = pull(team["client"], dataset_settings, PullSettings(min_votes=2, output_dir=str(tmp_path)))
    # the same votes: the same version, not a copy of it (issue 12)
    assert again.directory == result.directory and again.unchanged
    assert sorted(p.name for p in result.directory.parent.iterdir()) == [".lock", "v1"]
    stricter = pull(team["client"], dataset_settings, PullSettings(min_votes=3, output_dir=str(tmp_path)))
    # another result is the next version; a pull never overwrites an earlier dataset
    assert stricter.directory.name == "v2" and not stricter.unchanged
    assert (result.directory / "preferences.jsonl").read_text().count("\n") == 2


def test_dataset_is_created_from_the_declared_settings(team, dataset_settings) -> None:
    dataset_settings.min_submitted = 3
    dataset_settings.ratings = False
    dataset_settings.guidelines = "Be fair."
    push_pairs(team["client"], dataset_settings, pairs(1))
    dataset = get_dataset(team["client"], dataset_settings)
    assert [q.name for q in dataset.settings.questions] == ["preference", "rationale"]
    assert [f.name for f in dataset.settings.fields] == ["conversation", "response_a", "response_b"]
    assert dataset.settings.distribution.min_submitted == 3
    assert dataset.settings.guidelines == "Be fair."


def test_cli_push_progress_pull_through_url_and_key(team, dataset_settings, tmp_path, monkeypatch) -> None:
    """The client commands against a server known only by URL + API key (as a remote one would be)."""
    from typer.testing import CliRunner

    from annotation.cli import annotate_app

    monkeypatch.setenv("ARGILLA_API_URL", team["conn"].url)
    monkeypatch.setenv("ARGILLA_API_KEY", team["conn"].api_key)
    pairs_file = tmp_path / "feedback.jsonl"
    rows = [
        {"prompt": f"Tell me fact {i}.", "chosen": f"Fact {i} is true.", "rejected": f"No idea about {i}."}
        for i in range(3)
    ]
    pairs_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    opts = ["--set", f"dataset.name={dataset_settings.name}", "--set", "dataset.workspace=tests"]
    runner = CliRunner()

    pushed = runner.invoke(annotate_app, ["push", "--pairs", str(pairs_file), *opts])
    assert pushed.exit_code == 0, pushed.output
    assert f"pushed 3 records to tests/{dataset_settings.name}" in pushed.output

    ann = annotators(team, dataset_settings)
    first = record_id(
        CandidatePair([{"role": "user", "content": "Tell me fact 0."}], "Fact 0 is true.", "No idea about 0.")
    )
    ann["ann1"].vote(first, "a")
    ann["ann2"].vote(first, "a")

    progress = runner.invoke(annotate_app, ["progress", *opts])
    assert progress.exit_code == 0, progress.output
    assert "1/3 completed, 2 pending" in progress.output and "ann1-wf" in progress.output

    pulled = runner.invoke(annotate_app, ["pull", "--output-dir", str(tmp_path / "out"), *opts])
    assert pulled.exit_code == 0, pulled.output
    assert "wrote 1 pairs" in pulled.output
    assert (tmp_path / "out" / dataset_settings.name / "v1" / "preferences.jsonl").is_file()
