"""Feedback under concurrent load and through a `kill -9` of the server: nothing acknowledged is
lost, nothing is stored twice, and a retry of an acknowledged key returns the original row.

A real `prefloop serve` process on a loopback port (bench/bench_feedback_load.py, which prints
the same runs' throughput and latency), 16 clients, a fixed number of posts, SQLite and PostgreSQL.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

# bench/ is scripts, not a package: load the bench's driver by path so test and bench run the same code
_BENCH = Path(__file__).resolve().parents[2] / "bench" / "bench_feedback_load.py"
_spec = importlib.util.spec_from_file_location("bench_feedback_load", _BENCH)
assert _spec and _spec.loader
bench = importlib.util.module_from_spec(_spec)
sys.modules["bench_feedback_load"] = bench  # dataclasses look their module up by name
_spec.loader.exec_module(bench)
database, load_and_crash = bench.database, bench.load_and_crash

pytestmark = pytest.mark.slow

CLIENTS, REQUESTS = 16, 6  # 96 posts: enough that the kill lands mid-load with requests in flight

DATABASES = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]


@pytest.mark.parametrize("kind", DATABASES)
def test_concurrent_clients_store_every_acknowledged_write_exactly_once(
    kind: str, tiny_model: Path, tmp_path: Path
) -> None:
    with database(kind, tmp_path) as url:
        result = load_and_crash(url, tmp_path, str(tiny_model), CLIENTS, REQUESTS, crash=False)
    assert result.writes == CLIENTS * REQUESTS and result.retries == 0


@pytest.mark.parametrize("kind", DATABASES)
def test_kill_9_mid_load_loses_nothing_acknowledged_and_doubles_nothing(
    kind: str, tiny_model: Path, tmp_path: Path
) -> None:
    # `load_and_crash` SIGKILLs the server once half the posts are acknowledged, restarts it on
    # the same store and checks every key is stored once with the id each ack and replay named
    with database(kind, tmp_path) as url:
        result = load_and_crash(url, tmp_path, str(tiny_model), CLIENTS, REQUESTS, crash=True)
    assert result.retries > 0  # requests did hit the dead server and were retried with their keys
    assert result.writes == CLIENTS * REQUESTS
