"""Content hashes of files, the one building block behind every fingerprint prefloop records.

- the model cache's manifest (`alignment.models`): one sha256 per file, to detect a corrupted pull;
- a run's data hash on its model card (`alignment.runner.data_fingerprint`): the input files' bytes;
- the reference cache's weight key (`alignment.reference_cache.weights_fingerprint`): names and bytes
  of a model's or adapter's files.
(The reference cache's `pairs_fingerprint` hashes tokenized pairs, not files: a different thing.)
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path

CHUNK = 1 << 22  # files can be multi-GB weights: hashed in 4 MiB reads, never loaded whole


def _update(digest: hashlib._Hash, path: Path) -> None:
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(CHUNK), b""):
            digest.update(chunk)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    _update(digest, path)
    return digest.hexdigest()


def expand_dirs(paths: Iterable[Path]) -> list[Path]:
    """Files as given; a directory becomes every file below it, in sorted order."""
    return [f for p in paths for f in (sorted(q for q in p.rglob("*") if q.is_file()) if p.is_dir() else [p])]


def sha256_files(files: Iterable[Path], with_names: bool = False) -> str:
    """One sha256 over the files' bytes in order (each preceded by its name with `with_names`)."""
    digest = hashlib.sha256()
    for f in files:
        if with_names:
            digest.update(f.name.encode())
        _update(digest, f)
    return digest.hexdigest()
