"""The simulated annotator team: three Argilla users who follow the written rubric, each imperfectly.

Clearly labelled as simulated in the report. Each annotator is an ordinary Argilla user with its own
API key; it reads the records through the Argilla SDK as that user and submits its votes with the
same `POST /records/{id}/responses` call the web UI makes. Every record gets `votes_per_record`
votes from a fixed rotation of the team, so each pair of annotators overlaps on some records and
agreement is measurable. The imperfections, each measurable (tests/test_quickstart_units.py):
- `noisy`:    follows the rubric, but flips `flip_rate` of its votes at random;
- `position`: on near-ties (rubric totals within `near_tie`) it picks response A with prob `position_bias`;
- `shorter`:  on near-ties it picks the shorter response with prob `shorter_bias`.
Both biased annotators otherwise follow the rubric exactly.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from serving.quickstart.config import AnnotationSettings
from serving.quickstart.rubric import Rubric, score

Kind = Literal["noisy", "position", "shorter"]
TEAM: tuple[tuple[str, Kind], ...] = (
    ("sim-noisy", "noisy"),
    ("sim-position", "position"),
    ("sim-shorter", "shorter"),
)


@dataclass(frozen=True)
class SimulatedAnnotator:
    username: str
    kind: Kind
    settings: AnnotationSettings
    rubric: Rubric

    def _rng(self, key: str) -> random.Random:
        # deterministic per (annotator, record): a re-run casts the same votes
        digest = hashlib.sha256(f"{self.settings.seed}:{self.username}:{key}".encode()).hexdigest()
        return random.Random(int(digest[:16], 16))

    def vote(self, key: str, prompt: str, response_a: str, response_b: str) -> str:
        """'a', 'b' or 'tie' for the record as displayed (A first)."""
        rng = self._rng(key)
        a, b = score(self.rubric, prompt, response_a), score(self.rubric, prompt, response_b)
        diff = a.total - b.total
        rubric_vote = "tie" if abs(diff) <= self.rubric.tie_tolerance else ("a" if diff > 0 else "b")
        s = self.settings
        if self.kind == "noisy":
            if rubric_vote != "tie" and rng.random() < s.flip_rate:
                return "b" if rubric_vote == "a" else "a"
            return rubric_vote
        if abs(diff) <= s.near_tie:
            if self.kind == "position" and rng.random() < s.position_bias:
                return "a"
            if self.kind == "shorter" and a.words != b.words and rng.random() < s.shorter_bias:
                return "a" if a.words < b.words else "b"
        return rubric_vote


def team(settings: AnnotationSettings, rubric: Rubric) -> list[SimulatedAnnotator]:
    return [SimulatedAnnotator(name, kind, settings, rubric) for name, kind in TEAM]


def assigned(record_key: str, index: int, team_size: int, votes: int) -> bool:
    """Whether annotator `index` votes on the record: a rotation starting at a hashed offset."""
    start = int(hashlib.sha256(record_key.encode()).hexdigest()[:8], 16) % team_size
    return (index - start) % team_size < votes


@dataclass
class AnnotationRun:
    submitted: dict[str, int]


PENDING_FOR_ME = {
    "filters": {
        "and": [
            {"type": "terms", "scope": {"entity": "response", "property": "status"}, "values": ["pending"]},
        ]
    }
}


def pending_records(http: Any, dataset_id: str, page: int = 200) -> list[dict[str, Any]]:
    """The annotator's own queue, as the web UI reads it (`/me/datasets/{id}/records/search`)."""
    out: list[dict[str, Any]] = []
    while True:
        response = http.post(
            f"/api/v1/me/datasets/{dataset_id}/records/search",
            json=PENDING_FOR_ME,
            params={"limit": page, "offset": len(out)},
        )
        response.raise_for_status()
        items = [item["record"] for item in response.json()["items"]]
        out += items
        if len(items) < page:
            return out


def annotate_dataset(
    url: str,
    api_keys: dict[str, str],
    annotators: list[SimulatedAnnotator],
    dataset_name: str,
    workspace: str,
    votes_per_record: int,
    on_vote: Callable[[], None] | None = None,
) -> AnnotationRun:
    """Each annotator, logged in as its own Argilla user, works through its pending queue and votes
    on the records assigned to it. Records it already voted on are not in its queue: resumable."""
    import argilla as rg
    from argilla._models import UserResponseModel

    from annotation.preference_dataset import PREFERENCE

    submitted = {a.username: 0 for a in annotators}
    for index, annotator in enumerate(annotators):
        client = rg.Argilla(api_url=url, api_key=api_keys[annotator.username], timeout=120)
        me = client.me
        dataset = client.datasets(dataset_name, workspace=workspace)
        if dataset is None:
            raise RuntimeError(f"{annotator.username} cannot see dataset {workspace}/{dataset_name}")
        for record in pending_records(client.api.http_client, str(dataset.id)):
            key = str(record["external_id"] or record["id"])
            if not assigned(key, index, len(annotators), votes_per_record):
                continue
            fields = record["fields"]
            prompt = fields["conversation"][-1]["content"]
            label = annotator.vote(key, prompt, fields["response_a"], fields["response_b"])
            client.api.records.create_record_response(
                record_id=record["id"],
                user_response=UserResponseModel(
                    values={PREFERENCE: {"value": label}}, status="submitted", user_id=me.id
                ),
            )
            submitted[annotator.username] += 1
            if on_vote:
                on_vote()
    return AnnotationRun(submitted)
