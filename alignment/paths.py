"""Where prefloop keeps its files, and names that must stay inside their directory.

Every layer (alignment, reward, annotation, serving) imports `prefloop_home` from here, so the one
environment rule (`PREFLOOP_HOME`, else `$XDG_CACHE_HOME/prefloop`, else `~/.cache/prefloop`) is
written once. `contained` is the check for any path built from a name that came from outside
(a model name on the command line, an adapter or registry entry): `../../etc` never resolves
outside the directory it was meant for.
"""

from __future__ import annotations

import os
from pathlib import Path


class PathEscapeError(ValueError):
    """A name that would resolve outside the directory it belongs in."""


def prefloop_home() -> Path:
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "prefloop"
    return Path(os.environ.get("PREFLOOP_HOME", default)).expanduser()


def contained(root: Path, name: str | Path, what: str = "name", *, allow_absolute: bool = False) -> Path:
    """`root / name`, refused when `name` is absolute or its resolved path leaves `root`.

    Symlinks are resolved on both sides, so a link pointing out of `root` is refused as well.
    With `allow_absolute`, an absolute `name` is accepted when it resolves inside `root` (an
    adapter path a registry row or a client gives in full); it is returned as given.
    """
    text = str(name)
    if not text or "\x00" in text:
        raise PathEscapeError(f"{what} {text!r}: empty or contains NUL")
    if Path(text).is_absolute() and not allow_absolute:
        raise PathEscapeError(f"{what} {text!r}: must be relative to {root}")
    base = root.resolve()
    target = (base / text).resolve()
    if target != base and base not in target.parents:
        raise PathEscapeError(f"{what} {text!r}: resolves outside {root}")
    if target == base:
        raise PathEscapeError(f"{what} {text!r}: names {root} itself, not an entry inside it")
    return root / text
