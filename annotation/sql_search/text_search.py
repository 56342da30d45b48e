"""Text search over records' fields: SQLite FTS5 or a PostgreSQL tsvector column.

SQLite keeps an FTS5 side table in sync by triggers, so it lives in the server's own write
transactions; PostgreSQL stores the document as a generated, GIN-indexed tsvector column.
"""

from __future__ import annotations

import re
from uuid import UUID

from argilla_server.models import Record
from argilla_server.search_engine.base import TextQuery
from sqlalchemy import Text, and_, cast, func, literal_column, select, text, true
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


# PostgreSQL: the whole-record document as a stored generated column with a GIN index. Ranking
# reads the stored tsvector; an expression index alone finds the rows but ts_rank would rebuild
# the document from the JSON of every match (measured at 50k records: ~800 ms of a text query).
PG_TSV_COLUMN = "prefloop_tsv"
POSTGRES_FTS_DDL = [
    f"ALTER TABLE records ADD COLUMN IF NOT EXISTS {PG_TSV_COLUMN} tsvector"
    f" GENERATED ALWAYS AS ({pg_document('CAST(fields AS JSONB)', '$.*')}) STORED",
    f"CREATE INDEX IF NOT EXISTS ix_prefloop_records_fts_tsv ON records USING gin ({PG_TSV_COLUMN})",
    "DROP INDEX IF EXISTS ix_prefloop_records_fts",  # the expression index of earlier versions
]


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


def text_match(
    words: list[str], field: str | None
) -> tuple[ColumnElement, ColumnElement, ColumnElement, Subquery | None]:
    """(where clause, where clause once the hits are joined, relevance score, FTS hits to join for
    that score) for an AND of `words`, optionally within one field. SQLite's bm25 only exists inside
    the FTS query, so its score comes from joining the hits once (a correlated lookup would re-run
    MATCH per row); the join already restricts the page to matches."""
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
    document = literal_column(f"records.{PG_TSV_COLUMN}")
    if field:  # field names are validated by the server against the dataset's fields
        document = literal_column(pg_document(f"(CAST(records.fields AS JSONB) -> {pg_quote(field)})", "$"))
    tsquery = func.plainto_tsquery(literal_column("'simple'::regconfig"), " ".join(words))
    match = document.op("@@")(tsquery)
    return match, match, func.ts_rank(document, tsquery), None
