"""Issue 12, HTTP side: hostile input and access control against a real uvicorn server.

Each test drives the server over loopback the way an attacker or a careless client would:
raw sockets where the order of bytes matters (a body that never ends, a body never sent),
raw header bytes where httpx would refuse to send them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import socket
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

from tests.serving.conftest import (
    ADMIN_KEY,
    CLIENT_KEY,
    RunningServer,
    app_server,
    free_port,
    serve_config,
)

LIMITS = {"max_tokens": 64, "default_max_tokens": 4, "max_n": 4, "max_request_bytes": 20000}
AUTH = {"api_keys": [CLIENT_KEY], "admin_key": ADMIN_KEY}
KEY = {"Authorization": f"Bearer {CLIENT_KEY}"}
CHAT = {"model": "tiny-random", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


def raw_exchange(
    url: str, head: str, parts: list[bytes] = (), timeout: float = 10.0
) -> tuple[int, dict, bytes]:
    """Send a request head and body parts as raw bytes, read one response (status, headers, body)."""
    where = urlsplit(url)
    with socket.create_connection((where.hostname, where.port), timeout=timeout) as conn:
        conn.sendall(head.replace("\n", "\r\n").encode("latin-1") + b"\r\n")
        for part in parts:
            conn.sendall(part)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = conn.recv(65536)
            assert chunk, f"connection closed before a response: {data!r}"
            data += chunk
        head_bytes, _, body = data.partition(b"\r\n\r\n")
        lines = head_bytes.decode("latin-1").split("\r\n")
        headers = dict(line.split(": ", 1) for line in lines[1:])
        headers = {k.lower(): v for k, v in headers.items()}
        while len(body) < int(headers.get("content-length", 0)):
            chunk = conn.recv(65536)
            if not chunk:
                break
            body += chunk
    return int(lines[0].split()[1]), headers, body


def assert_openai_error(response: httpx.Response, status: int | None = None) -> dict:
    if status is not None:
        assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"], error
    return error


# --- bodies: size, encoding, nesting, surrogates ----------------------------------------------


def test_chunked_body_over_the_limit_is_413_before_it_ends(server: RunningServer) -> None:
    head = (
        "POST /v1/feedback HTTP/1.1\nHost: test\n"
        f"Authorization: Bearer {CLIENT_KEY}\nContent-Type: application/json\n"
        "Transfer-Encoding: chunked\n"
    )
    chunk = b'{"comment": "' + b"x" * 4083
    parts = [b"%x\r\n%s\r\n" % (len(chunk), chunk)] * 6  # 24 KiB against a 20000-byte limit...
    status, _, body = raw_exchange(server.url, head, parts)  # ...and no final 0-chunk: never ends
    assert status == 413
    assert "the limit is 20000" in json.loads(body)["error"]["message"]


def test_unauthenticated_request_is_401_before_its_body_is_read(server: RunningServer) -> None:
    head = "POST /v1/chat/completions HTTP/1.1\nHost: test\nContent-Type: application/json\nContent-Length: 5000\n"
    status, headers, body = raw_exchange(server.url, head, [])  # the 5000 bytes are never sent
    assert status == 401 and headers["www-authenticate"] == "Bearer"
    assert json.loads(body)["error"]["code"] == "invalid_api_key"


def test_declared_oversized_body_is_413_without_reading_it(server: RunningServer) -> None:
    head = (
        "POST /v1/chat/completions HTTP/1.1\nHost: test\n"
        f"Authorization: Bearer {CLIENT_KEY}\nContent-Type: application/json\nContent-Length: 999999999\n"
    )
    status, _, body = raw_exchange(server.url, head, [])
    assert status == 413 and "999999999 bytes" in json.loads(body)["error"]["message"]


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/feedback", {"type": "thumbs", "completion_id": "x", "value": "up", "comment": "\ud800"}),
        ("/v1/feedback", {"type": "rating", "completion_id": "\udfff", "stars": 3}),
        (
            "/v1/feedback",
            {"type": "thumbs", "completion_id": "x", "value": "up", "idempotency_key": "k\ud800"},
        ),
        (
            "/v1/feedback",
            {"type": "pairwise", "chosen_id": "a", "rejected_id": "b", "corrected_response": "\ud83d"},
        ),
        ("/v1/chat/completions", CHAT | {"messages": [{"role": "user", "content": "hi \ud800"}]}),
        ("/v1/chat/completions", CHAT | {"model": "\ud800"}),
        ("/v1/chat/completions", CHAT | {"stop": ["\udc00"]}),
        ("/v1/chat/completions", CHAT | {"user": {"\ud800": 1}}),  # even an ignored field, even a key
    ],
)
def test_lone_surrogate_in_any_string_is_400(server: RunningServer, path: str, body: dict) -> None:
    raw = json.dumps(body)  # ensure_ascii: the surrogate travels as the JSON escape \ud800
    assert "\\ud" in raw or "\\udc" in raw or "\\udf" in raw
    r = httpx.post(f"{server.url}{path}", content=raw, headers=KEY | {"Content-Type": "application/json"})
    error = assert_openai_error(r, 400)
    assert "surrogate" in error["message"]


def test_paired_surrogates_are_an_ordinary_character(server: RunningServer) -> None:
    raw = json.dumps(CHAT | {"messages": [{"role": "user", "content": "smile \ud83d\ude00"}]})
    r = httpx.post(
        f"{server.url}/v1/chat/completions", content=raw, headers=KEY | {"Content-Type": "application/json"}
    )
    assert r.status_code == 200, r.text


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b'{"model": "tiny-random", "messages": [{"role": "user", "content": "\xff\xfe"}]}', "UTF-8"),
        (b'{"model": "\xc3"}', "UTF-8"),
        (b"[" * 40 + b"]" * 40, "nested deeper"),
        (b"[" * 9000 + b"]" * 9000, "nested deeper"),  # deep enough to exhaust the parser's recursion
        (
            b'{"model": "tiny-random", "messages": ' + b'{"a": ' * 50 + b"1" + b"}" * 50 + b"}",
            "nested deeper",
        ),
        (b'{"model": "tiny-random", "messages": [', "JSON decode error"),
    ],
    ids=["bad-utf8", "truncated-utf8", "nested-40", "nested-9000", "nested-objects", "truncated-json"],
)
def test_malformed_bodies_are_400_in_openai_shape(server: RunningServer, raw: bytes, reason: str) -> None:
    for path in ("/v1/chat/completions", "/v1/feedback"):
        r = httpx.post(f"{server.url}{path}", content=raw, headers=KEY | {"Content-Type": "application/json"})
        assert reason in assert_openai_error(r, 400)["message"]


@pytest.mark.parametrize(
    "fields",
    [
        {"n": 10**12},
        {"n": 10**40},
        {"max_tokens": 10**18},
        {"max_completion_tokens": 2**63},
        {"temperature": 1e308},
        {"top_p": -1},
        {"messages": [{"role": "user", "content": "hi"}] * 65},
        {"stop": ["x"] * 1000},
    ],
)
def test_huge_values_are_400_not_work(server: RunningServer, fields: dict) -> None:
    r = httpx.post(f"{server.url}/v1/chat/completions", json=CHAT | fields, headers=KEY)
    assert_openai_error(r, 400)


# --- streams ------------------------------------------------------------------------------------


def test_streamed_request_for_an_unknown_model_is_404_before_any_stream(server: RunningServer) -> None:
    body = CHAT | {"model": "no-such-model", "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, headers=KEY) as r:
        assert r.status_code == 404
        assert r.headers["content-type"] == "application/json"
        error = json.loads(r.read())["error"]
    assert error["code"] == "model_not_found" and error["param"] == "model"


# --- keys -----------------------------------------------------------------------------------


def test_non_ascii_bearer_token_is_401(server: RunningServer) -> None:
    for token in ("clé-secrète".encode(), b"\xff\xfe\x80", "ключ".encode()):
        r = httpx.get(f"{server.url}/v1/models", headers={"Authorization": b"Bearer " + token})
        assert assert_openai_error(r, 401)["code"] == "invalid_api_key"
    r = httpx.post(f"{server.url}/admin/reload", headers={"Authorization": "Bearer ÿ".encode("latin-1")})
    assert_openai_error(r, 401)


def test_every_endpoint_but_health_needs_a_key(open_server: str) -> None:
    assert httpx.get(f"{open_server}/health").status_code == 200
    for method, path in [
        ("GET", "/v1/models"),
        ("POST", "/v1/chat/completions"),
        ("POST", "/v1/feedback"),
        ("GET", "/admin/status"),
        ("GET", "/openapi.json"),
        ("GET", "/docs"),
        ("GET", "/redoc"),
        ("GET", "/no-such-path"),
    ]:
        r = httpx.request(method, f"{open_server}{path}")
        assert_openai_error(r, 401)
    for path in ("/openapi.json", "/docs", "/redoc"):
        assert httpx.get(f"{open_server}{path}", headers=KEY).status_code == 200


def test_docs_are_off_unless_enabled(server: RunningServer) -> None:
    for path in ("/docs", "/redoc"):
        assert_openai_error(httpx.get(f"{server.url}{path}", headers=KEY), 404)
    assert httpx.get(f"{server.url}/openapi.json", headers=KEY).status_code == 200


def test_client_keys_cannot_call_admin_routes(server: RunningServer) -> None:
    for method, path in [("GET", "/admin/status"), ("POST", "/admin/reload"), ("POST", "/admin/adapters")]:
        r = httpx.request(method, f"{server.url}{path}", headers=KEY, json={"name": "x", "path": "/"})
        assert assert_openai_error(r, 401)["type"] == "authentication_error"
    assert httpx.get(f"{server.url}/admin/status", headers=server.admin_headers).status_code == 200


def test_keys_given_as_sha256_hashes(server: RunningServer, tiny_model: Path, tmp_path: Path) -> None:
    client, admin = "hashed-client-key", "hashed-admin-key"
    auth = {
        "api_keys": [f"sha256:{hashlib.sha256(client.encode()).hexdigest()}"],
        "admin_key": f"sha256:{hashlib.sha256(admin.encode()).hexdigest()}",
    }
    with app_server(server, tmp_path, tiny_model, auth=auth) as url:
        assert httpx.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {client}"}).status_code == 200
        ok = httpx.get(f"{url}/admin/status", headers={"Authorization": f"Bearer {admin}"})
        assert ok.status_code == 200
        # The hash is what the server knows, not a key anyone may present.
        assert (
            httpx.get(
                f"{url}/v1/models", headers={"Authorization": f"Bearer {auth['api_keys'][0]}"}
            ).status_code
            == 401
        )
        assert httpx.get(f"{url}/v1/models", headers=KEY).status_code == 401


def test_keys_are_compared_in_constant_time_over_all_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every known digest is compared (hmac.compare_digest) whichever key matches, or none."""
    import hmac

    from serving.api import auth
    from serving.config import AuthSettings

    ring = auth.KeyRing(AuthSettings(api_keys=["k1", "k2", "k3"], admin_key="adm"))
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def counted(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", counted)
    for token, name in [(b"adm", "admin"), (b"k1", "key-"), (b"k3", "key-"), (b"nope", None)]:
        calls.clear()
        found = ring.identify(token)
        assert found.name.startswith(name) if name else found is None, token
        assert len(calls) == 4  # admin + three client keys: no early exit on the first match
        assert all(len(a) == len(b) == 32 for a, b in calls)  # digests, never the raw keys


def test_no_key_appears_in_logs_or_the_config_repr(
    server: RunningServer, tiny_model: Path, tmp_path: Path
) -> None:
    import uvicorn

    from serving.api import create_app

    settings = serve_config(tmp_path, tiny_model)
    assert CLIENT_KEY not in repr(settings) + str(settings) + settings.model_dump_json()
    assert ADMIN_KEY not in repr(settings) + str(settings) + settings.model_dump_json()
    port = free_port()
    config = uvicorn.Config(
        create_app(settings, server.engine, server.store),
        host="127.0.0.1",
        port=port,
        log_level="debug",
        access_log=True,
    )
    uv = uvicorn.Server(config)
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    while not uv.started:
        time.sleep(0.02)
    records: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(self.format(record))

    handler = Collect(level=logging.DEBUG)
    loggers = [
        logging.getLogger(n) for n in ("", "uvicorn", "uvicorn.error", "uvicorn.access", "prefloop", "httpx")
    ]
    saved = [(lg, lg.level) for lg in loggers]
    for lg in loggers:
        lg.addHandler(handler)
        lg.setLevel(logging.DEBUG)
    url = f"http://127.0.0.1:{port}"
    wrong = "wrong-secret-key-42"
    try:
        httpx.get(f"{url}/v1/models", headers=KEY)
        httpx.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {wrong}"})
        httpx.post(f"{url}/v1/chat/completions", headers=KEY, content=b"{oops")
        httpx.post(
            f"{url}/v1/feedback", headers=KEY, json={"type": "thumbs", "completion_id": "x", "value": "up"}
        )
        httpx.get(f"{url}/admin/status", headers={"Authorization": f"Bearer {ADMIN_KEY}"})
        httpx.get(f"{url}/admin/status", headers=KEY)
    finally:
        for lg, level in saved:
            lg.removeHandler(handler)
            lg.setLevel(level)
        uv.should_exit = True
        thread.join(timeout=10)
    text = "\n".join(records)
    assert "GET /v1/models" in text  # the access log did run
    for secret in (CLIENT_KEY, ADMIN_KEY, wrong):
        assert secret not in text


def test_secrets_are_not_forwarded_to_ray_workers(monkeypatch: pytest.MonkeyPatch) -> None:
    from alignment.distributed import worker_env

    secrets = {
        "PREFLOOP_ADMIN_KEY": "adm",
        "PREFLOOP_API_KEYS": "k1,k2",
        "HF_TOKEN": "hf",
        "WANDB_API_KEY": "wb",
        "PREFLOOP_DB_PASSWORD": "pw",
    }
    kept = {"PREFLOOP_HOME": "/x", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    for name, value in (secrets | kept).items():
        monkeypatch.setenv(name, value)
    env = worker_env()
    assert not set(secrets) & set(env)
    assert {k: env[k] for k in kept} == kept


# --- rate limits ----------------------------------------------------------------------------


def test_429_carries_retry_after(server: RunningServer, tiny_model: Path, tmp_path: Path) -> None:
    with app_server(server, tmp_path, tiny_model, limits=LIMITS | {"requests_per_minute": 1}) as url:
        assert httpx.get(f"{url}/v1/models", headers=KEY).status_code == 200
        r = httpx.get(f"{url}/v1/models", headers=KEY)
        assert assert_openai_error(r, 429)["code"] == "rate_limit_exceeded"
        assert 1 <= int(r.headers["Retry-After"]) <= 60  # one request a minute: the bucket refills in ~60 s


def test_rate_limits_per_key_and_feedback_has_its_own(
    server: RunningServer, tiny_model: Path, tmp_path: Path
) -> None:
    auth = AUTH | {
        "api_keys": [CLIENT_KEY, {"key": "backend-key", "name": "backend", "feedback_per_minute": 1000}]
    }
    limits = LIMITS | {"requests_per_minute": 2, "feedback_per_minute": 3}
    backend = {"Authorization": "Bearer backend-key"}
    body = {"type": "thumbs", "completion_id": "chatcmpl-nope-0", "value": "up"}  # 404: cheap, still counted
    with app_server(server, tmp_path, tiny_model, auth=auth, limits=limits) as url:
        codes = [httpx.get(f"{url}/v1/models", headers=KEY).status_code for _ in range(3)]
        assert codes == [200, 200, 429]
        # The chat budget is spent; feedback has its own: 3 per minute for this key...
        codes = [httpx.post(f"{url}/v1/feedback", json=body, headers=KEY).status_code for _ in range(4)]
        assert codes == [404, 404, 404, 429]
        # ...and 1000 for the backend that posts a whole product's feedback.
        codes = {httpx.post(f"{url}/v1/feedback", json=body, headers=backend).status_code for _ in range(20)}
        assert codes == {404}
