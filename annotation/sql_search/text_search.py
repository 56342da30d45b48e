"""Text search over records' fields: SQLite FTS5 or a PostgreSQL tsvector column.

SQLite keeps an FTS5 side table in sync by triggers, so it lives in the server's own write
transactions; PostgreSQL stores the document as a generated, GIN-indexed tsvector column.
"""

from __future__ import annotations

import re

from argilla_server.models import Record
from argilla_server.search_engine.base import TextQuery
from sqlalchemy import Text, and_, cast, func, literal_column, select, text, true
from sqlalchemy.sql.elements import ColumnElement
from sqlalchemy.sql.selectable import Subquery

from .clauses import pg_quote, sqlite_path
from .database import dialect

FTS_TABLE = "prefloop_records_fts"

# SQLite: one FTS5 row per record (rowid = records.rowid) holding every string in its fields except
# chat roles. Triggers keep it in the same transaction as the server's own writes.
_FTS_TEXT = (
    "(SELECT group_concat(value, ' ') FROM json_tree({row}.fields) WHERE type = 'text' AND key IS NOT 'role')"
)
SQLITE_FTS_DDL = [
    f"CREATE VIRTUAL TABLE IF NOT EXISTS {FTS_TABLE} USING fts5(body, tokenize = 'unicode61 remove_diacritics 2')",
    f"""CREATE TRIGGER IF NOT EXISTS {FTS_TABLE}_ai AFTER INSERT ON records BEGIN
        INSERT INTO {FTS_TABLE}(rowid, body) VALUES (NEW.rowid, {_FTS_TEXT.format(row="NEW")}); END""",
    f"""CREATE TRIGGER IF NOT EXISTS {FTS_TABLE}_ad AFTER DELETE ON records BEGIN
        DELETE FROM {FTS_TABLE} WHERE rowid = OLD.rowid; END""",
    f"""CREATE TRIGGER IF NOT EXISTS {FTS_TABLE}_au AFTER UPDATE OF fields ON records BEGIN
        DELETE FROM {FTS_TABLE} WHERE rowid = OLD.rowid;
        INSERT INTO {FTS_TABLE}(rowid, body) VALUES (NEW.rowid, {_FTS_TEXT.format(row="NEW")}); END""",
    # records written before the triggers existed
    f"""INSERT INTO {FTS_TABLE}(rowid, body) SELECT r.rowid, {_FTS_TEXT.format(row="r")} FROM records r
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
    f"CREATE INDEX IF NOT EXISTS ix_{FTS_TABLE}_tsv ON records USING gin ({PG_TSV_COLUMN})",
    f"DROP INDEX IF EXISTS ix_{FTS_TABLE}",  # the expression index of earlier versions
]


def query_words(query: TextQuery | str) -> tuple[list[str], str | None]:
    if isinstance(query, str):
        query = TextQuery(q=query)
    return re.findall(r"\w+", query.q.lower()), query.field


def text_match(
    words: list[str], field: str | None
) -> tuple[ColumnElement, ColumnElement, ColumnElement, Subquery | None]:
    """(where clause, where clause once the hits are joined, relevance score, FTS hits to join for
    that score) for an AND of `words`, optionally within one field. SQLite's bm25 only exists inside
    the FTS query, so its score comes from joining the hits once (a correlated lookup would re-run
    MATCH per row); the join already restricts the page to matches."""
    if dialect() == "sqlite":
        fts_query = " ".join(f'"{w}"' for w in words)  # quoted terms: no FTS5 syntax injection
        hits = (
            select(
                literal_column("rowid").label("rid"), (-func.bm25(literal_column(FTS_TABLE))).label("score")
            )
            .select_from(text(FTS_TABLE))
            .where(literal_column(FTS_TABLE).op("MATCH")(fts_query))
            .subquery()
        )
        rowid = literal_column("records.rowid")
        # the count needs only which rows match; bm25 (4x the cost of MATCH alone) only the page
        clause = rowid.in_(
            select(literal_column("rowid"))
            .select_from(text(FTS_TABLE))
            .where(literal_column(FTS_TABLE).op("MATCH")(fts_query))
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
