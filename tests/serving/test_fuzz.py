"""Generated input against the real server: nothing but our own 4xx, in the OpenAI error shape.

Two generators: hypothesis over feedback payloads (valid, nearly valid and hostile, including
lone surrogates and invalid UTF-8), and schemathesis over every operation of the app's own
OpenAPI document, each case sent with a key and without. Bounded: a few dozen examples each.
"""

from __future__ import annotations

import json

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from serving import feedback_store as fs
from tests.serving.conftest import ADMIN_KEY, CLIENT_KEY, RunningServer, add_completions

KEY = {"Authorization": f"Bearer {CLIENT_KEY}"}
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
BOUNDED = settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


def assert_clean(response: httpx.Response) -> None:
    """Our own answer: no 5xx, and every error OpenAI-shaped with a message."""
    assert response.status_code < 500, response.text
    if response.status_code >= 400:
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}, error
        assert isinstance(error["message"], str) and error["message"]


# Any character, surrogates included (hypothesis leaves category Cs out by default).
any_text = st.text(st.characters(exclude_categories=()), max_size=40)
json_value = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | any_text,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(any_text, inner, max_size=3),
    max_leaves=8,
)


@pytest.fixture(scope="module")
def known_ids(server: RunningServer) -> list[str]:
    return add_completions(server.store, "fuzz: pick one", ["first answer", "second answer"])


def feedback_payloads(ids: list[str]) -> st.SearchStrategy[dict]:
    completion = st.sampled_from([*ids, "chatcmpl-unknown-0"]) | any_text | json_value
    return st.fixed_dictionaries(
        {"type": st.sampled_from(["thumbs", "rating", "pairwise"]) | any_text | json_value},
        optional={
            "completion_id": completion,
            "chosen_id": completion,
            "rejected_id": completion,
            "value": st.sampled_from(["up", "down"]) | json_value,
            "stars": st.integers(-3, 8) | json_value,
            "comment": st.none() | any_text | st.text(min_size=3990, max_size=4010),
            "corrected_response": st.none() | any_text,
            "idempotency_key": st.none() | any_text | st.text(min_size=250, max_size=260),
            "extra": json_value,
        },
    )


@BOUNDED
@given(data=st.data(), encoding=st.sampled_from(["ascii-escapes", "raw-utf8"]))
def test_feedback_payloads_get_a_receipt_or_a_clean_4xx(
    open_server: str, server: RunningServer, known_ids: list[str], data: st.DataObject, encoding: str
) -> None:
    payload = data.draw(feedback_payloads(known_ids))
    if encoding == "ascii-escapes":  # what a JSON library sends: "\ud800" as an escape
        raw = json.dumps(payload).encode()
    else:  # raw bytes: a lone surrogate becomes invalid UTF-8
        raw = json.dumps(payload, ensure_ascii=False).encode("utf-8", "surrogatepass")
    r = httpx.post(
        f"{open_server}/v1/feedback", content=raw, headers=KEY | {"Content-Type": "application/json"}
    )
    assert_clean(r)
    assert r.status_code in {200, 201, 400, 404, 409, 413}, r.text
    if r.status_code in (200, 201):  # accepted means stored: the receipt's row exists
        receipt = r.json()
        with server.store.session() as session:
            row = session.get(fs.Feedback, receipt["id"])
            assert row is not None and row.completion_id == receipt["completion_id"]
            assert row.kind == payload["type"]


OPERATIONS = [
    ("GET", "/health"),
    ("GET", "/v1/models"),
    ("POST", "/v1/chat/completions"),
    ("POST", "/v1/feedback"),
    ("GET", "/admin/status"),
    ("POST", "/admin/reload"),
    ("POST", "/admin/adapters"),
]


@pytest.fixture(scope="module")
def api_schema(open_server: str):
    document = httpx.get(f"{open_server}/openapi.json", headers=KEY).json()
    return schemathesis.openapi.from_dict(document)


def test_the_fuzzed_operations_are_all_of_them(api_schema) -> None:
    found = {(op.ok().method.upper(), op.ok().path) for op in api_schema.get_all_operations()}
    assert found == set(OPERATIONS)


@pytest.mark.parametrize(("method", "path"), OPERATIONS, ids=[f"{m} {p}" for m, p in OPERATIONS])
def test_every_operation_answers_cleanly_with_and_without_a_key(
    api_schema, open_server: str, method: str, path: str
) -> None:
    """Schema-valid and schema-violating cases (schemathesis), each sent as admin, client and nobody."""
    from schemathesis import GenerationMode

    operation = api_schema[path][method]
    cases = st.one_of(
        operation.as_strategy(generation_mode=GenerationMode.POSITIVE),
        operation.as_strategy(generation_mode=GenerationMode.NEGATIVE),
    )

    @settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(case=cases)
    def check(case) -> None:
        for headers in (ADMIN, KEY, {}):  # the admin key reaches every route; no key reaches none
            response = case.call(base_url=open_server, headers=headers, timeout=60)
            where = f"{method} {path} with {sorted(headers) or 'no key'}"
            assert response.status_code < 500, f"{where}: {response.status_code} {response.text[:300]}"
            if response.status_code >= 400:
                error = response.json()["error"]
                assert set(error) == {"message", "type", "param", "code"}, (where, error)
            if not headers and path != "/health":
                assert response.status_code == 401, where

    check()
