"""SQL clauses for Argilla's filters and sorts: JSON paths, ranges, responses, suggestions, order.

JSON access reads the same on SQLite and PostgreSQL, so each filter is written once.
"""

from __future__ import annotations

import re
from typing import Any
from uuid import UUID

from argilla_server.enums import ResponseStatusFilter
from argilla_server.models import MetadataProperty, Question, Record, Response, Suggestion, User
from argilla_server.search_engine.base import (
    AndFilter,
    Filter,
    MetadataFilterScope,
    Order,
    RangeFilter,
    RecordFilterScope,
    ResponseFilterScope,
    SuggestionFilterScope,
    TermsFilter,
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
    true,
)
from sqlalchemy.sql.elements import ColumnElement

from .database import dialect

# --- JSON access that reads the same on both dialects ----------------------------------------


def json_text(column: Any, path: list[str]) -> ColumnElement:
    """The scalar at `path` as text (NULL when missing)."""
    if dialect() == "sqlite":
        return cast(func.json_extract(column, sqlite_path(path)), Text)
    return column.op("#>>")(cast(path, ARRAY(Text)))


def json_number(column: Any, path: list[str]) -> ColumnElement:
    return cast(json_text(column, path), Float)


def _json_any_in(column: Any, path: list[str], values: list[Any]) -> ColumnElement:
    """True when the value at `path` (a scalar, or any item of a list, e.g. multi-label) is in `values`."""
    values = [str(v) for v in values]
    if dialect() == "sqlite":
        # json_each over a scalar yields the scalar itself, over a list its items
        items = func.json_each(column, sqlite_path(path)).table_valued("value")
        return exists(
            select(literal_column("1")).select_from(items).where(cast(items.c.value, Text).in_(values))
        )
    node = column.op("#>")(cast(path, ARRAY(Text)))
    items = func.json_array_elements_text(node).table_valued("value")
    in_list = exists(select(literal_column("1")).select_from(items).where(items.c.value.in_(values)))
    return case((func.json_typeof(node) == "array", in_list), else_=json_text(column, path).in_(values))


def sqlite_path(path: list[str]) -> str:
    return "$" + "".join(f'."{p}"' for p in path)


def pg_quote(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _range(expr: ColumnElement, filter: RangeFilter) -> ColumnElement:
    clauses = [expr.is_not(None)]
    if filter.ge is not None:
        clauses.append(expr >= filter.ge)
    if filter.le is not None:
        clauses.append(expr <= filter.le)
    return and_(*clauses)


# --- filters ---------------------------------------------------------------------------------


def user_responses(user: User | None, *where: ColumnElement) -> ColumnElement:
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
        clauses.append(not_(user_responses(user)))
    others = [s for s in statuses if s != ResponseStatusFilter.pending]
    if others:
        clauses.append(user_responses(user, Response.status.in_(others)))
    return or_(*clauses) if clauses else false()


def pending_for(filter: Filter | None) -> tuple[User | None, Filter | None]:
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


def queue_filter(filter: Filter | None) -> tuple[User | None, list[str] | None] | None:
    """(user, record statuses) when the filter is at most "pending for `user`" AND "record status
    in ...", the annotation page's own filter, which SQLite's FTS tags answer alone; else None."""
    user, rest = pending_for(filter)
    parts = rest.filters if isinstance(rest, AndFilter) else [rest] if rest else []
    statuses = None
    for part in parts:
        scope = getattr(part, "scope", None)
        if not (
            isinstance(part, TermsFilter)
            and isinstance(scope, RecordFilterScope)
            and scope.property == "status"
        ):
            return None
        values = {str(v) for v in part.values}
        if not all(re.fullmatch(r"\w+", v) for v in values):
            return None
        statuses = sorted(values if statuses is None else values & set(statuses))
    if statuses == []:
        return None  # matches nothing: the general path says so
    return user, statuses


def filter_clause(filter: Filter, dataset_id: UUID) -> ColumnElement:
    if isinstance(filter, AndFilter):
        return and_(true(), *(filter_clause(f, dataset_id) for f in filter.filters))
    scope = filter.scope
    if isinstance(scope, RecordFilterScope):
        column = getattr(Record, scope.property)
        if isinstance(filter, TermsFilter):
            return column.in_(_record_values(scope.property, filter.values))
        return _range(column, filter)
    if isinstance(scope, MetadataFilterScope):
        if isinstance(filter, TermsFilter):
            return _json_any_in(Record.metadata_, [scope.metadata_property], filter.values)
        return _range(json_number(Record.metadata_, [scope.metadata_property]), filter)
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
            match = _range(json_number(Response.values, [scope.question, "value"]), filter)
        return user_responses(scope.user, match)
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
            match = _range(json_number(column, []), filter)
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


async def order_expression(db: Any, order: Order, dataset_id: UUID) -> ColumnElement:
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
            return json_number(Record.metadata_, [scope.metadata_property])
        return json_text(Record.metadata_, [scope.metadata_property])
    if isinstance(scope, SuggestionFilterScope):
        column = getattr(Suggestion, scope.property)
        if scope.property == "score":
            column = json_number(column, [])
        elif scope.property == "value":
            column = json_text(column, [])
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
            value = func.avg(json_number(Response.values, [scope.question, "value"]))
        else:
            value = func.max(getattr(Response, scope.property))
        return select(value).where(*where).scalar_subquery()
    raise ValueError(f"unsupported sort scope {scope!r}")
