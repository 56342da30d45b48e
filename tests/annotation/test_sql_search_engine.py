"""The SQL search engine behind a real Argilla server, on SQLite and on PostgreSQL.

Ports the intent of argilla-server's own search-engine tests: each filter scope (record status,
response status per user, response values, metadata terms/ranges, suggestion value/score/agent),
text search over all fields or one, sorting with missing values last, paging with totals,
vector similarity, metadata metrics and progress. Queries go through the server's REST API, so
they exercise the exact objects Argilla hands the engine.
"""

from __future__ import annotations

from dataclasses import dataclass

import argilla as rg
import httpx
import pytest

from annotation.users import add_user

pytestmark = pytest.mark.argilla

RECORDS = {
    "r0": dict(
        text="the quick brown fox", chat="hello there", meta={"color": "red", "n": 1, "f": 0.5}, vec=[1, 0, 0]
    ),
    "r1": dict(
        text="lazy dog sleeps", chat="good morning", meta={"color": "green", "n": 2, "f": 1.5}, vec=[0, 1, 0]
    ),
    "r2": dict(
        text="quick thinking dog", chat="bye", meta={"color": "blue", "n": 3, "f": 2.5}, vec=[0.9, 0.1, 0]
    ),
    "r3": dict(text="unrelated words", chat="nothing", meta={}, vec=[0, 0, 1]),
    "r4": dict(text="plain text", chat="an elephant walks in", meta={"color": "red"}, vec=[0, 0.5, 0.5]),
    "r5": dict(text="more plain text", chat="see you", meta={"n": 10}, vec=[0.5, 0.5, 0]),
}


@dataclass
class Fixture:
    url: str
    owner_key: str
    dataset_id: str
    ids: dict[str, str]  # record uuid -> external id
    keys: dict[str, str]  # annotator -> api key


@pytest.fixture(scope="module")
def searchable(argilla) -> Fixture:
    _, conn = argilla
    client = conn.client()
    workspace = f"search-{conn.url.rsplit(':', 1)[1]}"
    creds = {u: add_user(client, f"{u}-{workspace}", workspace) for u in ("u1", "u2", "u3")}
    settings = rg.Settings(
        fields=[rg.TextField("text"), rg.ChatField("chat", required=False)],
        questions=[
            rg.LabelQuestion("label", labels=["x", "y", "z"]),
            rg.MultiLabelQuestion("tags", labels=["p", "q", "r"], required=False),
            rg.RatingQuestion("score", values=[1, 2, 3, 4, 5], required=False),
        ],
        metadata=[
            rg.TermsMetadataProperty("color", options=["red", "green", "blue"]),
            rg.IntegerMetadataProperty("n"),
            rg.FloatMetadataProperty("f"),
        ],
        vectors=[rg.VectorField("emb", dimensions=3)],
        distribution=rg.TaskDistribution(min_submitted=2),
    )
    dataset = rg.Dataset(name="search", workspace=workspace, settings=settings, client=client).create()
    uid = {u: client.users(c.username).id for u, c in creds.items()}
    suggestions = {
        "r0": [rg.Suggestion("label", "x", score=0.9, agent="m1")],
        "r1": [rg.Suggestion("label", "y", score=0.2, agent="m2")],
        "r2": [rg.Suggestion("tags", ["p", "q"], score=[0.5, 0.5], agent="m1")],
    }
    responses = {
        "r0": [
            rg.Response("label", "x", uid["u1"], "submitted"),
            rg.Response("score", 4, uid["u1"], "submitted"),
            rg.Response("label", "y", uid["u2"], "submitted"),
            rg.Response("score", 2, uid["u2"], "submitted"),
        ],
        "r1": [rg.Response("label", "y", uid["u1"], "draft")],
        "r2": [rg.Response("label", "z", uid["u1"], "discarded")],
    }
    records = [
        rg.Record(
            id=rid,
            fields={"text": r["text"], "chat": [{"role": "user", "content": r["chat"]}]},
            metadata=r["meta"],
            vectors={"emb": r["vec"]},
            suggestions=suggestions.get(rid, []),
            responses=responses.get(rid, []),
        )
        for rid, r in RECORDS.items()
    ]
    dataset.records.log(records)
    body = _search_raw(conn.url, conn.api_key, str(dataset.id), {}, limit=50)
    ids = {item["record"]["id"]: item["record"]["external_id"] for item in body["items"]}
    return Fixture(conn.url, conn.api_key, str(dataset.id), ids, {u: c.api_key for u, c in creds.items()})


def _search_raw(url: str, key: str, dataset_id: str, body: dict, me: bool = False, **params) -> dict:
    path = (
        f"/api/v1/me/datasets/{dataset_id}/records/search"
        if me
        else f"/api/v1/datasets/{dataset_id}/records/search"
    )
    response = httpx.post(
        url + path, json=body, params=params, headers={"X-Argilla-Api-Key": key}, timeout=30
    )
    assert response.status_code == 200, response.text
    return response.json()


def search(fx: Fixture, body: dict, user: str | None = None, **params) -> tuple[list[str], int]:
    key = fx.keys[user] if user else fx.owner_key
    out = _search_raw(fx.url, key, fx.dataset_id, body, me=user is not None, **params)
    return [fx.ids[item["record"]["id"]] for item in out["items"]], out["total"]


def filters(*items: dict) -> dict:
    return {"filters": {"and": list(items)}}


def terms(scope: dict, values: list) -> dict:
    return {"type": "terms", "scope": scope, "values": values}


def rng(scope: dict, ge=None, le=None) -> dict:
    return {
        "type": "range",
        "scope": scope,
        **({"ge": ge} if ge is not None else {}),
        **({"le": le} if le is not None else {}),
    }


STATUS = {"entity": "response", "property": "status"}


def test_text_query_matches_all_words_across_fields(searchable: Fixture) -> None:
    ids, total = search(searchable, {"query": {"text": {"q": "quick"}}})
    assert sorted(ids) == ["r0", "r2"] and total == 2
    assert search(searchable, {"query": {"text": {"q": "quick dog"}}})[0] == ["r2"]
    assert search(searchable, {"query": {"text": {"q": "elephant"}}})[0] == ["r4"]  # inside the chat field
    # one page still counts every match; past the last page too
    assert len(search(searchable, {"query": {"text": {"q": "quick"}}}, limit=1)[0]) == 1
    assert search(searchable, {"query": {"text": {"q": "quick"}}}, limit=1)[1] == 2
    assert search(searchable, {"query": {"text": {"q": "quick"}}}, limit=1, offset=5) == ([], 2)


def test_text_query_restricted_to_one_field(searchable: Fixture) -> None:
    assert search(searchable, {"query": {"text": {"q": "elephant", "field": "chat"}}})[0] == ["r4"]
    assert search(searchable, {"query": {"text": {"q": "elephant", "field": "text"}}})[0] == []
    # chat roles are structure, not content
    assert search(searchable, {"query": {"text": {"q": "user"}}})[1] == 0


def test_metadata_terms_and_ranges(searchable: Fixture) -> None:
    color = {"entity": "metadata", "metadata_property": "color"}
    assert sorted(search(searchable, filters(terms(color, ["red", "blue"])))[0]) == ["r0", "r2", "r4"]
    n = {"entity": "metadata", "metadata_property": "n"}
    assert sorted(search(searchable, filters(rng(n, ge=2)))[0]) == ["r1", "r2", "r5"]
    assert sorted(search(searchable, filters(rng(n, ge=2, le=3)))[0]) == ["r1", "r2"]
    f = {"entity": "metadata", "metadata_property": "f"}
    assert search(searchable, filters(rng(f, le=1.0)))[0] == ["r0"]
    assert search(searchable, filters(terms(color, ["red"]), rng(n, le=1)))[0] == ["r0"]  # AND


def test_suggestion_value_score_agent(searchable: Fixture) -> None:
    def scope(question: str, prop: str) -> dict:
        return {"entity": "suggestion", "question": question, "property": prop}

    assert search(searchable, filters(terms(scope("label", "value"), ["x"])))[0] == ["r0"]
    assert search(searchable, filters(rng(scope("label", "score"), ge=0.5)))[0] == ["r0"]
    assert sorted(search(searchable, filters(terms(scope("label", "agent"), ["m2"])))[0]) == ["r1"]
    # multi-label suggestion: any of its labels matches
    assert search(searchable, filters(terms(scope("tags", "value"), ["q"])))[0] == ["r2"]


def test_response_status_is_per_user_on_the_annotator_endpoint(searchable: Fixture) -> None:
    def by_status(user: str, *statuses: str) -> list[str]:
        ids, total = search(searchable, filters(terms(STATUS, list(statuses))), user=user)
        assert total == len(ids)  # the queue's count is derived apart from its page
        return sorted(ids)

    assert by_status("u1", "pending") == ["r3", "r4", "r5"]
    assert by_status("u1", "submitted") == ["r0"]
    assert by_status("u1", "draft") == ["r1"]
    assert by_status("u1", "discarded") == ["r2"]
    assert by_status("u1", "pending", "draft") == ["r1", "r3", "r4", "r5"]
    assert by_status("u2", "pending") == ["r1", "r2", "r3", "r4", "r5"]
    assert by_status("u3", "pending") == sorted(RECORDS)


def test_response_status_without_user_means_any_response(searchable: Fixture) -> None:
    assert sorted(search(searchable, filters(terms(STATUS, ["pending"])))[0]) == ["r3", "r4", "r5"]
    assert sorted(search(searchable, filters(terms(STATUS, ["submitted", "draft"])))[0]) == ["r0", "r1"]


def test_record_status_follows_task_distribution(searchable: Fixture) -> None:
    # r0 has two submitted responses and min_submitted=2
    record = {"entity": "record", "property": "status"}
    assert search(searchable, filters(terms(record, ["completed"])))[0] == ["r0"]
    # the annotation page's query: my pending AND record pending
    mine = search(searchable, filters(terms(STATUS, ["pending"]), terms(record, ["pending"])), user="u2")[0]
    assert sorted(mine) == ["r1", "r2", "r3", "r4", "r5"]
    # one page of the queue still counts the whole queue
    page = search(
        searchable, filters(terms(record, ["pending"]), terms(STATUS, ["pending"])), user="u1", limit=1
    )
    assert len(page[0]) == 1 and page[1] == 3  # r3, r4, r5: u1 answered r0, r1, r2
    text = search(
        searchable, {"query": {"text": {"q": "plain"}}, **filters(terms(STATUS, ["pending"]))}, user="u1"
    )
    assert sorted(text[0]) == ["r4", "r5"] and text[1] == 2


def test_response_value_filter(searchable: Fixture) -> None:
    score = {"entity": "response", "question": "score"}
    assert search(searchable, filters(rng(score, ge=4)), user="u1")[0] == ["r0"]
    assert search(searchable, filters(rng(score, ge=4)), user="u2")[0] == []
    label = {"entity": "response", "question": "label"}
    assert search(searchable, filters(terms(label, ["y"])), user="u1")[0] == ["r1"]


def test_sorting_puts_missing_values_last_in_both_directions(searchable: Fixture) -> None:
    n = {"entity": "metadata", "metadata_property": "n"}
    desc = search(searchable, {"sort": [{"scope": n, "order": "desc"}]})[0]
    assert desc[:4] == ["r5", "r2", "r1", "r0"] and sorted(desc[4:]) == ["r3", "r4"]
    asc = search(searchable, {"sort": [{"scope": n, "order": "asc"}]})[0]
    assert asc[:4] == ["r0", "r1", "r2", "r5"]
    color = {"entity": "metadata", "metadata_property": "color"}
    assert search(searchable, {"sort": [{"scope": color, "order": "asc"}]})[0][:4] == ["r2", "r1", "r0", "r4"]
    score = {"entity": "suggestion", "question": "label", "property": "score"}
    assert search(searchable, {"sort": [{"scope": score, "order": "desc"}]})[0][:2] == ["r0", "r1"]
    inserted = {"entity": "record", "property": "inserted_at"}
    assert search(searchable, {"sort": [{"scope": inserted, "order": "desc"}]})[0] == list(reversed(RECORDS))


def test_text_query_with_a_sort_orders_the_matches_by_it(searchable: Fixture) -> None:
    n = {"entity": "metadata", "metadata_property": "n"}
    quick = {"query": {"text": {"q": "quick"}}}
    assert search(searchable, {**quick, "sort": [{"scope": n, "order": "desc"}]}) == (["r2", "r0"], 2)
    assert search(searchable, {**quick, "sort": [{"scope": n, "order": "asc"}]}) == (["r0", "r2"], 2)
    # a match without the value still comes last, in both directions
    plain = {"query": {"text": {"q": "plain text"}}}
    for order in ("asc", "desc"):
        assert search(searchable, {**plain, "sort": [{"scope": n, "order": order}]})[0] == ["r5", "r4"]
    # the page after the first keeps the sort and the total
    assert search(searchable, {**quick, "sort": [{"scope": n, "order": "desc"}]}, limit=1, offset=1) == (
        ["r0"],
        2,
    )


def test_paging_is_stable_and_counts_everything(searchable: Fixture) -> None:
    everything, total = search(searchable, {}, limit=50)
    assert total == len(RECORDS) and sorted(everything) == sorted(RECORDS)
    pages = [search(searchable, {}, limit=2, offset=o) for o in (0, 2, 4)]
    assert [i for ids, _ in pages for i in ids] == everything
    assert all(t == len(RECORDS) for _, t in pages)


def test_similarity_search_by_value_and_by_record(searchable: Fixture) -> None:
    body = {"query": {"vector": {"name": "emb", "value": [1, 0, 0], "order": "most_similar"}}}
    ids, _ = search(searchable, body, limit=3)
    assert ids[:2] == ["r0", "r2"]
    r0 = next(u for u, e in searchable.ids.items() if e == "r0")
    ids, _ = search(searchable, {"query": {"vector": {"name": "emb", "record_id": r0}}}, limit=2)
    assert ids == ["r2", "r5"]  # the record itself is excluded
    least = {"query": {"vector": {"name": "emb", "value": [1, 0, 0], "order": "least_similar"}}}
    assert search(searchable, least, limit=1)[0][0] in ("r1", "r3")  # orthogonal ones first
    color = {"entity": "metadata", "metadata_property": "color"}
    filtered = {**body, **filters(terms(color, ["red"]))}
    assert search(searchable, filtered, limit=5)[0] == ["r0", "r4"]


def test_metadata_metrics_and_progress(searchable: Fixture) -> None:
    headers = {"X-Argilla-Api-Key": searchable.owner_key}
    props = httpx.get(
        f"{searchable.url}/api/v1/me/datasets/{searchable.dataset_id}/metadata-properties", headers=headers
    ).json()
    by_name = {p["name"]: p["id"] for p in props["items"]}
    color = httpx.get(
        f"{searchable.url}/api/v1/metadata-properties/{by_name['color']}/metrics", headers=headers
    ).json()
    assert color["total"] == 4 and {v["term"]: v["count"] for v in color["values"]} == {
        "red": 2,
        "green": 1,
        "blue": 1,
    }
    n = httpx.get(
        f"{searchable.url}/api/v1/metadata-properties/{by_name['n']}/metrics", headers=headers
    ).json()
    assert (n["min"], n["max"]) == (1, 10)
    progress = httpx.get(
        f"{searchable.url}/api/v1/datasets/{searchable.dataset_id}/progress", headers=headers
    ).json()
    assert (progress["total"], progress["completed"], progress["pending"]) == (6, 1, 5)
    mine = httpx.get(
        f"{searchable.url}/api/v1/me/datasets/{searchable.dataset_id}/metrics",
        headers={"X-Argilla-Api-Key": searchable.keys["u1"]},
    ).json()
    assert mine["responses"]["submitted"] == 1 and mine["responses"]["draft"] == 1
    assert mine["responses"]["discarded"] == 1 and mine["responses"]["pending"] == 3


def test_sdk_filters_on_the_server_id_and_the_external_id(searchable: Fixture) -> None:
    # `_server_id` reaches the engine as the record's uuid column with string values (issue 12: a 500)
    client = rg.Argilla(api_url=searchable.url, api_key=searchable.owner_key, timeout=60)
    dataset = client.datasets(id=searchable.dataset_id)
    uuids = {external: uid for uid, external in searchable.ids.items()}

    def external_ids(*conditions: tuple) -> list[str]:
        query = rg.Query(filter=rg.Filter(list(conditions)))
        return sorted(r.id for r in dataset.records(query=query, with_suggestions=False))

    assert external_ids(("_server_id", "==", uuids["r3"])) == ["r3"]
    assert external_ids(("_server_id", "in", [uuids["r0"], uuids["r5"]])) == ["r0", "r5"]
    assert external_ids(("_server_id", "==", uuids["r0"]), ("metadata.color", "==", "green")) == []
    assert external_ids(("id", "in", ["r1", "r2"])) == ["r1", "r2"]  # the external id, by contrast
    # not a uuid at all: no match, not a server error
    body = filters(terms({"entity": "record", "property": "id"}, ["not-a-uuid"]))
    assert search(searchable, body) == ([], 0)


def test_text_search_in_the_queue_follows_responses_and_status(argilla) -> None:
    # SQLite answers "words AND pending for me AND record status" from the FTS index's tags, which
    # triggers keep in step with responses and record status: check each write moves the queue
    _, conn = argilla
    client = conn.client()
    workspace = f"queue-{conn.url.rsplit(':', 1)[1]}"
    creds = add_user(client, f"q1-{workspace}", workspace)
    settings = rg.Settings(
        fields=[rg.TextField("text")],
        questions=[rg.LabelQuestion("label", labels=["x", "y"])],
        distribution=rg.TaskDistribution(min_submitted=1),
    )
    dataset = rg.Dataset(name="queue", workspace=workspace, settings=settings, client=client).create()
    dataset.records.log([rg.Record(id=f"q{i}", fields={"text": f"apple pie number {i}"}) for i in range(4)])
    fx = Fixture(conn.url, conn.api_key, str(dataset.id), {}, {"q1": creds.api_key})
    body = _search_raw(conn.url, conn.api_key, fx.dataset_id, {}, limit=50)
    fx.ids.update({item["record"]["id"]: item["record"]["external_id"] for item in body["items"]})
    uuids = {external: uid for uid, external in fx.ids.items()}
    record = {"entity": "record", "property": "status"}

    def queue(*statuses: str) -> tuple[list[str], int]:
        query = {
            "query": {"text": {"q": "apple pie"}},
            **filters(terms(STATUS, ["pending"]), terms(record, list(statuses))),
        }
        ids, total = search(fx, query, user="q1")
        # the same question through the general SQL path (an always-true extra filter) agrees
        every = terms({"entity": "record", "property": "id"}, list(uuids.values()))
        general = {**query, "filters": {"and": [*query["filters"]["and"], every]}}
        assert search(fx, general, user="q1") == (ids, total)
        return sorted(ids), total

    assert queue("pending") == (["q0", "q1", "q2", "q3"], 4)
    headers = {"X-Argilla-Api-Key": creds.api_key}
    answer = {"values": {"label": {"value": "x"}}, "status": "submitted"}
    response = httpx.post(f"{conn.url}/api/v1/records/{uuids['q1']}/responses", json=answer, headers=headers)
    assert response.status_code == 201, response.text
    assert queue("pending") == (["q0", "q2", "q3"], 3)  # answered by me, and now completed
    assert queue("completed") == ([], 0)  # completed, but answered by me
    assert search(fx, {"query": {"text": {"q": "apple"}}, **filters(terms(record, ["completed"]))}) == (
        ["q1"],
        1,
    )
    deleted = httpx.delete(f"{conn.url}/api/v1/responses/{response.json()['id']}", headers=headers)
    assert deleted.status_code == 200, deleted.text
    assert queue("pending") == (["q0", "q1", "q2", "q3"], 4)
    assert search(fx, {"query": {"text": {"q": "apple"}}, **filters(terms(record, ["completed"]))}) == ([], 0)
    # a record's new text is searchable at once, its old text no longer
    dataset.records.log([rg.Record(id="q2", fields={"text": "banana bread"})])
    assert queue("pending") == (["q0", "q1", "q3"], 3)
    assert search(fx, {"query": {"text": {"q": "banana"}}}, user="q1")[0] == ["q2"]
    # a deleted record leaves the text index with it (PostgreSQL: the side table's foreign key)
    gone = httpx.delete(
        f"{conn.url}/api/v1/records/{uuids['q3']}", headers={"X-Argilla-Api-Key": conn.api_key}
    )
    assert gone.status_code == 200, gone.text
    assert queue("pending") == (["q0", "q1"], 2)
