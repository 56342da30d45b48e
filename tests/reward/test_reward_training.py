"""The reward model learns a learnable preference, stays at chance on shuffled labels, and saves a
scorer that reproduces its held-out numbers."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from alignment.config import load_config
from alignment.preference_data import write_preference_rows
from reward.scorer import RewardScorer
from reward.trainer import RewardRunConfig, build_reward_trainer, train_reward

from .conftest import MARKER, WORDS, tiny_reward_overrides


def test_reward_model_learns_a_marker_preference(trained: tuple) -> None:
    _, metrics, _ = trained
    assert metrics["heldout_pairs"] == 200
    assert metrics["heldout_accuracy"] > 0.9
    assert metrics["heldout_mean_margin"] > 0.5


def test_held_out_pairs_are_scored_exactly_once(trained: tuple) -> None:
    _, metrics, scored = trained
    # 200 held-out pairs, two sides each, through the reward head once: no epoch-end or second eval.
    assert scored == 2 * metrics["heldout_pairs"] == 400


def test_run_dir_has_adapter_with_score_head_and_eval_report(trained: tuple) -> None:
    out, metrics, _ = trained
    from safetensors import safe_open

    with safe_open(str(out / "adapter_model.safetensors"), "pt") as f:
        assert any("score" in key for key in f.keys())  # noqa: SIM118 - safe_open has no __iter__
    report = json.loads((out / "reward_eval.json").read_text())
    assert report["accuracy"] == pytest.approx(metrics["heldout_accuracy"])
    assert {"length_buckets", "calibration_bins", "ece", "reward_length_correlation"} <= report.keys()
    assert (out / "reward_eval.png").stat().st_size > 1000
    assert json.loads((out / "metrics.json").read_text())["heldout_accuracy"] == metrics["heldout_accuracy"]


def test_saved_scorer_prefers_the_marker(trained: tuple) -> None:
    out, _, _ = trained
    scorer = RewardScorer.from_pretrained(out, batch_size=3)
    prompts = ["Say 2-0", [{"role": "user", "content": "Say 2-1"}]] * 3
    good = [f"red big slow {MARKER}", f"old cold sad {MARKER}", f"fast new warm {MARKER}"]
    bad = ["red big slow", "old cold sad", "fast new warm"]
    rewards = scorer(prompts, good + bad)
    assert all(g > b for g, b in zip(rewards[:3], rewards[3:], strict=True))


def test_reward_model_stays_at_chance_on_shuffled_labels(
    tiny_model: Path, marker_data: dict[str, Path], tmp_path: Path
) -> None:
    config = load_config(
        RewardRunConfig,
        None,
        tiny_reward_overrides(
            tiny_model, tmp_path, marker_data["train_shuffled"], marker_data["eval_shuffled"]
        ),
    )
    metrics = train_reward(config)
    # 200 held-out pairs: one standard deviation of chance accuracy is 0.035.
    assert 0.35 <= metrics["heldout_accuracy"] <= 0.65


def varied_length_pairs(path: Path, n: int = 64) -> Path:
    """Pairs whose responses run from 1 to 40 words, each with annotator agreement 0.5."""
    rng = random.Random(0)
    rows = [
        {
            "prompt": f"Say {i}",
            "chosen": " ".join(rng.choices(WORDS, k=rng.randint(1, 40))) + f" {MARKER}",
            "rejected": " ".join(rng.choices(WORDS, k=rng.randint(1, 40))),
            "annotator_agreement": 0.5,
        }
        for i in range(n)
    ]
    write_preference_rows(path, rows)
    return path


def batch_lengths(batch: dict) -> list[int]:
    """Packed width of each pair in a batch: prefix + prompt + chosen + rejected tokens."""
    return batch["pair_segments"][:, 2:].sum(1).tolist()


def padding(batches: list[list[int]]) -> int:
    return sum(max(b) * len(b) - sum(b) for b in batches)


def test_agreement_margin_reaches_the_loss_and_batches_are_length_grouped(
    tiny_model: Path, marker_data: dict[str, Path], tmp_path: Path
) -> None:
    import torch

    train = varied_length_pairs(tmp_path / "varied.jsonl")
    overrides = [
        *tiny_reward_overrides(tiny_model, tmp_path / "run", train, marker_data["eval"]),
        "reward.agreement_margin=2.0",
    ]
    trainer = build_reward_trainer(load_config(RewardRunConfig, None, overrides))
    batches = list(trainer.get_train_dataloader())
    batch = trainer._prepare_inputs(batches[0])
    assert batch["margin"].tolist() == [1.0] * 8  # 2.0 * agreement 0.5

    # The loss is -log sigmoid(r_chosen - r_rejected - margin): it must change with the margin, by that formula.
    with torch.no_grad():
        rewards = trainer.model(**batch).logits.squeeze(-1).float()
        chosen, rejected = rewards.chunk(2)
        with_margin = trainer.compute_loss(trainer.model, dict(batch))
        without = trainer.compute_loss(trainer.model, {k: v for k, v in batch.items() if k != "margin"})
    expected = -torch.nn.functional.logsigmoid(chosen - rejected - 1.0).mean()
    torch.testing.assert_close(with_margin.float(), expected, atol=1e-2, rtol=1e-2)  # bf16 rewards
    assert with_margin > without + 0.3  # a margin of 1 on untrained rewards near 0: log-loss grows by ~0.6

    # Length-grouped batches pad far less than the random batches of the same pairs.
    random_config = load_config(RewardRunConfig, None, [*overrides, "reward.group_by_length=false"])
    shuffled = list(build_reward_trainer(random_config).get_train_dataloader())
    grouped_lengths = [batch_lengths(b) for b in batches]
    random_lengths = [batch_lengths(b) for b in shuffled]
    assert sorted(n for b in grouped_lengths for n in b) == sorted(n for b in random_lengths for n in b)
    # HF sorts each mega-batch longest first (then swaps the longest pair of all to the very front).
    assert all(b == sorted(b, reverse=True) for b in grouped_lengths[1:])
    assert not all(b == sorted(b, reverse=True) for b in random_lengths[1:])
    assert padding(grouped_lengths) < 0.75 * padding(random_lengths)
    assert not trainer.args.gradient_checkpointing


def test_train_reward_cli_reports_bad_config_and_bad_data(tiny_model: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from serving.cli import app

    runner = CliRunner()
    bad_key = runner.invoke(app, ["train", "reward", "--set", "reward.margin=1"])
    assert bad_key.exit_code == 2
    assert "reward.margin: unknown key" in bad_key.output

    data = tmp_path / "pairs.jsonl"
    data.write_text('{"prompt": "q", "chosen": "a", "rejected": "b"}\n{"prompt": "q", "chosen": "a"}\n')
    args = ["train", "reward", "--set", f"model={tiny_model}", "--set", f"data.train={data}"]
    bad_row = runner.invoke(app, [*args, "--set", f"output_dir={tmp_path / 'run'}"])
    assert bad_row.exit_code == 2
    assert "pairs.jsonl:2: missing 'rejected'" in bad_row.output


def test_default_precision_trains_bf16_weights_against_fp32_masters(
    tiny_model: Path, marker_data: dict[str, Path], tmp_path: Path
) -> None:
    import torch

    from alignment.lora_precision import FP32MasterWeights
    from reward.trainer import device_plan

    overrides = tiny_reward_overrides(tiny_model, tmp_path, marker_data["train"], marker_data["eval"])
    config = load_config(RewardRunConfig, None, [*overrides, "training.max_steps=2"])
    if device_plan(config).dtype != torch.bfloat16:
        pytest.skip("this machine has no native bf16, so training.mixed_precision does not apply")
    trainer = build_reward_trainer(config)
    trainable = [p for p in trainer.model.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.bfloat16 for p in trainable)
    assert trainer.accelerator.mixed_precision == "no"  # no autocast: nothing left to cast
    masters = next(cb for cb in trainer.callback_handler.callbacks if isinstance(cb, FP32MasterWeights))
    before = [p.detach().clone() for p in trainable]
    result = trainer.train()
    assert torch.isfinite(torch.tensor(result.training_loss))
    assert len(masters.pairs) == len(trainable)
    assert all(m.dtype == torch.float32 for _, m in masters.pairs)
    assert all(
        torch.equal(p, m.to(torch.bfloat16)) for p, m in masters.pairs
    )  # the model holds the rounded masters
    assert any(not torch.equal(a, p) for a, p in zip(before, trainable, strict=True))
