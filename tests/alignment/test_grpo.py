"""GRPO/RLOO: TRL's critic-free trainers driven by a prefloop scoring callable."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from alignment.config import ConfigError, load_config
from alignment.rl.config import GRPORunConfig
from alignment.rl.grpo import build_grpo_trainer, train_grpo, trl_reward_function


def test_reward_function_adapts_conversational_completions() -> None:
    seen = {}

    def score(prompts: list, responses: list[str]) -> list[float]:
        seen["prompts"], seen["responses"] = prompts, responses
        return [len(r) for r in responses]

    reward = trl_reward_function(score)
    prompts = [[{"role": "user", "content": "hi"}]] * 2
    completions = [[{"role": "assistant", "content": "abc"}], [{"role": "assistant", "content": "a"}]]
    assert reward(
        prompts=prompts, completions=completions, completion_ids=[[1], [2]], trainer_state=None
    ) == [3.0, 1.0]
    assert seen["responses"] == ["abc", "a"] and seen["prompts"] is prompts
    assert reward(prompts=["p"], completions=["plain"]) == [5.0]
    assert reward.__name__ == "reward_model"


def test_batch_must_hold_whole_groups(tiny_model: Path) -> None:
    config = load_config(GRPORunConfig, None, [f"model={tiny_model}", "training.batch_size=3"])
    with pytest.raises(ConfigError, match=r"multiple of grpo\.num_generations"):
        build_grpo_trainer(config, lambda prompts, responses: [0.0] * len(responses))


@pytest.mark.parametrize("algorithm", ["grpo", "rloo"])
def test_grpo_trains_and_saves(algorithm: str, tiny_model: Path, tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": f"Tell me fact {i}."}) for i in range(8)))
    calls = []

    def reward(prompts: list, responses: list[str]) -> list[float]:
        calls.append(len(responses))
        return [-len(r) / 100 for r in responses]

    out = tmp_path / algorithm
    config = load_config(
        GRPORunConfig,
        None,
        [
            f"model={tiny_model}",
            f"output_dir={out}",
            f"data.prompts={prompts}",
            f"grpo.algorithm={algorithm}",
            "grpo.num_generations=4",
            "grpo.max_completion_length=8",
            "training.batch_size=4",
            "training.max_steps=1",
            "training.logging_steps=1",
            "tracking.report_to=none",
        ],
    )
    metrics = train_grpo(config, reward)
    assert metrics["train_runtime"] > 0
    assert calls and all(n == 4 for n in calls)  # one call per generation batch of whole groups
    assert (out / "adapter_model.safetensors").is_file()
    assert (out / "prefloop-config.yaml").is_file()
    assert f"prefloop {algorithm} adapter" in (out / "README.md").read_text()


def test_bundled_config_validates() -> None:
    config = load_config(GRPORunConfig, Path(__file__).parents[2] / "configs" / "grpo.yaml")
    assert config.grpo.algorithm == "grpo"
    assert config.training.batch_size % config.grpo.num_generations == 0


def test_cli_without_reward_model_exits_2(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from serving.cli import app

    result = CliRunner().invoke(app, ["train", "grpo", "--set", f"output_dir={tmp_path}"])
    assert result.exit_code == 2
    assert "no reward model" in result.output
