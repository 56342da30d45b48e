"""An Argilla `SearchEngine` that answers from the server's own SQL tables (SQLite or PostgreSQL).

Argilla 2.8 keeps records, responses, suggestions, metadata and vectors in its SQL database and
mirrors them into Elasticsearch only to search. This engine skips the mirror: every filter, sort,
page and count becomes one SQL statement over those tables, so the index hooks are no-ops and the
results can never be stale. Text search uses a side table kept in sync by triggers, so it lives in
the server's own write transactions: SQLite FTS5, or on PostgreSQL a narrow table with a
GIN-indexed tsvector of the fields; vector similarity is brute force (cosine, scored like Elasticsearch: (1 + cos) / 2).

This package runs inside the Argilla server's virtualenv (see `annotation/launcher.py`): it may
import only argilla_server, sqlalchemy, numpy and the standard library, never the rest of prefloop.

Rooms: `database` (dialect, helper indexes), `clauses` (filters and sorts as SQL), `text_search`
(FTS5 / tsvector side tables) and `engine` (the `SQLSearchEngine` class). Importing this package registers the
engine with Argilla under the name `sql`.
"""

from __future__ import annotations

from .engine import ENGINE_NAME, SQLSearchEngine

__all__ = ["ENGINE_NAME", "SQLSearchEngine"]
