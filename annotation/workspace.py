"""The local Argilla workspace: start, stop and inspect the server, its Redis and its rq worker.

`up` starts three processes from the server venv (see `server_venv.py`) in their own sessions,
records their pids and command lines under `<home>/run`, and waits until the API answers with
the owner's key. `down` stops exactly those processes (a pid is only signalled when its command
line still matches what was recorded). Every client command resolves its connection with
`resolve_connection`, so a remote Argilla (URL + API key) works the same way as the local one.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
from rich.console import Console

from alignment.paths import prefloop_home
from annotation.config import ServerSettings
from annotation.server_venv import ensure_server_venv, redis_server_binary

LAUNCHER = Path(__file__).resolve().parent / "launcher.py"
PROCESSES = ("redis", "server", "worker")


class WorkspaceError(RuntimeError):
    """The workspace server cannot be started, reached or authenticated against."""


@dataclass(frozen=True)
class Connection:
    url: str
    api_key: str

    def client(self):  # -> rg.Argilla; imported lazily: the SDK is slow to import
        import argilla as rg

        return rg.Argilla(api_url=self.url, api_key=self.api_key, timeout=120)


def server_home(settings: ServerSettings) -> Path:
    return Path(settings.home).expanduser() if settings.home else prefloop_home() / "argilla"


def local_url(settings: ServerSettings) -> str:
    return f"http://{settings.host}:{settings.port}"


# --- credentials -----------------------------------------------------------------------------


def _owner_file(home: Path) -> Path:
    return home / "owner.json"


def owner_credentials(settings: ServerSettings, create: bool = False) -> dict[str, str] | None:
    """The local owner's username/password/API key (+ the JWT secret), generated once, kept 0600."""
    path = _owner_file(server_home(settings))
    if path.is_file():
        return json.loads(path.read_text())
    if not create:
        return None
    creds = {
        "username": settings.owner_username,
        "password": os.environ.get("ARGILLA_OWNER_PASSWORD") or secrets.token_urlsafe(12),
        "api_key": os.environ.get("ARGILLA_API_KEY") or "pf." + secrets.token_urlsafe(24),
        "auth_secret": secrets.token_hex(32),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch(mode=0o600)
    path.write_text(json.dumps(creds, indent=2))
    return creds


def resolve_connection(settings: ServerSettings) -> Connection:
    """URL + API key: env (ARGILLA_API_URL / ARGILLA_API_KEY) > config > the local server's owner."""
    url = os.environ.get("ARGILLA_API_URL") or settings.url or local_url(settings)
    api_key = os.environ.get("ARGILLA_API_KEY") or settings.api_key
    if not api_key and url == local_url(settings) and (creds := owner_credentials(settings)):
        api_key = creds["api_key"]
    if not api_key:
        raise WorkspaceError(
            f"no API key for {url}: set ARGILLA_API_KEY (or server.api_key), or start a local server with "
            "`prefloop annotate up`"
        )
    return Connection(url=url.rstrip("/"), api_key=api_key)


# --- processes -------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _state_file(home: Path) -> Path:
    return home / "run" / "state.json"


def _read_state(home: Path) -> dict:
    path = _state_file(home)
    return json.loads(path.read_text()) if path.is_file() else {}


def _start_time(pid: int) -> str | None:
    """The kernel's start time of `pid` (field 22 of /proc/<pid>/stat), or None if gone or a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()  # the command name may contain spaces
    return None if fields[0] == "Z" else fields[19]


def _is_ours(info: dict) -> bool:
    """Alive, and still the process we started: pids get reused, (pid, start time) does not."""
    # a process that died before its start time was read was recorded with None: not alive
    return info["started"] is not None and _start_time(info["pid"]) == info["started"]


def server_env(settings: ServerSettings, creds: dict[str, str], redis_url: str) -> dict[str, str]:
    home = server_home(settings)
    database_url = (
        settings.database_url or f"sqlite+aiosqlite:///{home / 'argilla.db'}?check_same_thread=False"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env.update(
        ARGILLA_HOME_PATH=str(home),
        ARGILLA_DATABASE_URL=database_url,
        ARGILLA_REDIS_URL=redis_url,
        ARGILLA_SEARCH_ENGINE=settings.search_engine,
        ARGILLA_AUTH_SECRET_KEY=creds["auth_secret"],  # stable across restarts: sessions survive
        HF_HUB_OFFLINE="1",
        HF_HUB_DISABLE_TELEMETRY="1",
        ARGILLA_ENABLE_TELEMETRY="0",
        ARGILLA_SHOW_HUGGINGFACE_SPACE_PERSISTENT_STORAGE_WARNING="false",
    )
    if settings.elasticsearch_url:
        env["ARGILLA_ELASTICSEARCH"] = settings.elasticsearch_url
    return env


def _spawn(name: str, cmd: list[str], env: dict[str, str], home: Path) -> dict:
    log = (home / "logs" / f"{name}.log").open("ab")
    # own session: `down` can signal the whole process group, and a Ctrl-C in the caller's
    # terminal does not take the server down with it
    proc = subprocess.Popen(
        cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=home
    )
    (home / "run" / f"{name}.pid").write_text(f"{proc.pid}\n")
    return {"pid": proc.pid, "started": _start_time(proc.pid), "cmd": cmd}


def status(settings: ServerSettings) -> dict:
    """Which recorded processes are alive, and whether the API answers."""
    home = server_home(settings)
    state = _read_state(home)
    alive = {name: _is_ours(info) for name, info in state.get("processes", {}).items()}
    url = state.get("url", local_url(settings))
    try:
        ready = httpx.get(f"{url}/api/v1/version", timeout=2).status_code == 200
    except httpx.HTTPError:
        ready = False
    return {"home": str(home), "url": url, "processes": alive, "ready": ready}


def up(settings: ServerSettings, console: Console | None = None) -> Connection:
    """Start redis + Argilla server + rq worker (idempotent) and wait until the API accepts the owner key."""
    console = console or Console(stderr=True)
    if os.environ.get("ARGILLA_API_URL") or settings.url:  # a remote Argilla: nothing to start, only check
        connection = resolve_connection(settings)
        _check_api(connection)
        console.print(f"using the remote Argilla at {connection.url}")
        return connection
    home = server_home(settings)
    current = status(settings)
    if current["processes"] and all(current["processes"].values()) and current["ready"]:
        console.print(f"Argilla already running at {current['url']}")
        return resolve_connection(settings)
    if any(current["processes"].values()):
        down(settings)  # half-alive from a crash: start clean

    first_run = owner_credentials(settings) is None
    creds = owner_credentials(settings, create=True)
    assert creds is not None
    python = ensure_server_venv(console)
    for sub in ("run", "logs", "redis"):
        (home / sub).mkdir(parents=True, exist_ok=True)

    processes: dict[str, dict] = {}
    redis_url = settings.redis_url
    env = server_env(settings, creds, redis_url or "")
    if redis_url is None:
        port = free_port()
        redis_url = f"redis://127.0.0.1:{port}/0"
        cmd = [
            str(redis_server_binary()),
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(home / "redis"),
            # Argilla's job queue lives in Redis: an append-only file (replayed on restart) keeps
            # queued jobs through a crash; everysec bounds what a power loss can take to ~1 s
            "--save",
            "",
            "--appendonly",
            "yes",
            "--appendfsync",
            "everysec",
            "--appendfilename",
            "argilla-jobs.aof",
        ]
        processes["redis"] = _spawn("redis", cmd, env, home)
        env["ARGILLA_REDIS_URL"] = redis_url

    url = local_url(settings)
    # the server migrates the database and creates the owner before it serves
    owner_env = {
        "PREFLOOP_OWNER_USERNAME": creds["username"],
        "PREFLOOP_OWNER_PASSWORD": creds["password"],
        "PREFLOOP_OWNER_API_KEY": creds["api_key"],
    }
    server_cmd = [str(python), str(LAUNCHER), "server", "--host", settings.host, "--port", str(settings.port)]
    processes["server"] = _spawn("server", server_cmd, {**env, **owner_env}, home)
    processes["worker"] = _spawn("worker", [str(python), str(LAUNCHER), "worker"], env, home)
    _state_file(home).write_text(
        json.dumps({"url": url, "redis_url": redis_url, "processes": processes}, indent=2)
    )

    connection = Connection(url=url, api_key=creds["api_key"])
    with console.status(f"waiting for Argilla at {url}"):
        _wait_ready(connection, home, processes, settings.startup_timeout_s)
    console.print(f"Argilla is up at [bold]{url}[/] (logs: {home / 'logs'})")
    if first_run:
        console.print(
            f"First run: owner [bold]{creds['username']}[/] / password [bold]{creds['password']}[/] "
            f"(stored in {_owner_file(home)}, mode 600)."
        )
    return connection


def _check_api(connection: Connection) -> None:
    try:
        response = httpx.get(
            f"{connection.url}/api/v1/me", headers={"X-Argilla-Api-Key": connection.api_key}, timeout=10
        )
    except httpx.HTTPError as exc:
        raise WorkspaceError(f"cannot reach Argilla at {connection.url}: {exc}") from None
    if response.status_code != 200:
        raise WorkspaceError(
            f"{connection.url} answered {response.status_code} to the API key: {response.text[:200]}"
        )


def _wait_ready(connection: Connection, home: Path, processes: dict[str, dict], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for name, info in processes.items():
            if not _is_ours(info):
                tail = (home / "logs" / f"{name}.log").read_text(errors="replace")[-2000:]
                down_processes(home)
                raise WorkspaceError(f"{name} exited during start-up; last log lines:\n{tail}")
        try:
            response = httpx.get(
                f"{connection.url}/api/v1/me", headers={"X-Argilla-Api-Key": connection.api_key}, timeout=2
            )
            if response.status_code == 200:
                return
            if response.status_code in (401, 403):
                raise WorkspaceError(f"{connection.url} rejected the owner API key from {_owner_file(home)}")
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    down_processes(home)
    raise WorkspaceError(f"Argilla did not answer within {timeout_s:.0f}s; see {home / 'logs'}")


def down(settings: ServerSettings) -> list[str]:
    """Stop the processes `up` started (and only those); returns the names stopped."""
    return down_processes(server_home(settings))


def down_processes(home: Path, timeout_s: float = 15.0) -> list[str]:
    state = _read_state(home)
    ours = {n: i for n, i in state.get("processes", {}).items() if _is_ours(i)}
    # server and worker first, so neither logs a lost Redis connection on the way down
    order = sorted(ours, key=lambda n: PROCESSES.index(n) if n in PROCESSES else 0, reverse=True)
    for name in order:
        os.killpg(ours[name]["pid"], signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    for name in order:
        info = ours[name]
        while _is_ours(info) and time.monotonic() < deadline:
            _reap(info["pid"])
            time.sleep(0.1)
        if _is_ours(info):
            os.killpg(info["pid"], signal.SIGKILL)
        _reap(info["pid"])
        (home / "run" / f"{name}.pid").unlink(missing_ok=True)
    _state_file(home).unlink(missing_ok=True)
    return order


def _reap(pid: int) -> None:
    """Collect the exit status when the process is our own child (tests start it in-process)."""
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)
