"""The latest *complete* checkpoint of a run, for resuming: a half-written one is never chosen.

A run directory holds `checkpoint-<step>` directories. A process killed while saving leaves one
that looks like a checkpoint but is not; resuming from it would crash or, worse, load torn state.
What counts as complete depends on who wrote it:
- HF `Trainer` writes the weights, optimizer, scheduler and RNG states, and `trainer_state.json`
  last (`Trainer._save_checkpoint`); so a checkpoint counts once that file is there *and* parses
  (the JSON itself is not written atomically);
- PPO (`alignment.rl.ppo_trainer`) builds `checkpoint-<step>.partial` and renames it into place, so a
  directory named exactly `checkpoint-<step>` holding its state file is complete.
Both rules are "the name is exactly checkpoint-<int> and the marker written last is intact".
"""

from __future__ import annotations

import json
import re
from pathlib import Path

HF_TRAINER_STATE = "trainer_state.json"
PPO_TRAINER_STATE = "trainer_state.pt"
CHECKPOINT_NAME = re.compile(r"checkpoint-(\d+)")


def checkpoint_step(path: str | Path) -> int | None:
    """The step of a `checkpoint-<step>` directory name; None for any other name (`.partial` included)."""
    match = CHECKPOINT_NAME.fullmatch(Path(path).name)
    return int(match.group(1)) if match else None


def is_complete(checkpoint: Path, marker: str = HF_TRAINER_STATE) -> bool:
    """Whether `checkpoint` was saved to the end: its marker file exists (and, for JSON, parses)."""
    state = checkpoint / marker
    if not state.is_file():
        return False
    if state.suffix == ".json":
        try:
            return isinstance(json.loads(state.read_text()), dict)
        except (ValueError, UnicodeDecodeError):
            return False
    return state.stat().st_size > 0


def latest_checkpoint(run_dir: Path, marker: str = HF_TRAINER_STATE) -> Path | None:
    """The complete `checkpoint-<step>` with the highest step in `run_dir`, or None."""
    if not run_dir.is_dir():
        return None
    found = [
        (step, path)
        for path in run_dir.iterdir()
        if path.is_dir() and (step := checkpoint_step(path)) is not None and is_complete(path, marker)
    ]
    return max(found)[1] if found else None
