"""Which SQL dialect the Argilla server runs on, and the helper indexes its queries need."""

from __future__ import annotations

from argilla_server.database import AsyncSessionLocal

# Covering indexes for the per-annotator queries (measured at 50k records: the pending-queue count
# 1.6x and an annotator's progress 5x faster than with Argilla's own indexes alone; see
# bench/bench_annotation_search.py, which prints each query's plan).
COMMON_DDL = [
    # the queue: records of a dataset by status in serving order, with the id the EXISTS probe needs
    "CREATE INDEX IF NOT EXISTS ix_prefloop_records_queue ON records (dataset_id, status, inserted_at, id)",
    # an annotator's progress: their responses by status, joined to records without table lookups
    "CREATE INDEX IF NOT EXISTS ix_prefloop_responses_user ON responses (user_id, status, record_id)",
    "DROP INDEX IF EXISTS ix_prefloop_records_id_dataset",  # earlier versions; see below
]
# SQLite joins by probing one index per row: from the annotator's responses to their records'
# dataset and status without a table lookup. PostgreSQL hash-joins the queue index instead, and
# picks this one when it exists, at twice the cost (EXPLAIN ANALYZE at 50k records), so SQLite only.
SQLITE_DDL = [
    "CREATE INDEX IF NOT EXISTS ix_prefloop_records_id_dataset_status ON records (id, dataset_id, status)",
]
POSTGRES_DDL = ["DROP INDEX IF EXISTS ix_prefloop_records_id_dataset_status"]


def dialect() -> str:
    return AsyncSessionLocal.kw["bind"].dialect.name
