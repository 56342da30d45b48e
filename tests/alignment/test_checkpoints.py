"""`latest_checkpoint` resumes from the newest *complete* checkpoint, never from a half-written one."""

from __future__ import annotations

import json
from pathlib import Path

from alignment.checkpoints import (
    HF_TRAINER_STATE,
    PPO_TRAINER_STATE,
    checkpoint_step,
    is_complete,
    latest_checkpoint,
)


def hf_checkpoint(run: Path, step: int, state: str | None = '{"global_step": 0}') -> Path:
    """A checkpoint as HF's Trainer leaves it: weights and optimizer first, trainer_state.json last."""
    path = run / f"checkpoint-{step}"
    path.mkdir(parents=True)
    (path / "adapter_model.safetensors").write_bytes(b"weights")
    (path / "optimizer.pt").write_bytes(b"optimizer")
    if state is not None:
        (path / HF_TRAINER_STATE).write_text(state)
    return path


def test_the_highest_complete_step_wins_numerically(tmp_path: Path) -> None:
    hf_checkpoint(tmp_path, 9)
    best = hf_checkpoint(tmp_path, 10)  # "checkpoint-10" < "checkpoint-9" as strings
    assert latest_checkpoint(tmp_path) == best


def test_a_checkpoint_killed_before_its_trainer_state_is_skipped(tmp_path: Path) -> None:
    done = hf_checkpoint(tmp_path, 4)
    hf_checkpoint(tmp_path, 8, state=None)
    assert latest_checkpoint(tmp_path) == done


def test_a_torn_trainer_state_is_skipped(tmp_path: Path) -> None:
    done = hf_checkpoint(tmp_path, 4)
    hf_checkpoint(tmp_path, 8, state='{"global_step": 8, "log_hist')  # killed mid-write
    hf_checkpoint(tmp_path, 12, state="")
    assert latest_checkpoint(tmp_path) == done


def test_nothing_complete_means_no_checkpoint(tmp_path: Path) -> None:
    assert latest_checkpoint(tmp_path / "missing") is None
    hf_checkpoint(tmp_path, 3, state=None)
    (tmp_path / "checkpoint-7").write_text("a file, not a directory")
    assert latest_checkpoint(tmp_path) is None


def test_ppo_checkpoints_count_only_once_renamed_into_place(tmp_path: Path) -> None:
    done = tmp_path / "checkpoint-2"
    done.mkdir()
    (done / PPO_TRAINER_STATE).write_bytes(b"state")
    partial = tmp_path / "checkpoint-3.partial"  # save_checkpoint was killed before the rename
    partial.mkdir()
    (partial / PPO_TRAINER_STATE).write_bytes(b"state")
    no_state = tmp_path / "checkpoint-4"
    no_state.mkdir()
    assert latest_checkpoint(tmp_path, PPO_TRAINER_STATE) == done
    # An HF run dir and a PPO run dir do not mistake each other's checkpoints for complete ones.
    assert latest_checkpoint(tmp_path) is None


def test_checkpoint_step_reads_only_exact_names() -> None:
    assert checkpoint_step("runs/x/checkpoint-120") == 120
    assert checkpoint_step("checkpoint-3.partial") is None
    assert checkpoint_step("checkpoint-final") is None
    assert checkpoint_step("my-checkpoint-3") is None


def test_is_complete_needs_a_json_object(tmp_path: Path) -> None:
    path = hf_checkpoint(tmp_path, 1, state=json.dumps([1, 2]))
    assert not is_complete(path)
    (path / HF_TRAINER_STATE).write_text(json.dumps({"global_step": 1}))
    assert is_complete(path)
