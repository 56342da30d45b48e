"""An Argilla `SearchEngine` that answers from the server's own SQL tables (SQLite or PostgreSQL).

Argilla 2.8 keeps records, responses, suggestions, metadata and vectors in its SQL database and
mirrors them into Elasticsearch only to search. This engine skips the mirror: every filter, sort,
page and count becomes one SQL statement over those tables, so the index hooks are no-ops and the
results can never be stale. Text search uses SQLite FTS5 (a side table kept in sync by triggers,
so it lives in the server's own write transactions) or a PostgreSQL GIN-indexed tsvector column
generated from the fields;
vector similarity is brute force (cosine, scored like Elasticsearch: (1 + cos) / 2).

This module runs inside the Argilla server's virtualenv (see `launcher.py`): it may import only
argilla_server, sqlalchemy, numpy and the standard library, never the rest of prefloop.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterable
from typing import Any
from uuid import UUID

import numpy as np
from argilla_server.database import AsyncSessionLocal
from argilla_server.enums import ResponseStatusFilter, SimilarityOrder, SortOrder
from argilla_server.models import (
    Dataset,
    MetadataProperty,
    Question,
    Record,
    Response,
    Suggestion,
    User,
    Vector,
    VectorSettings,
)
from argilla_server.search_engine.base import (
    AndFilter,
    Filter,
    FloatMetadataMetrics,
    IntegerMetadataMetrics,
    MetadataFilterScope,
    MetadataMetrics,
    Order,
    RangeFilter,
    RecordFilterScope,
    ResponseFilterScope,
    SearchEngine,
    SearchResponseItem,
    SearchResponses,
    SuggestionFilterScope,
    TermsFilter,
    TermsMetrics,
    TextQuery,
)
from sqlalchemy import (
    ARRAY,
    Float,
    Text,
    and_,
    case,
    cast,
    exists,
    false,
    func,
    literal_column,
    not_,
    or_,
    select,
    text,
    true,
)
from sqlalchemy.orm import aliased
from sqlalchemy.sql.elements import ColumnElement
from sqlalchemy.sql.selectable import Subquery

ENGINE_NAME = "sql"
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


def _pg_document(value: str, members: str) -> str:
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
    f" GENERATED ALWAYS AS ({_pg_document('CAST(fields AS JSONB)', '$.*')}) STORED",
    f"CREATE INDEX IF NOT EXISTS ix_{FTS_TABLE}_tsv ON records USING gin ({PG_TSV_COLUMN})",
    f"DROP INDEX IF EXISTS ix_{FTS_TABLE}",  # the expression index of earlier versions
]
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

_setup_done = False
_setup_lock = asyncio.Lock()


def _dialect() -> str:
    return AsyncSessionLocal.kw["bind"].dialect.name


async def _setup_database() -> None:
    """Create the FTS table/index and helper indexes once per process (idempotent DDL)."""
    global _setup_done
    async with _setup_lock:
        if _setup_done:
            return
        sqlite = _dialect() == "sqlite"
        ddl = (SQLITE_FTS_DDL + SQLITE_DDL if sqlite else POSTGRES_FTS_DDL + POSTGRES_DDL) + COMMON_DDL
        async with AsyncSessionLocal() as db:
            for statement in ddl:
                await db.execute(text(statement))
            await db.commit()
        _setup_done = True


# --- JSON access that reads the same on both dialects ----------------------------------------


def _json_text(column: Any, path: list[str]) -> ColumnElement:
    """The scalar at `path` as text (NULL when missing)."""
    if _dialect() == "sqlite":
        return cast(func.json_extract(column, _sqlite_path(path)), Text)
    return column.op("#>>")(cast(path, ARRAY(Text)))


def _json_number(column: Any, path: list[str]) -> ColumnElement:
    return cast(_json_text(column, path), Float)


def _json_any_in(column: Any, path: list[str], values: list[Any]) -> ColumnElement:
    """True when the value at `path` (a scalar, or any item of a list, e.g. multi-label) is in `values`."""
    values = [str(v) for v in values]
    if _dialect() == "sqlite":
        # json_each over a scalar yields the scalar itself, over a list its items
        items = func.json_each(column, _sqlite_path(path)).table_valued("value")
        return exists(
            select(literal_column("1")).select_from(items).where(cast(items.c.value, Text).in_(values))
        )
    node = column.op("#>")(cast(path, ARRAY(Text)))
    items = func.json_array_elements_text(node).table_valued("value")
    in_list = exists(select(literal_column("1")).select_from(items).where(items.c.value.in_(values)))
    return case((func.json_typeof(node) == "array", in_list), else_=_json_text(column, path).in_(values))


def _sqlite_path(path: list[str]) -> str:
    return "$" + "".join(f'."{p}"' for p in path)


def _pg_quote(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _range(expr: ColumnElement, filter: RangeFilter) -> ColumnElement:
    clauses = [expr.is_not(None)]
    if filter.ge is not None:
        clauses.append(expr >= filter.ge)
    if filter.le is not None:
        clauses.append(expr <= filter.le)
    return and_(*clauses)


# --- filters ---------------------------------------------------------------------------------


def _user_responses(user: User | None, *where: ColumnElement) -> ColumnElement:
    """EXISTS a response on the current record (by `user`, if given) matching `where`."""
    clauses = [Response.record_id == Record.id, *where]
    if user is not None:
        clauses.append(Response.user_id == user.id)
    return exists(select(literal_column("1")).select_from(Response).where(*clauses))


def _response_status_clause(filter: TermsFilter) -> ColumnElement:
    user = filter.scope.user
    statuses = [str(v) for v in filter.values]
    clauses = []
    if ResponseStatusFilter.pending in statuses:
        # pending = no response from this user (or, without a user, no response at all)
        clauses.append(not_(_user_responses(user)))
    others = [s for s in statuses if s != ResponseStatusFilter.pending]
    if others:
        clauses.append(_user_responses(user, Response.status.in_(others)))
    return or_(*clauses) if clauses else false()


def _pending_for(filter: Filter | None) -> tuple[User | None, Filter | None]:
    """(user, the rest of the filter) when the filter is "pending for `user`" AND'ed with others:
    the annotator's queue, which `search` counts from the annotator's responses instead."""
    parts = filter.filters if isinstance(filter, AndFilter) else [filter] if filter else []
    for i, part in enumerate(parts):
        scope = getattr(part, "scope", None)
        if (
            isinstance(part, TermsFilter)
            and isinstance(scope, ResponseFilterScope)
            and scope.question is None
            and scope.property == "status"
            and scope.user is not None
            and [str(v) for v in part.values] == [ResponseStatusFilter.pending]
        ):
            rest = parts[:i] + parts[i + 1 :]
            return scope.user, AndFilter(filters=rest) if rest else None
    return None, filter


def _filter_clause(filter: Filter, dataset_id: UUID) -> ColumnElement:
    if isinstance(filter, AndFilter):
        return and_(true(), *(_filter_clause(f, dataset_id) for f in filter.filters))
    scope = filter.scope
    if isinstance(scope, RecordFilterScope):
        column = getattr(Record, scope.property)
        if isinstance(filter, TermsFilter):
            return column.in_(_record_values(scope.property, filter.values))
        return _range(column, filter)
    if isinstance(scope, MetadataFilterScope):
        if isinstance(filter, TermsFilter):
            return _json_any_in(Record.metadata_, [scope.metadata_property], filter.values)
        return _range(_json_number(Record.metadata_, [scope.metadata_property]), filter)
    if isinstance(scope, SuggestionFilterScope):
        return _suggestion_clause(filter, scope, dataset_id)
    if isinstance(scope, ResponseFilterScope):
        if scope.question is None:
            if scope.property == "status" and isinstance(filter, TermsFilter):
                return _response_status_clause(filter)
            raise ValueError(f"cannot filter responses by {scope.property!r}")
        if isinstance(filter, TermsFilter):
            match = _json_any_in(Response.values, [scope.question, "value"], filter.values)
        else:
            match = _range(_json_number(Response.values, [scope.question, "value"]), filter)
        return _user_responses(scope.user, match)
    raise ValueError(f"unsupported filter scope {scope!r}")


def _record_values(prop: str, values: list[Any]) -> list[Any]:
    """Terms on a record column as that column binds them: the SDK's `_server_id` filter arrives as
    `id` with string values, and the UUID column type needs UUIDs (a str has no `.hex`)."""
    if prop != "id":
        return [str(v) for v in values]
    ids = []
    for value in values:
        try:
            ids.append(value if isinstance(value, UUID) else UUID(str(value)))
        except ValueError:
            continue  # not a uuid: matches no record, like Elasticsearch's term query
    return ids


def _suggestion_clause(filter: Filter, scope: SuggestionFilterScope, dataset_id: UUID) -> ColumnElement:
    if scope.property in ("value", "score"):
        column = getattr(Suggestion, scope.property)
        if isinstance(filter, TermsFilter):
            match = _json_any_in(column, [], filter.values)
        else:
            match = _range(_json_number(column, []), filter)
    else:  # agent, type: plain columns
        column = getattr(Suggestion, scope.property)
        match = (
            column.in_([str(v) for v in filter.values])
            if isinstance(filter, TermsFilter)
            else _range(column, filter)
        )
    return exists(
        select(literal_column("1"))
        .select_from(Suggestion)
        .join(Question, Question.id == Suggestion.question_id)
        .where(
            Suggestion.record_id == Record.id,
            Question.name == scope.question,
            Question.dataset_id == dataset_id,
            match,
        )
    )


# --- sorting ---------------------------------------------------------------------------------


async def _order_expression(db: Any, order: Order, dataset_id: UUID) -> ColumnElement:
    scope = order.scope
    if isinstance(scope, RecordFilterScope):
        return getattr(Record, scope.property)
    if isinstance(scope, MetadataFilterScope):
        kind = await db.scalar(
            select(MetadataProperty.settings).where(
                MetadataProperty.dataset_id == dataset_id, MetadataProperty.name == scope.metadata_property
            )
        )
        if kind and kind.get("type") in ("integer", "float"):
            return _json_number(Record.metadata_, [scope.metadata_property])
        return _json_text(Record.metadata_, [scope.metadata_property])
    if isinstance(scope, SuggestionFilterScope):
        column = getattr(Suggestion, scope.property)
        if scope.property == "score":
            column = _json_number(column, [])
        elif scope.property == "value":
            column = _json_text(column, [])
        return (
            select(column)
            .join(Question, Question.id == Suggestion.question_id)
            .where(
                Suggestion.record_id == Record.id,
                Question.name == scope.question,
                Question.dataset_id == dataset_id,
            )
            .limit(1)
            .scalar_subquery()
        )
    if isinstance(scope, ResponseFilterScope):
        where = [Response.record_id == Record.id]
        if scope.user is not None:
            where.append(Response.user_id == scope.user.id)
        if scope.question:  # Elasticsearch sorts nested responses by their average ("mode": "avg")
            value = func.avg(_json_number(Response.values, [scope.question, "value"]))
        else:
            value = func.max(getattr(Response, scope.property))
        return select(value).where(*where).scalar_subquery()
    raise ValueError(f"unsupported sort scope {scope!r}")


# --- text ------------------------------------------------------------------------------------


def _words(query: TextQuery | str) -> tuple[list[str], str | None]:
    if isinstance(query, str):
        query = TextQuery(q=query)
    return re.findall(r"\w+", query.q.lower()), query.field


def _text_match(
    words: list[str], field: str | None
) -> tuple[ColumnElement, ColumnElement, ColumnElement, Subquery | None]:
    """(where clause, where clause once the hits are joined, relevance score, FTS hits to join for
    that score) for an AND of `words`, optionally within one field. SQLite's bm25 only exists inside
    the FTS query, so its score comes from joining the hits once (a correlated lookup would re-run
    MATCH per row); the join already restricts the page to matches."""
    if _dialect() == "sqlite":
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
            field_text = func.lower(cast(func.json_extract(Record.fields, _sqlite_path([field])), Text))
            in_field = and_(true(), *(field_text.contains(w) for w in words))
        return and_(clause, in_field), in_field, hits.c.score, hits
    document = literal_column(f"records.{PG_TSV_COLUMN}")
    if field:  # field names are validated by the server against the dataset's fields
        document = literal_column(_pg_document(f"(CAST(records.fields AS JSONB) -> {_pg_quote(field)})", "$"))
    tsquery = func.plainto_tsquery(literal_column("'simple'::regconfig"), " ".join(words))
    match = document.op("@@")(tsquery)
    return match, match, func.ts_rank(document, tsquery), None


# --- the engine ------------------------------------------------------------------------------


@SearchEngine.register(engine_name=ENGINE_NAME)
class SQLSearchEngine(SearchEngine):
    """Answers Argilla's search, progress and metrics queries with SQL over its own tables."""

    @classmethod
    async def new_instance(cls) -> SQLSearchEngine:
        await _setup_database()
        return cls()

    async def close(self) -> None:
        pass

    async def ping(self) -> bool:
        async with AsyncSessionLocal() as db:
            return (await db.scalar(select(literal_column("1")))) == 1

    async def info(self) -> dict:
        return {
            "engine": ENGINE_NAME,
            "database": _dialect(),
            "text_search": "fts5" if _dialect() == "sqlite" else "tsvector",
        }

    # Records, responses, suggestions and vectors already live in SQL: nothing to mirror.
    async def create_index(self, dataset: Dataset) -> None:
        pass

    async def delete_index(self, dataset: Dataset) -> None:
        pass

    async def configure_metadata_property(
        self, dataset: Dataset, metadata_property: MetadataProperty
    ) -> None:
        pass

    async def index_records(self, dataset: Dataset, records: Iterable[Record]) -> None:
        pass

    async def partial_record_update(self, record: Record, **update: Any) -> None:
        pass

    async def delete_records(self, dataset: Dataset, records: Iterable[Record]) -> None:
        pass

    async def update_record_response(self, response: Response) -> None:
        pass

    async def delete_record_response(self, response: Response) -> None:
        pass

    async def update_record_suggestion(self, suggestion: Suggestion) -> None:
        pass

    async def delete_record_suggestion(self, suggestion: Suggestion) -> None:
        pass

    async def get_dataset_progress(self, dataset: Dataset) -> dict:
        async with AsyncSessionLocal() as db:
            if await db.scalar(select(Dataset.status).where(Dataset.id == dataset.id)) == "draft":
                return {}
            rows = await db.execute(
                select(Record.status, func.count())
                .where(Record.dataset_id == dataset.id)
                .group_by(Record.status)
            )
            counts = {str(status.value if hasattr(status, "value") else status): n for status, n in rows}
        return {"total": sum(counts.values()), **counts}

    async def get_dataset_user_progress(self, dataset: Dataset, user: User) -> dict:
        async with AsyncSessionLocal() as db:
            if await db.scalar(select(Dataset.status).where(Dataset.id == dataset.id)) == "draft":
                return {}
            rows = await db.execute(
                select(Response.status, func.count())
                .join(Record, Record.id == Response.record_id)
                .where(Record.dataset_id == dataset.id, Response.user_id == user.id)
                .group_by(Response.status)
            )
            counts = {str(status.value if hasattr(status, "value") else status): n for status, n in rows}
        return {"total": sum(counts.values()), **counts}

    async def search(
        self,
        dataset: Dataset,
        query: TextQuery | str | None = None,
        filter: Filter | None = None,
        sort: list[Order] | None = None,
        offset: int = 0,
        limit: int = 100,
        user_id: UUID | None = None,  # passed by /me/.../search; ES uses it for a per-user shuffle
    ) -> SearchResponses:
        where: list[ColumnElement] = [Record.dataset_id == dataset.id]
        score: ColumnElement | None = None
        hits: Subquery | None = None
        text_where: list[ColumnElement] = []  # for the count
        text_page_where: list[ColumnElement] = []  # for the page
        if query is not None:
            words, field = _words(query)
            if not words:
                return SearchResponses(items=[], total=0)
            match, page_match, score, hits = _text_match(words, field)
            text_where.append(match)
            text_page_where.append(page_match)
        # The queue's count on SQLite: records pending for the user = all matching records - those
        # the user answered. That walks the user's responses (an index range) instead of probing
        # each of the dataset's records (3x faster at 50k). With a text query the matches are the
        # smaller set; PostgreSQL hash-anti-joins NOT EXISTS, faster than the two counts.
        split = query is None and _dialect() == "sqlite"
        pending_user, rest = _pending_for(filter) if split else (None, filter)
        if rest is not None:
            where.append(_filter_clause(rest, dataset.id))
        page_where = where if pending_user is None else [*where, not_(_user_responses(pending_user))]
        page_where = [*page_where, *text_page_where]
        where = [*where, *text_where]

        async with AsyncSessionLocal() as db:
            order_by: list[ColumnElement] = []
            for order in sort or []:
                expr = await _order_expression(db, order, dataset.id)
                # missing values last in both directions, like Elasticsearch
                order_by += [
                    case((expr.is_(None), 1), else_=0),
                    expr.desc() if order.order == SortOrder.desc else expr.asc(),
                ]
            if score is not None and not sort:
                order_by.append(score.desc())
            # insertion order otherwise: `push` logs records uncertainty-first for active learning,
            # so (unlike ES's per-user shuffle) every annotator starts with the most informative pairs
            order_by += [Record.inserted_at.asc(), Record.id.asc()]

            columns = [Record.id, score if score is not None else literal_column("NULL")]
            if score is not None:
                # ranking visits every match anyway: count them in the same pass (the window is
                # taken before LIMIT) instead of running the text match a second time
                columns.append(func.count().over())
            page = select(*columns).select_from(Record)
            if hits is not None:
                page = page.join(hits, hits.c.rid == literal_column("records.rowid"))
            page = page.where(*page_where).order_by(*order_by).offset(offset).limit(limit)
            rows = (await db.execute(page)).all()
            if score is not None and rows:
                total = rows[0][2]
            else:
                total = await db.scalar(select(func.count()).select_from(Record).where(*where)) or 0
            if pending_user is not None:
                mine = aliased(Response)  # not the `responses` that filters in `where` correlate to
                answered = (
                    select(func.count())
                    .select_from(mine)
                    .join(Record, Record.id == mine.record_id)
                    .where(mine.user_id == pending_user.id, *where)
                )
                total -= await db.scalar(answered) or 0  # one response per (record, user): a count
        items = [
            SearchResponseItem(record_id=row[0], score=float(row[1]) if row[1] is not None else 1.0)
            for row in rows
        ]
        return SearchResponses(items=items, total=total or 0)

    async def similarity_search(
        self,
        dataset: Dataset,
        vector_settings: VectorSettings,
        value: list[float] | None = None,
        record: Record | None = None,
        query: TextQuery | str | None = None,
        filter: Filter | None = None,
        max_results: int = 100,
        order: SimilarityOrder = SimilarityOrder.most_similar,
        threshold: float | None = None,
    ) -> SearchResponses:
        if bool(value) == bool(record):
            raise ValueError("Must provide either vector value or record to compute the similarity search")
        where: list[ColumnElement] = [
            Record.dataset_id == dataset.id,
            Vector.vector_settings_id == vector_settings.id,
        ]
        if filter is not None:
            where.append(_filter_clause(filter, dataset.id))
        if query is not None:
            words, field = _words(query)
            if words:
                where.append(_text_match(words, field)[0])
        async with AsyncSessionLocal() as db:
            if record is not None:
                value = await db.scalar(
                    select(Vector.value).where(
                        Vector.record_id == record.id, Vector.vector_settings_id == vector_settings.id
                    )
                )
                if not value:
                    raise ValueError("Cannot find a vector value to apply with provided info")
                where.append(Record.id != record.id)
            rows = (
                await db.execute(
                    select(Vector.record_id, Vector.value)
                    .join(Record, Record.id == Vector.record_id)
                    .where(*where)
                )
            ).all()
        if not rows:
            return SearchResponses(items=[], total=0)
        matrix = np.asarray([v for _, v in rows], dtype=np.float32)
        target = np.asarray(value, dtype=np.float32)
        if order == SimilarityOrder.least_similar:
            target = -target  # what Elasticsearch's engine does too
        cosine = matrix @ target / (np.linalg.norm(matrix, axis=1) * np.linalg.norm(target) + 1e-12)
        scores = (1.0 + cosine) / 2.0
        top = np.argsort(-scores, kind="stable")[:max_results]
        items = [
            SearchResponseItem(record_id=rows[i][0], score=float(scores[i]))
            for i in top
            if threshold is None or scores[i] >= threshold
        ]
        return SearchResponses(items=items, total=len(items))

    async def compute_metrics_for(self, metadata_property: MetadataProperty) -> MetadataMetrics:
        name, dataset_id = metadata_property.name, metadata_property.dataset_id
        kind = metadata_property.settings.get("type")
        async with AsyncSessionLocal() as db:
            if kind == "terms":
                value = _json_text(Record.metadata_, [name])
                rows = (
                    await db.execute(
                        select(value, func.count())
                        .where(Record.dataset_id == dataset_id, value.is_not(None))
                        .group_by(value)
                        .order_by(func.count().desc(), value)
                    )
                ).all()
                return TermsMetrics(
                    total=sum(n for _, n in rows),
                    values=[TermsMetrics.TermCount(term=str(t), count=n) for t, n in rows],
                )
            value = _json_number(Record.metadata_, [name])
            low, high = (
                await db.execute(
                    select(func.min(value), func.max(value)).where(Record.dataset_id == dataset_id)
                )
            ).one()
        if kind == "integer":
            return IntegerMetadataMetrics(
                min=int(low) if low is not None else None, max=int(high) if high is not None else None
            )
        return FloatMetadataMetrics(min=low, max=high)
