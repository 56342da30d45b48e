"""DPO and KTO on Ray workers: 1 vs 2 workers agree on the same global batch, adapters load and evaluate."""

from __future__ import annotations

from pathlib import Path

import pytest

from alignment.config import load_config
from alignment.data_files import write_jsonl
from alignment.dpo import DPORunConfig, train_dpo
from alignment.kto import KTORunConfig, train_kto
from alignment.preference_data import EXAMPLE_PREFERENCES
from tests.alignment.test_kto import feedback_rows
from tests.distributed.conftest import assert_adapters_agree, assert_loads_trained_adapter

pytestmark = [pytest.mark.ray, pytest.mark.usefixtures("ray_cluster")]

TINY_RUN = [
    "data.eval_fraction=0.2",
    "data.max_length=96",
    "training.max_steps=3",
    "training.logging_steps=1",
    "training.learning_rate=2e-3",
    "training.dtype=fp32",
    "lora.dropout=0",
    "tracking.report_to=none",
    "distributed.backend=ray",
]


def test_dpo_on_two_workers_matches_one_worker(tiny_model: Path, tmp_path: Path) -> None:
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(EXAMPLE_PREFERENCES.read_text().splitlines(keepends=True)[:40]))

    def run(name: str, workers: int, batch_size: int) -> tuple[DPORunConfig, dict]:
        config = load_config(
            DPORunConfig,
            None,
            [
                f"model={tiny_model}",
                f"output_dir={tmp_path / name}",
                f"data.train={pairs}",
                f"dpo.reference_cache_dir={tmp_path / name / 'ref-cache'}",  # each run computes its own
                *TINY_RUN,
                f"distributed.num_workers={workers}",
                f"training.batch_size={batch_size}",
            ],
        )
        return config, train_dpo(config)

    (one_cfg, one), (two_cfg, two) = run("one", 1, 8), run("two", 2, 4)

    assert (one["global_step"], two["global_step"]) == (3, 3)
    for key in ("train_loss", "eval_loss"):
        assert two[key] == pytest.approx(one[key], rel=1e-3), key
    # A margin is a small difference of two log-ratios: the same drift, absolute rather than relative.
    assert two["eval_rewards/margins"] == pytest.approx(one["eval_rewards/margins"], abs=1e-2)
    assert two["eval_rewards/margins"] > 0  # and DPO did learn to prefer the chosen answers
    assert_adapters_agree(one_cfg.output_dir, two_cfg.output_dir)


def test_kto_trains_on_two_workers(tiny_model: Path, tmp_path: Path) -> None:
    thumbs = tmp_path / "thumbs.jsonl"
    write_jsonl(thumbs, feedback_rows())
    config = load_config(
        KTORunConfig,
        None,
        [
            f"model={tiny_model}",
            f"output_dir={tmp_path / 'kto'}",
            f"data.train={thumbs}",
            *TINY_RUN,
            "distributed.num_workers=2",
            "training.batch_size=4",
        ],
    )
    metrics = train_kto(config)
    assert metrics["global_step"] == 3
    assert metrics["ray_workers"] == 2
    assert "eval_loss" in metrics
    assert_loads_trained_adapter(config.output_dir)
