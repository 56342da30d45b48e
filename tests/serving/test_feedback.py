"""POST /v1/feedback: every kind stored once per idempotency key, and clear 4xx for bad feedback."""

from __future__ import annotations

import uuid
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from sqlalchemy import func, select

from serving import feedback_store as fs


def _ask(client, content: str, n: int = 1):
    return client.chat.completions.create(
        model="tiny-random", messages=[{"role": "user", "content": content}], n=n, max_tokens=4
    )


def _count(server, key: str) -> int:
    with server.store.session() as session:
        return session.scalar(
            select(func.count()).select_from(fs.Feedback).where(fs.Feedback.idempotency_key == key)
        )


def _post(server, body: dict, **headers: str) -> httpx.Response:
    return httpx.post(
        f"{server.url}/v1/feedback", json=body, headers=server.client_headers | headers, timeout=30
    )


@pytest.fixture
def pair(client):
    response = _ask(client, f"Pick one {uuid.uuid4().hex[:6]}", n=2)
    return [c.completion_id for c in response.choices]


@pytest.mark.parametrize(
    "make_body",
    [
        lambda ids: {"type": "thumbs", "completion_id": ids[0], "value": "up"},
        lambda ids: {
            "type": "thumbs",
            "completion_id": ids[0],
            "value": "down",
            "corrected_response": "Better.",
        },
        lambda ids: {"type": "rating", "completion_id": ids[1], "stars": 4, "comment": "fine"},
        lambda ids: {"type": "pairwise", "chosen_id": ids[1], "rejected_id": ids[0]},
    ],
    ids=["thumbs", "thumbs+correction", "rating", "pairwise"],
)
def test_each_kind_is_stored_once_when_posted_twice(server, pair, make_body) -> None:
    key = uuid.uuid4().hex
    body = make_body(pair) | {"idempotency_key": key}
    first, second = _post(server, body), _post(server, body)
    assert (first.status_code, second.status_code) == (201, 200)
    assert first.json()["id"] == second.json()["id"]
    assert (first.json()["duplicate"], second.json()["duplicate"]) == (False, True)
    assert _count(server, key) == 1


def test_idempotency_key_header_and_concurrent_retries(server, pair) -> None:
    key = uuid.uuid4().hex
    body = {"type": "rating", "completion_id": pair[0], "stars": 2}
    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(lambda _: _post(server, body, **{"Idempotency-Key": key}), range(8)))
    assert sorted(r.status_code for r in responses) == [200] * 7 + [201]
    assert len({r.json()["id"] for r in responses}) == 1
    assert _count(server, key) == 1


def test_same_key_with_another_payload_is_409(server, pair) -> None:
    key = uuid.uuid4().hex
    assert (
        _post(
            server, {"type": "thumbs", "completion_id": pair[0], "value": "up", "idempotency_key": key}
        ).status_code
        == 201
    )
    r = _post(server, {"type": "thumbs", "completion_id": pair[0], "value": "down", "idempotency_key": key})
    assert r.status_code == 409 and "different payload" in r.json()["error"]["message"]


def test_response_id_of_a_single_choice_is_accepted(server, client) -> None:
    response = _ask(client, "single")
    r = _post(server, {"type": "thumbs", "completion_id": response.id, "value": "up"})
    assert r.status_code == 201 and r.json()["completion_id"] == response.choices[0].completion_id


@pytest.mark.parametrize(
    ("body", "status", "reason"),
    [
        ({"type": "thumbs", "completion_id": "chatcmpl-nope-0", "value": "up"}, 404, "unknown completion id"),
        ({"type": "rating", "completion_id": "X", "stars": 6}, 400, "stars"),
        ({"type": "thumbs", "completion_id": "X", "value": "sideways"}, 400, "value"),
        ({"type": "emoji", "completion_id": "X"}, 400, "type"),
        ({"type": "thumbs", "completion_id": "X", "value": "up", "extra": 1}, 400, "extra"),
    ],
)
def test_bad_feedback_gets_4xx_with_a_reason(server, body: dict, status: int, reason: str) -> None:
    r = _post(server, body)
    assert r.status_code == status, r.text
    assert reason in r.json()["error"]["message"]


def test_pairwise_across_prompts_or_with_itself_is_rejected(server, client, pair) -> None:
    other = _ask(client, "a different prompt").choices[0].completion_id
    mixed = _post(server, {"type": "pairwise", "chosen_id": pair[0], "rejected_id": other})
    assert mixed.status_code == 400 and "different prompts" in mixed.json()["error"]["message"]
    same = _post(server, {"type": "pairwise", "chosen_id": pair[0], "rejected_id": pair[0]})
    assert same.status_code == 400 and "two different completions" in same.json()["error"]["message"]
    unknown = _post(server, {"type": "pairwise", "chosen_id": pair[0], "rejected_id": "nope"})
    assert unknown.status_code == 404 and unknown.json()["error"]["param"] == "rejected_id"
