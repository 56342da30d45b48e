"""What every quickstart stage shares: the run's Context (config, console, the servers it started) and
the all-or-nothing file helpers (`staged` directories, atomic JSON writes, trainer log histories).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console

from serving.quickstart.config import QuickstartConfig
from serving.quickstart.rubric import Rubric, load_rubric

Row = dict[str, Any]
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
WORKSPACE = "prefloop"


@dataclass
class Context:
    config: QuickstartConfig
    console: Console
    stack: contextlib.ExitStack
    rubric: Rubric = field(init=False)
    _argilla: Any = None  # (ServerSettings, Connection) once started

    def __post_init__(self) -> None:
        self.rubric = load_rubric(self.config.rubric)

    @property
    def root(self) -> Path:
        return self.config.output_dir

    def path(self, stage: str) -> Path:
        return self.root / stage

    def model_name(self) -> str:
        return self.config.model

    # --- the Argilla workspace, started once per run and always stopped -------------------------
    def argilla(self) -> tuple[Any, Any]:
        if self._argilla is None:
            from annotation import workspace
            from annotation.config import ServerSettings

            # Our own server home and a free port: an existing `prefloop annotate up` workspace or a
            # second quickstart never collides with this one.
            settings = ServerSettings(
                home=str((self.root / "argilla").resolve()), port=workspace.free_port(), startup_timeout_s=300
            )
            workspace.down(settings)  # processes a killed earlier run left behind (recorded pids only)
            self.stack.callback(workspace.down, settings)
            connection = workspace.up(settings, self.console)
            self._argilla = (settings, connection)
        return self._argilla


def read_jsonl(path: Path) -> list[Row]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_jsonl(path: Path, rows: list[Row]) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    os.replace(tmp, path)


def write_json(path: Path, data: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    os.replace(tmp, path)


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())


def has_adapter(path: Path) -> bool:
    return all((path / f).is_file() and (path / f).stat().st_size > 0 for f in ADAPTER_FILES)


@contextlib.contextmanager
def staged(final: Path) -> Iterator[Path]:
    """A fresh `<final>.partial` directory, renamed to `final` only when the block completes."""
    partial = final.with_name(final.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    yield partial
    shutil.rmtree(final, ignore_errors=True)
    os.replace(partial, final)


def log_history(run_dir: Path) -> list[Row]:
    """The trainer's logged steps, from its last checkpoint's trainer_state.json."""
    states = sorted(
        run_dir.glob("checkpoint-*/trainer_state.json"), key=lambda p: int(p.parent.name.split("-")[1])
    )
    return read_json(states[-1])["log_history"] if states else []


def dump_history(run_dir: Path) -> None:
    # the checkpoints keep the log as it stood then; the final one has every step
    write_json(run_dir / "log_history.json", log_history(run_dir))
