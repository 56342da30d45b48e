"""Text search over records' fields: SQLite FTS5 or a PostgreSQL tsvector side table.

Both keep a side table, `prefloop_records_text`, in sync by triggers, so it lives in the server's
own write transactions: on SQLite an FTS5 table, on PostgreSQL a narrow table with a GIN-indexed
tsvector column.
"""

from __future__ import annotations

import re
from uuid import UUID

from argilla_server.models import Record, Response, User
from argilla_server.search_engine.base import TextQuery
from sqlalchemy import Text, and_, cast, column, exists, func, literal_column, not_, select, table, text, true
from sqlalchemy.sql.elements import ColumnElement
from sqlalchemy.sql.selectable import Select, Subquery

from .clauses import pg_quote, sqlite_path
from .database import dialect

FTS_TABLE = "prefloop_records_text"

# SQLite: one FTS5 row per record (rowid = records.rowid). `body` holds every string in its fields
# except chat roles; `tags` holds what the annotator's queue filters on, as tokens: the dataset
# (`d<id>`), the record status (`s<status>`) and each user who responded (`u<id>`). FTS5 then
# counts and ranks "matches the words, in this dataset, pending, not answered by me" from its
# doclists alone, without visiting each match's record and responses (at 50k records and 14k
# matches: count 20 -> 3.5 ms CPU). Triggers keep it in the same transaction as the server's writes.
_FTS_TEXT = (
    "(SELECT group_concat(value, ' ') FROM json_tree({row}.fields) WHERE type = 'text' AND key IS NOT 'role')"
)
_FTS_TAGS = (
    "('d' || {row}.dataset_id || ' s' || {row}.status || coalesce((SELECT ' u' || group_concat(p.user_id, ' u')"
    " FROM responses p WHERE p.record_id = {row}.id), ''))"
)


def _refresh_tags(record_id: str) -> str:
    """Rewrite a record's tags, then a small FTS5 merge step: each rewrite leaves the old row's
    delete markers in the index until segments merge (SQLite 3.40 has no secure-delete), and at
    50k records 23k response writes slowed the queue's text search 18 -> 32 ms CPU without the
    step, 22 ms with it, at the same write cost."""
    return (
        f"UPDATE {FTS_TABLE} SET tags = (SELECT {_FTS_TAGS.format(row='r')} FROM records r"
        f" WHERE r.id = {record_id}) WHERE rowid = (SELECT rowid FROM records WHERE id = {record_id});"
        f" INSERT INTO {FTS_TABLE}({FTS_TABLE}, rank) VALUES ('merge', 4);"
    )


_OLD_FTS_TABLE = "prefloop_records_fts"  # earlier versions: body only
SQLITE_FTS_DDL = [
    *(f"DROP TRIGGER IF EXISTS {_OLD_FTS_TABLE}_{kind}" for kind in ("ai", "ad", "au")),
    f"DROP TABLE IF EXISTS {_OLD_FTS_TABLE}",
    f"CREATE VIRTUAL TABLE IF NOT EXISTS {FTS_TABLE} USING fts5(body, tags,"
    " tokenize = 'unicode61 remove_diacritics 2')",
    f"""CREATE TRIGGER IF NOT EXISTS {FTS_TABLE}_ai AFTER INSERT ON records BEGIN
        INSERT INTO {FTS_TABLE}(rowid, body, tags)
        VALUES (NEW.rowid, {_FTS_TEXT.format(row="NEW")}, {_FTS_TAGS.format(row="NEW")}); END""",
    f"""CREATE TRIGGER IF NOT EXISTS {FTS_TABLE}_ad AFTER DELETE ON records BEGIN
        DELETE FROM {FTS_TABLE} WHERE rowid = OLD.rowid; END""",
    # the server rewrites a record's status after each response, mostly to the same value
    f"""CREATE TRIGGER IF NOT EXISTS {FTS_TABLE}_au AFTER UPDATE OF fields, status, dataset_id ON records
        WHEN NEW.fields IS NOT OLD.fields OR NEW.status IS NOT OLD.status OR NEW.dataset_id IS NOT OLD.dataset_id
        BEGIN
        DELETE FROM {FTS_TABLE} WHERE rowid = OLD.rowid;
        INSERT INTO {FTS_TABLE}(rowid, body, tags)
        VALUES (NEW.rowid, {_FTS_TEXT.format(row="NEW")}, {_FTS_TAGS.format(row="NEW")}); END""",
    f"""CREATE TRIGGER IF NOT EXISTS {FTS_TABLE}_response_ai AFTER INSERT ON responses BEGIN
        {_refresh_tags("NEW.record_id")} END""",
    f"""CREATE TRIGGER IF NOT EXISTS {FTS_TABLE}_response_ad AFTER DELETE ON responses BEGIN
        {_refresh_tags("OLD.record_id")} END""",
    f"""CREATE TRIGGER IF NOT EXISTS {FTS_TABLE}_response_au AFTER UPDATE OF user_id, record_id ON responses
        BEGIN {_refresh_tags("OLD.record_id")} {_refresh_tags("NEW.record_id")} END""",
    # records written before these triggers existed (a database made by an earlier version)
    f"""INSERT INTO {FTS_TABLE}(rowid, body, tags)
        SELECT r.rowid, {_FTS_TEXT.format(row="r")}, {_FTS_TAGS.format(row="r")} FROM records r
        WHERE r.rowid NOT IN (SELECT rowid FROM {FTS_TABLE})""",
]


def pg_document(value: str, members: str) -> str:
    """tsvector of the strings in `value`: plain string members and chat messages' `content`
    (not their `role`). Built from immutable functions, so it can back an expression index."""
    strings = f"jsonb_path_query_array({value}, 'lax {members} ? (@.type() == \"string\")')"
    contents = f"jsonb_path_query_array({value}, 'lax {members}[*].content')"
    return f"jsonb_to_tsvector('simple'::regconfig, {strings} || {contents}, '[\"string\"]'::jsonb)"


# PostgreSQL: a narrow side table of the same name, one row per record: the record's document as a
# GIN-indexed tsvector beside what the annotator's queue filters and sorts on (dataset, status,
# insertion time). A text query's bitmap then visits this table's blocks, not the wide records
# rows (fields, metadata), and the queue's page is ranked, counted and cut here; only the page's
# records are read afterwards. Triggers keep it in the server's own write transactions, like SQLite's.
# (Earlier versions stored the document as a generated column on records; see the DDL below.)
PG_TEXT_DOCUMENT = pg_document("CAST({row}.fields AS JSONB)", "$.*")
_PG_TEXT_WRITE = f"""INSERT INTO {FTS_TABLE} (record_id, dataset_id, status, inserted_at, document)
    VALUES (NEW.id, NEW.dataset_id, NEW.status, NEW.inserted_at, {PG_TEXT_DOCUMENT.format(row="NEW")})
    ON CONFLICT (record_id) DO UPDATE SET dataset_id = EXCLUDED.dataset_id, status = EXCLUDED.status,
        inserted_at = EXCLUDED.inserted_at, document = EXCLUDED.document"""
_PG_OLD_COLUMN = "prefloop_tsv"  # earlier versions: a generated column on records, GIN-indexed
POSTGRES_FTS_DDL = [
    # the server's workers start together: one of them at a time runs this DDL
    f"SELECT pg_advisory_xact_lock(hashtext('{FTS_TABLE}'))",
    f"""CREATE TABLE IF NOT EXISTS {FTS_TABLE} (
        record_id uuid PRIMARY KEY REFERENCES records (id) ON DELETE CASCADE,
        dataset_id uuid NOT NULL,
        status record_status_enum NOT NULL,
        inserted_at timestamp NOT NULL,
        document tsvector NOT NULL)""",
    f"""CREATE OR REPLACE FUNCTION {FTS_TABLE}_write() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN {_PG_TEXT_WRITE}; RETURN NULL; END $$""",
    f"""CREATE OR REPLACE TRIGGER {FTS_TABLE}_ai AFTER INSERT ON records
        FOR EACH ROW EXECUTE FUNCTION {FTS_TABLE}_write()""",
    # the server rewrites a record's status after each response, mostly to the same value
    f"""CREATE OR REPLACE TRIGGER {FTS_TABLE}_au AFTER UPDATE OF fields, status, dataset_id, inserted_at
        ON records FOR EACH ROW WHEN (OLD.status IS DISTINCT FROM NEW.status
            OR OLD.dataset_id IS DISTINCT FROM NEW.dataset_id OR OLD.inserted_at IS DISTINCT FROM NEW.inserted_at
            OR CAST(OLD.fields AS JSONB) IS DISTINCT FROM CAST(NEW.fields AS JSONB))
        EXECUTE FUNCTION {FTS_TABLE}_write()""",
    # records written before the table existed (a database made by an earlier version; deletes
    # follow the foreign key), then statistics for the planner if that added rows, as autovacuum
    # would a minute later
    f"""DO $$ DECLARE added bigint; BEGIN
        INSERT INTO {FTS_TABLE} (record_id, dataset_id, status, inserted_at, document)
        SELECT r.id, r.dataset_id, r.status, r.inserted_at, {PG_TEXT_DOCUMENT.format(row="r")} FROM records r
        WHERE NOT EXISTS (SELECT 1 FROM {FTS_TABLE} t WHERE t.record_id = r.id)
        ON CONFLICT (record_id) DO NOTHING;
        GET DIAGNOSTICS added = ROW_COUNT;
        IF added > 0 THEN ANALYZE {FTS_TABLE}; END IF; END $$""",
    # after the backfill: one bulk build is faster and more compact than 50k inserts into the index
    f"CREATE INDEX IF NOT EXISTS ix_{FTS_TABLE}_document ON {FTS_TABLE} USING gin (document)",
    # the earlier generated column and its index (derived from `fields`, so nothing is lost)
    f"ALTER TABLE records DROP COLUMN IF EXISTS {_PG_OLD_COLUMN}",
    "DROP INDEX IF EXISTS ix_prefloop_records_fts",  # the expression index of earlier versions
]
# the side table as SQLAlchemy sees it (PostgreSQL)
pg_text = table(
    FTS_TABLE,
    column("record_id", Record.id.type),
    column("dataset_id", Record.dataset_id.type),
    column("status", Record.status.type),
    column("inserted_at", Record.inserted_at.type),
    column("document"),
)


def query_words(query: TextQuery | str) -> tuple[list[str], str | None]:
    if isinstance(query, str):
        query = TextQuery(q=query)
    return re.findall(r"\w+", query.q.lower()), query.field


def _fts_words(words: list[str]) -> str:
    """FTS5 query for an AND of `words` in the fields (quoted: no FTS5 syntax injection)."""
    return "body : (" + " ".join(f'"{w}"' for w in words) + ")"


def fts_bm25() -> ColumnElement:
    """bm25 as FTS5 returns it (lower is better); `tags` are filters, not text, so weight 0."""
    return func.bm25(literal_column(FTS_TABLE), 1.0, 0.0)


def fts_match(fts_query: str) -> ColumnElement:
    return literal_column(FTS_TABLE).op("MATCH")(fts_query)


def fts_hits(fts_query: str) -> Select:
    """(rid, score) of the FTS rows matching `fts_query`; score = -bm25, higher is better."""
    return (
        select(literal_column("rowid").label("rid"), (-fts_bm25()).label("score"))
        .select_from(text(FTS_TABLE))
        .where(fts_match(fts_query))
    )


def fts_queue_query(
    words: list[str], dataset_id: UUID, statuses: list[str] | None, unanswered_by: UUID | None
) -> str:
    """FTS5 query for `words` among a dataset's records (with one of `statuses`; that `unanswered_by`
    has not responded to), answered from the index's `tags` alone. Ids are stored as 32-hex."""
    parts = [_fts_words(words), f'tags : "d{dataset_id.hex}"']
    if statuses is not None:
        parts.append("tags : (" + " OR ".join(f'"s{status}"' for status in statuses) + ")")
    fts_query = "(" + " AND ".join(parts) + ")"
    if unanswered_by is not None:
        fts_query += f' NOT tags : "u{unanswered_by.hex}"'
    return fts_query


def record_key() -> ColumnElement:
    """The records column a text hit's `rid` joins to."""
    return literal_column("records.rowid") if dialect() == "sqlite" else Record.id


def pg_tsquery(words: list[str]) -> ColumnElement:
    return func.plainto_tsquery(literal_column("'simple'::regconfig"), " ".join(words))


def pg_queue_matches(
    words: list[str], dataset_id: UUID, statuses: list[str] | None, unanswered_by: User | None
) -> Select:
    """(id, score, inserted_at) of a dataset's records matching `words` (with one of `statuses`;
    that `unanswered_by` has not responded to), from the side table alone: PostgreSQL's bitmap of
    the matches then visits its narrow rows, never the records table."""
    tsquery = pg_tsquery(words)
    where = [pg_text.c.dataset_id == dataset_id, pg_text.c.document.op("@@")(tsquery)]
    if statuses is not None:
        where.append(pg_text.c.status.in_(statuses))
    if unanswered_by is not None:
        mine = select(literal_column("1")).where(
            Response.record_id == pg_text.c.record_id, Response.user_id == unanswered_by.id
        )
        where.append(not_(exists(mine)))
    score = func.ts_rank(pg_text.c.document, tsquery)
    return select(
        pg_text.c.record_id.label("id"), score.label("score"), pg_text.c.inserted_at.label("inserted_at")
    ).where(*where)


def text_match(
    words: list[str], field: str | None
) -> tuple[ColumnElement, ColumnElement, ColumnElement, Subquery | None]:
    """(where clause, where clause once the hits are joined, relevance score, text hits to join on
    `record_key()` for that score) for an AND of `words`, optionally within one field. SQLite's
    bm25 only exists inside the FTS query, so its score comes from joining the hits once (a
    correlated lookup would re-run MATCH per row); the join already restricts the page to matches."""
    if dialect() == "sqlite":
        fts_query = _fts_words(words)
        hits = fts_hits(fts_query).subquery()
        rowid = literal_column("records.rowid")
        # the count needs only which rows match; bm25 (4x the cost of MATCH alone) only the page
        clause = rowid.in_(
            select(literal_column("rowid")).select_from(text(FTS_TABLE)).where(fts_match(fts_query))
        )
        in_field: ColumnElement = true()
        if field:  # FTS narrows to candidates; the field check is a cheap substring test on those
            field_text = func.lower(cast(func.json_extract(Record.fields, sqlite_path([field])), Text))
            in_field = and_(true(), *(field_text.contains(w) for w in words))
        return and_(clause, in_field), in_field, hits.c.score, hits
    tsquery = pg_tsquery(words)
    match = pg_text.c.document.op("@@")(tsquery)
    clause = Record.id.in_(select(pg_text.c.record_id).where(match))
    if field:  # field names are validated by the server against the dataset's fields
        # the whole document narrows to candidates; the field's own document decides and ranks
        document = literal_column(pg_document(f"(CAST(records.fields AS JSONB) -> {pg_quote(field)})", "$"))
        in_field = and_(clause, document.op("@@")(tsquery))
        return in_field, in_field, func.ts_rank(document, tsquery), None
    hits = (
        select(pg_text.c.record_id.label("rid"), func.ts_rank(pg_text.c.document, tsquery).label("score"))
        .where(match)
        .subquery()
    )
    return clause, true(), hits.c.score, hits
