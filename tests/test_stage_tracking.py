"""Each training stage is its own wandb run, also when several run in one process (the quickstart).

HF's WandbCallback reuses a wandb run left open; before `alignment.launch.finish_tracking` the
quickstart's reward and DPO stages logged into the SFT stage's run (and clashed on its config).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from alignment.config import load_config
from alignment.sft import SFTRunConfig, train_sft
from reward.trainer import RewardRunConfig, train_reward

pytestmark = pytest.mark.slow


def _runs(output_dir: Path) -> list[Path]:
    return sorted((output_dir / "wandb").glob("offline-run-*"))


def test_two_stages_in_one_process_log_to_two_wandb_runs(
    tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import wandb

    monkeypatch.setenv("WANDB_MODE", "offline")
    common = [
        f"model={tiny_model}",
        "training.max_steps=1",
        "training.batch_size=2",
        "tracking.report_to=wandb",
        "tracking.wandb_mode=offline",
    ]
    train_sft(load_config(SFTRunConfig, None, [*common, f"output_dir={tmp_path / 'sft'}"]))
    assert wandb.run is None  # finished with its stage
    train_reward(load_config(RewardRunConfig, None, [*common, f"output_dir={tmp_path / 'reward'}"]))
    assert wandb.run is None
    sft_runs, reward_runs = _runs(tmp_path / "sft"), _runs(tmp_path / "reward")
    assert len(sft_runs) == 1 and len(reward_runs) == 1
    assert sft_runs[0].name != reward_runs[0].name
