"""Reward-model training on 1 and 2 Ray workers: same global batch, same model, and it scores held-out pairs."""

from __future__ import annotations

from pathlib import Path

import pytest

from alignment.config import load_config
from alignment.preference_data import write_preference_rows
from reward.trainer import RewardRunConfig, train_reward
from tests.reward.conftest import marker_pairs, tiny_reward_overrides

pytestmark = [pytest.mark.ray, pytest.mark.usefixtures("ray_cluster")]


def test_reward_model_on_two_workers_matches_one_worker(tiny_model: Path, tmp_path: Path) -> None:
    train, held_out = tmp_path / "train.jsonl", tmp_path / "eval.jsonl"
    write_preference_rows(train, marker_pairs(32, seed=1))
    write_preference_rows(held_out, marker_pairs(48, seed=2))

    def run(name: str, workers: int, batch_size: int) -> dict:
        overrides = tiny_reward_overrides(tiny_model, tmp_path / name, train, held_out)
        config = load_config(
            RewardRunConfig,
            None,
            [
                *overrides,
                "training.epochs=1",
                "training.dtype=fp32",
                "lora.dropout=0",
                "reward.group_by_length=false",  # length groups are cut per device batch: not comparable
                "distributed.backend=ray",
                f"distributed.num_workers={workers}",
                f"training.batch_size={batch_size}",
            ],
        )
        return train_reward(config)

    one, two = run("one", 1, 8), run("two", 2, 4)

    assert (one["global_step"], two["global_step"]) == (4, 4)  # 32 pairs / global batch 8, sharded
    assert two["train_loss"] == pytest.approx(one["train_loss"], rel=1e-3)
    # The held-out set is scored once, after training (no per-epoch eval): the driver reloaded each
    # run's adapter from output_dir and scored the held-out pairs with it; the same weights give the same rewards.
    for key in ("heldout_mean_reward_chosen", "heldout_mean_margin"):
        assert two[key] == pytest.approx(one[key], rel=1e-3, abs=1e-4), key
    assert two["heldout_accuracy"] == pytest.approx(one["heldout_accuracy"], abs=1 / 48)
    assert (tmp_path / "two" / "adapter_model.safetensors").is_file()
