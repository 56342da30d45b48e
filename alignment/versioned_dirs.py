"""Numbered version folders (`v1`, `v0001`, ...) published whole: staged, fsynced, renamed into place.

`annotate pull` and `feedback ingest` both write a dataset as a folder of files. A folder written
in place and killed half-way would be counted as a version; instead each one is built in a hidden
staging folder beside its final name and renamed (atomic on one file system) once every file is on
disk. A process killed mid-way leaves only a staging folder, which the next run removes under the
same lock. The fsyncs make a published version survive a power loss, not only a crash.
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

STAGING_PREFIX = ".staging-"
LOCK_FILE = ".lock"


@contextmanager
def locked(root: Path) -> Iterator[None]:
    """Serialise writers of `root` (two concurrent pulls must not both publish `vN`), then remove
    the staging folders killed writers left behind (only a lock holder creates one)."""
    root.mkdir(parents=True, exist_ok=True)
    with (root / LOCK_FILE).open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        for leftover in root.glob(f"{STAGING_PREFIX}*"):
            shutil.rmtree(leftover, ignore_errors=True)
        yield


def remove_incomplete(root: Path, pattern: str, is_complete: Callable[[Path], bool]) -> None:
    """Remove version folders (named like the regex `pattern`) that never got finished: written in
    place by a version of prefloop that did not stage them, and killed."""
    for path in root.iterdir():
        if re.fullmatch(pattern, path.name) and path.is_dir() and not is_complete(path):
            shutil.rmtree(path, ignore_errors=True)


def next_number(root: Path, pattern: str = r"v(\d+)") -> int:
    """1 + the highest version number among the folders under `root` named like `pattern`."""
    numbers = [int(m.group(1)) for p in root.iterdir() if (m := re.fullmatch(pattern, p.name))]
    return max(numbers, default=0) + 1


@contextmanager
def staged_dir(root: Path, name: str) -> Iterator[Path]:
    """Yield an empty staging folder; when the block ends without error its files are flushed to
    disk and it becomes `root/name` in one rename. On error nothing appears under `name`."""
    staging = Path(tempfile.mkdtemp(dir=root, prefix=f"{STAGING_PREFIX}{name}-"))
    try:
        yield staging
        for path in staging.rglob("*"):
            if path.is_file():
                _fsync(path)
        _fsync(staging)
        target = root / name
        if target.exists():
            raise FileExistsError(f"{target} already exists")
        os.rename(staging, target)
        _fsync(root)  # the rename itself is durable once the parent directory is flushed
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
