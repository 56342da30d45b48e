"""The real chain on SmolLM2-135M in bf16: SFT adapter -> reward model -> DPO -> eval.

Few steps each, so it runs in minutes on 2 CPU cores; it checks that the stages hand their
outputs to each other and that each learns something measurable, not final model quality.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from alignment.config import load_config
from alignment.dpo import DPORunConfig, train_dpo
from alignment.sft import SFTRunConfig, train_sft
from reward.evaluate import EvalConfig, run_eval
from reward.trainer import RewardRunConfig, train_reward

pytestmark = pytest.mark.slow

COMMON = ["tracking.report_to=none", "training.dtype=bf16", "training.logging_steps=2", "data.max_length=128"]


def test_sft_reward_dpo_eval_chain(smollm2: Path, tmp_path: Path) -> None:
    sft_dir, reward_dir, dpo_dir = tmp_path / "sft", tmp_path / "reward", tmp_path / "dpo"

    sft = train_sft(
        load_config(
            SFTRunConfig,
            "configs/sft.yaml",
            [*COMMON, f"output_dir={sft_dir}", "training.max_steps=12", "training.batch_size=8"],
        )
    )
    assert sft["eval_loss"] < 3.0, sft

    reward = train_reward(
        load_config(
            RewardRunConfig,
            "configs/reward.yaml",
            [*COMMON, f"output_dir={reward_dir}", "training.max_steps=12", "training.batch_size=8"],
        )
    )
    # The house style (chosen) vs plain answers (rejected) is an easy preference to learn.
    assert reward["heldout_accuracy"] >= 0.8, reward

    dpo = train_dpo(
        load_config(
            DPORunConfig,
            "configs/dpo.yaml",
            [
                *COMMON,
                f"init_adapter={sft_dir}",
                f"output_dir={dpo_dir}",
                "training.max_steps=8",
                "training.batch_size=4",
                "training.learning_rate=2e-4",
            ],
        )
    )
    assert dpo["eval_rewards/margins"] > 0, dpo
    assert json.loads((dpo_dir / "adapter_config.json").read_text())["base_model_name_or_path"]

    result = run_eval(
        EvalConfig.model_validate(
            {
                "candidate": {"adapter": str(dpo_dir)},
                "baseline": {"adapter": str(sft_dir)},
                "reward_model": str(reward_dir),
                "max_prompts": 8,
                "preference_eval": None,
                "sampling": {"max_new_tokens": 24, "temperature": 0.0},
                "output_dir": str(tmp_path / "eval"),
            }
        )
    )
    assert (tmp_path / "eval" / "eval.json").is_file() and (tmp_path / "eval" / "eval.png").is_file()
    assert 0.0 <= result["win_rate"] <= 1.0
    assert result["candidate"]["kl_to_reference"] >= 0
