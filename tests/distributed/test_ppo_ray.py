"""Data-parallel PPO on 2 Ray workers: replicas stay identical, outputs look like a local run's."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from alignment.config import ConfigError, load_config
from alignment.rl.config import PPORunConfig
from alignment.rl.models import load_ppo_models
from alignment.rl.ppo import train_ppo
from alignment.rl.ray_worker import run_ppo_on_ray
from tests.distributed.conftest import assert_loads_trained_adapter, shorter_is_better

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
            "ppo.kl_horizon=20",  # a short horizon, so each step moves the adaptive coefficient visibly
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
    # The adaptive KL controller steps on the global batch (KL and rollout count), as one process
    # would: beta_t = beta_{t-1} (1 + clip(KL_t / target - 1, -0.2, 0.2) * 4 / horizon).
    ppo = config.ppo
    beta = ppo.init_kl_coef
    for h in history:
        beta *= (
            1
            + min(max(h["objective/kl"] / ppo.target_kl - 1, -0.2), 0.2)
            * ppo.rollout_batch_size
            / ppo.kl_horizon
        )
        assert h["objective/kl_coef"] == pytest.approx(beta, rel=1e-9)
    # KL starts at 0 (the fresh LoRA is the identity) and stays far below target_kl: beta falls.
    assert history[-1]["objective/kl_coef"] < ppo.init_kl_coef * 0.97
    assert metrics["kl_coef"] == history[-1]["objective/kl_coef"]

    assert_loads_trained_adapter(config.output_dir)
    _, critic = load_ppo_models(config.output_dir)
    assert not critic.shared
    saved_head = load_file(str(config.output_dir / "critic" / "value_head.safetensors"))
    assert saved_head["summary.weight"].abs().sum() > 0  # the value head left its zero init
    for key, want in saved_head.items():
        torch.testing.assert_close(critic.head.state_dict()[key], want, atol=0, rtol=0)


def test_ppo_batches_must_split_evenly_across_workers(tiny_model: Path, tmp_path: Path) -> None:
    config = ppo_config(tiny_model, tmp_path, "ppo.rollout_batch_size=5", "ppo.mini_batch_size=5")
    with pytest.raises(
        ConfigError, match=r"rollout_batch_size=5 must be a multiple of distributed\.num_workers=2"
    ):
        run_ppo_on_ray(config, shorter_is_better)
