"""A SQLite database made before the FTS index carried tags keeps working after an upgrade.

The earlier engine kept a body-only FTS5 table (`prefloop_records_fts`) and three triggers. On
startup the engine drops those and builds the tagged index from the records and responses already
there, so an annotator's text search in their queue is right from the first request.
"""

from __future__ import annotations

import sqlite3

import argilla as rg
import httpx
import pytest

from annotation import workspace
from annotation.config import ServerSettings
from annotation.users import add_user
from annotation.workspace import free_port, server_home

pytestmark = pytest.mark.argilla

# the earlier version's objects, verbatim in shape (body only, no tags, no response triggers)
_BODY = (
    "(SELECT group_concat(value, ' ') FROM json_tree({row}.fields) WHERE type = 'text' AND key IS NOT 'role')"
)
OLD_DDL = [
    "CREATE VIRTUAL TABLE prefloop_records_fts USING fts5(body, tokenize = 'unicode61 remove_diacritics 2')",
    f"""CREATE TRIGGER prefloop_records_fts_ai AFTER INSERT ON records BEGIN
        INSERT INTO prefloop_records_fts(rowid, body) VALUES (NEW.rowid, {_BODY.format(row="NEW")}); END""",
    """CREATE TRIGGER prefloop_records_fts_ad AFTER DELETE ON records BEGIN
        DELETE FROM prefloop_records_fts WHERE rowid = OLD.rowid; END""",
    f"""CREATE TRIGGER prefloop_records_fts_au AFTER UPDATE OF fields ON records BEGIN
        DELETE FROM prefloop_records_fts WHERE rowid = OLD.rowid;
        INSERT INTO prefloop_records_fts(rowid, body) VALUES (NEW.rowid, {_BODY.format(row="NEW")}); END""",
    f"INSERT INTO prefloop_records_fts(rowid, body) SELECT r.rowid, {_BODY.format(row='r')} FROM records r",
]


def test_a_database_from_before_the_tagged_index_is_upgraded_on_startup(tmp_path) -> None:
    settings = ServerSettings(home=str(tmp_path), port=free_port(), startup_timeout_s=300)
    conn = workspace.up(settings)
    try:
        client = conn.client()
        creds = add_user(client, "old-q1", "old")
        uid = client.users(creds.username).id
        dataset_settings = rg.Settings(
            fields=[rg.TextField("text")], questions=[rg.LabelQuestion("label", labels=["x", "y"])]
        )
        dataset = rg.Dataset(name="old", workspace="old", settings=dataset_settings, client=client).create()
        answered = rg.Response("label", "x", uid, "submitted")
        dataset.records.log(
            [
                rg.Record(id="o0", fields={"text": "old apple"}, responses=[answered]),
                rg.Record(id="o1", fields={"text": "old apple tart"}),
            ]
        )
    finally:
        workspace.down(settings)
    # turn the database back into what the earlier version left: its index, none of the new one
    with sqlite3.connect(server_home(settings) / "argilla.db") as db:
        for kind in ("ai", "ad", "au", "response_ai", "response_ad", "response_au"):
            db.execute(f"DROP TRIGGER prefloop_records_text_{kind}")
        db.execute("DROP TABLE prefloop_records_text")
        for statement in OLD_DDL:
            db.execute(statement)
    conn = workspace.up(settings)
    try:
        queue = {
            "query": {"text": {"q": "apple"}},
            "filters": {
                "and": [
                    {
                        "type": "terms",
                        "scope": {"entity": "response", "property": "status"},
                        "values": ["pending"],
                    }
                ]
            },
        }
        response = httpx.post(
            f"{conn.url}/api/v1/me/datasets/{dataset.id}/records/search",
            json=queue,
            headers={"X-Argilla-Api-Key": creds.api_key},
            timeout=60,
        )
        assert response.status_code == 200, response.text
        body = response.json()
        assert [item["record"]["external_id"] for item in body["items"]] == ["o1"] and body["total"] == 1
    finally:
        workspace.down(settings)
    with sqlite3.connect(server_home(settings) / "argilla.db") as db:
        names = {row[0] for row in db.execute("SELECT name FROM sqlite_master")}
    assert "prefloop_records_fts" not in names and "prefloop_records_fts_ai" not in names
    assert {"prefloop_records_text", "prefloop_records_text_response_ai"} <= names
