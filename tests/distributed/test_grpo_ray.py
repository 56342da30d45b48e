"""GRPO on 2 Ray workers: TRL's GRPOTrainer under Ray Train DDP, the same build as a local run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from alignment.config import load_config
from alignment.rl.config import GRPORunConfig
from alignment.rl.grpo import train_grpo
from tests.distributed.conftest import assert_loads_trained_adapter, shorter_is_better

pytestmark = [pytest.mark.ray, pytest.mark.usefixtures("ray_cluster")]


def test_grpo_trains_on_two_workers(tiny_model: Path, tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Tell me fact {i}."}) + "\n" for i in range(8)))
    out = tmp_path / "grpo"
    config = load_config(
        GRPORunConfig,
        None,
        [
            f"model={tiny_model}",
            f"output_dir={out}",
            f"data.prompts={prompts}",
            "grpo.num_generations=4",
            "grpo.max_completion_length=8",
            "training.batch_size=2",  # x 2 workers = one group of 4 per generation batch
            "training.max_steps=2",
            "training.logging_steps=1",
            "training.learning_rate=1e-3",
            "training.dtype=fp32",
            "lora.dropout=0",
            "tracking.report_to=none",
            "distributed.backend=ray",
            "distributed.num_workers=2",
        ],
    )
    metrics = train_grpo(config, shorter_is_better)
    assert metrics["ray_workers"] == 2
    assert metrics["global_step"] == 2
    assert json.loads((out / "metrics.json").read_text())["global_step"] == 2
    assert "prefloop grpo adapter" in (out / "README.md").read_text()
    assert_loads_trained_adapter(out)
