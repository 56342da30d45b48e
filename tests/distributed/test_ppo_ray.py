"""Data-parallel PPO on 2 Ray workers: replicas stay identical, outputs look like a local run's."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from alignment.config import ConfigError, load_config
from alignment.distributed import run_ppo_on_ray
from alignment.ppo import PPORunConfig, load_ppo_models, train_ppo
from tests.distributed.conftest import shorter_is_better

pytestmark = [pytest.mark.ray, pytest.mark.usefixtures("ray_cluster")]


def ppo_config(tiny_model: Path, tmp_path: Path, *extra: str) -> PPORunConfig:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Tell me about topic {i}."}) + "\n" for i in range(8)))
    return load_config(
        PPORunConfig,
        None,
        [
            f"model={tiny_model}",
            f"output_dir={tmp_path / 'ppo'}",
            f"data.prompts={prompts}",
            "tracking.report_to=none",
            "training.dtype=fp32",
            "training.max_steps=2",
            "lora.r=8",
            "lora.dropout=0",
            "ppo.rollout_batch_size=4",
            "ppo.mini_batch_size=2",
            "ppo.ppo_epochs=1",
            "ppo.generation.max_new_tokens=6",
            "distributed.backend=ray",
            "distributed.num_workers=2",
            *extra,
        ],
    )


def test_data_parallel_ppo_keeps_replicas_identical_and_saves_the_policy(
    tiny_model: Path, tmp_path: Path
) -> None:
    config = ppo_config(tiny_model, tmp_path)
    metrics = train_ppo(config, shorter_is_better)  # the CLI's path: dispatches on distributed.backend
    history = [json.loads(line) for line in (config.output_dir / "ppo_log.jsonl").read_text().splitlines()]
    assert (config.output_dir / "ppo_curves.png").is_file() and (config.output_dir / "metrics.json").is_file()

    assert len(history) == 2
    assert metrics["ray_workers"] == 2
    # Gradients are averaged inside backward: both workers applied exactly the same updates.
    assert metrics["replica_spread"] == 0.0
    assert all(h["objective/kl_coef"] > 0 for h in history)
    assert (config.output_dir / "adapter_model.safetensors").is_file()
    assert (config.output_dir / "critic" / "value_head.safetensors").is_file()
    policy, critic = load_ppo_models(config.output_dir)
    assert policy.peft_config
    assert not critic.shared


def test_ppo_batches_must_split_evenly_across_workers(tiny_model: Path, tmp_path: Path) -> None:
    config = ppo_config(tiny_model, tmp_path, "ppo.rollout_batch_size=5", "ppo.mini_batch_size=5")
    with pytest.raises(
        ConfigError, match=r"rollout_batch_size=5 must be a multiple of distributed\.num_workers=2"
    ):
        run_ppo_on_ray(config, shorter_is_better)
