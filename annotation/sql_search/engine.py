"""The `SearchEngine` Argilla's server uses as its `sql` engine: search, progress and metrics."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any
from uuid import UUID

import numpy as np
from argilla_server.database import AsyncSessionLocal
from argilla_server.enums import SimilarityOrder, SortOrder
from argilla_server.models import (
    Dataset,
    MetadataProperty,
    Record,
    Response,
    Suggestion,
    User,
    Vector,
    VectorSettings,
)
from argilla_server.search_engine.base import (
    Filter,
    FloatMetadataMetrics,
    IntegerMetadataMetrics,
    MetadataMetrics,
    Order,
    SearchEngine,
    SearchResponseItem,
    SearchResponses,
    TermsMetrics,
    TextQuery,
)
from sqlalchemy import case, func, literal_column, not_, select, text
from sqlalchemy.orm import aliased
from sqlalchemy.sql.elements import ColumnElement
from sqlalchemy.sql.selectable import Subquery

from .clauses import (
    filter_clause,
    json_number,
    json_text,
    order_expression,
    pending_for,
    queue_filter,
    user_responses,
)
from .database import COMMON_DDL, POSTGRES_DDL, SQLITE_DDL, dialect
from .text_search import (
    FTS_TABLE,
    POSTGRES_FTS_DDL,
    SQLITE_FTS_DDL,
    fts_bm25,
    fts_hits,
    fts_match,
    fts_queue_query,
    pg_queue_matches,
    query_words,
    record_key,
    text_match,
)

ENGINE_NAME = "sql"

_setup_done = False
_setup_lock = asyncio.Lock()


async def _setup_database() -> None:
    """Create the FTS table/index and helper indexes once per process (idempotent DDL)."""
    global _setup_done
    async with _setup_lock:
        if _setup_done:
            return
        sqlite = dialect() == "sqlite"
        ddl = (SQLITE_FTS_DDL + SQLITE_DDL if sqlite else POSTGRES_FTS_DDL + POSTGRES_DDL) + COMMON_DDL
        async with AsyncSessionLocal() as db:
            for statement in ddl:
                await db.execute(text(statement))
            await db.commit()
        _setup_done = True


async def _fts_queue_search(
    dataset_id: UUID,
    words: list[str],
    user: User | None,
    statuses: list[str] | None,
    offset: int,
    limit: int,
) -> SearchResponses:
    """A text query on SQLite within the annotation page's filter, answered from the FTS index: the
    count from its doclists and the page ranked and cut there, so only the page's records are read
    (at 50k records, 14k matches: 42 -> 18 ms CPU, see bench/README.md). bm25 ties go by rowid,
    which is insertion order."""
    fts_query = fts_queue_query(words, dataset_id, statuses, user.id if user else None)
    match = fts_match(fts_query)
    ranked = (
        fts_hits(fts_query)
        .order_by(fts_bm25(), literal_column("rowid"))
        .offset(offset)
        .limit(limit)
        .subquery()
    )
    page = (
        select(Record.id, ranked.c.score)
        .join_from(ranked, Record, literal_column("records.rowid") == ranked.c.rid)
        .order_by(ranked.c.score.desc(), ranked.c.rid)
    )
    async with AsyncSessionLocal() as db:
        total = await db.scalar(select(func.count()).select_from(text(FTS_TABLE)).where(match)) or 0
        rows = (await db.execute(page)).all() if offset < total else []
    return SearchResponses(
        items=[SearchResponseItem(record_id=rid, score=float(score)) for rid, score in rows], total=total
    )


async def _pg_queue_search(
    dataset_id: UUID,
    words: list[str],
    user: User | None,
    statuses: list[str] | None,
    offset: int,
    limit: int,
) -> SearchResponses:
    """The same query on PostgreSQL, answered from the narrow side table: the bitmap of the matches
    visits its rows (5k blocks at 50k records, where the records table's were 8k, and the records
    are never joined), the annotator's responses are hash-anti-joined, and the page is ranked, cut
    and counted in one pass. Ties go by insertion time and id, as in the general path."""
    matches = pg_queue_matches(words, dataset_id, statuses, user)
    ranked = matches.offset(0).subquery()  # OFFSET 0: rank once, below the window and the sort
    page = (
        select(ranked.c.id, ranked.c.score, func.count().over())
        .order_by(ranked.c.score.desc(), ranked.c.inserted_at, ranked.c.id)
        .offset(offset)
        .limit(limit)
    )
    async with AsyncSessionLocal() as db:
        # A common word matches a quarter of the records or more, and the planner then prefers to
        # test every row's tsvector (a seq scan: 35 ms at 50k records) over the GIN bitmap and its
        # heap visits (11 ms, EXPLAIN ANALYZE): its cost model prices `@@` like a comparison.
        await db.execute(text("SET LOCAL enable_seqscan = off"))
        rows = (await db.execute(page)).all()
        if rows:
            total = rows[0][2]
        else:  # past the last page the window has no row to say the total
            total = await db.scalar(select(func.count()).select_from(matches.subquery())) or 0
    return SearchResponses(
        items=[SearchResponseItem(record_id=rid, score=float(score)) for rid, score, _ in rows], total=total
    )


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
            "database": dialect(),
            "text_search": "fts5" if dialect() == "sqlite" else "tsvector",
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
            words, field = query_words(query)
            if not words:
                return SearchResponses(items=[], total=0)
            queue = queue_filter(filter) if not sort and not field else None
            if queue is not None:
                queue_search = _fts_queue_search if dialect() == "sqlite" else _pg_queue_search
                return await queue_search(dataset.id, words, *queue, offset=offset, limit=limit)
            match, page_match, score, hits = text_match(words, field)
            text_where.append(match)
            text_page_where.append(page_match)
        # The queue's count on SQLite: records pending for the user = all matching records - those
        # the user answered. That walks the user's responses (an index range) instead of probing
        # each of the dataset's records (3x faster at 50k). With a text query the matches are the
        # smaller set; PostgreSQL hash-anti-joins NOT EXISTS, faster than the two counts.
        split = query is None and dialect() == "sqlite"
        pending_user, rest = pending_for(filter) if split else (None, filter)
        if rest is not None:
            where.append(filter_clause(rest, dataset.id))
        page_where = where if pending_user is None else [*where, not_(user_responses(pending_user))]
        page_where = [*page_where, *text_page_where]
        where = [*where, *text_where]

        async with AsyncSessionLocal() as db:
            # (sort key, descending) pairs; None stands for the relevance score
            keys: list[tuple[ColumnElement | None, bool]] = []
            for order in sort or []:
                expr = await order_expression(db, order, dataset.id)
                # missing values last in both directions, like Elasticsearch
                keys += [(case((expr.is_(None), 1), else_=0), False), (expr, order.order == SortOrder.desc)]
            if score is not None and not sort:
                keys.append((None, True))
            # insertion order otherwise: `push` logs records uncertainty-first for active learning,
            # so (unlike ES's per-user shuffle) every annotator starts with the most informative pairs
            keys += [(Record.inserted_at, False), (Record.id, False)]

            if score is None:
                columns: list[Any] = [k for k, _ in keys]
                page = select(Record.id, literal_column("NULL")).where(*page_where)
            else:
                # Rank the matches into narrow rows first, then count and sort those: PostgreSQL
                # otherwise carried each match's stored tsvector into the window and spilled it to
                # disk. Ranking visits every match anyway, so the window counts them in the same
                # pass (it is taken before LIMIT) instead of running the text match a second time.
                matches = select(
                    Record.id.label("id"),
                    score.label("score"),
                    *(k.label(f"key{i}") for i, (k, _) in enumerate(keys) if k is not None),
                ).select_from(Record)
                if hits is not None:
                    matches = matches.join(hits, hits.c.rid == record_key())
                # OFFSET 0 keeps PostgreSQL from flattening the subquery back into one select
                ranked = matches.where(*page_where).offset(0).subquery()
                columns = [
                    ranked.c.score if k is None else ranked.c[f"key{i}"] for i, (k, _) in enumerate(keys)
                ]
                page = select(ranked.c.id, ranked.c.score, func.count().over())
            order_by = [
                c.desc() if descending else c.asc() for c, (_, descending) in zip(columns, keys, strict=True)
            ]
            page = page.order_by(*order_by).offset(offset).limit(limit)
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
            where.append(filter_clause(filter, dataset.id))
        if query is not None:
            words, field = query_words(query)
            if words:
                where.append(text_match(words, field)[0])
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
                value = json_text(Record.metadata_, [name])
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
            value = json_number(Record.metadata_, [name])
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
