"""Micro-batches under a token budget: the same gradient as the whole batch, and used by default on long pairs."""

from __future__ import annotations

import random
from pathlib import Path

import torch

from alignment.config import load_config
from alignment.preference_data import write_preference_rows
from reward.trainer import RewardRunConfig, build_reward_trainer, micro_batch_groups
from tests.reward.conftest import WORDS, tiny_reward_overrides


def long_pairs(path: Path, n: int, prompt_words: int, seed: int = 0) -> Path:
    """Multi-turn pairs with long prompts (a system prompt on half of them), agreement 0.5."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        turns = [{"role": "user", "content": " ".join(rng.choices(WORDS, k=prompt_words))}]
        if i % 2:
            turns = [{"role": "system", "content": "Be brief."}, *turns]
        if i % 3 == 0:
            turns += [{"role": "assistant", "content": "ok"}, {"role": "user", "content": f"And {i}?"}]
        rows.append(
            {
                "prompt": turns,
                "chosen": " ".join(rng.choices(WORDS, k=rng.randint(1, 30))) + " ahoy",
                "rejected": " ".join(rng.choices(WORDS, k=rng.randint(1, 30))),
                "annotator_agreement": 0.5,
            }
        )
    write_preference_rows(path, rows)
    return path


def test_micro_batch_groups_keep_order_and_budget() -> None:
    assert micro_batch_groups([3, 4, 2, 9, 1], budget=7) == [[0, 1], [2], [3], [4]]
    assert micro_batch_groups([3, 4], budget=100) == [[0, 1]]


def test_micro_batched_gradients_equal_the_whole_batch(
    tiny_model: Path, marker_data: dict[str, Path], tmp_path: Path
) -> None:
    train = long_pairs(tmp_path / "train.jsonl", 16, prompt_words=20)
    overrides = [
        *tiny_reward_overrides(tiny_model, tmp_path / "run", train, marker_data["eval"]),
        "training.dtype=fp32",  # exactness up to summation order, not bf16 rounding
        "reward.agreement_margin=2.0",  # both loss terms must be weighted right
        "reward.center_rewards_coefficient=0.1",
    ]
    trainer = build_reward_trainer(
        load_config(RewardRunConfig, None, [*overrides, "reward.micro_batch_tokens=150"])
    )
    for name, param in trainer.model.named_parameters():
        if "lora_B" in name:  # zero at init, which would leave every lora_A gradient zero
            torch.nn.init.normal_(param, std=0.02)
    batch_split = next(iter(trainer.get_train_dataloader()))
    batch_whole = {k: v for k, v in batch_split.items() if k != "micro_batches"}  # the same pairs, at once
    n_micro = len(batch_split["micro_batches"])
    assert n_micro >= 3
    # Within the budget, or a pair too long for it alone.
    assert all(
        int(m["attention_mask"].sum()) <= 150 or len(m["pair_segments"]) == 1
        for m in batch_split["micro_batches"]
    )
    assert any(len(m["pair_segments"]) > 1 for m in batch_split["micro_batches"])

    grads, losses = [], []
    trainer.current_gradient_accumulation_steps = 1  # set by the train loop otherwise
    for batch in (batch_whole, batch_split):
        trainer.model.zero_grad()
        losses.append(trainer.training_step(trainer.model, batch))
        grads.append({n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.requires_grad})
    assert trainer.micro_batch_forwards == n_micro
    torch.testing.assert_close(losses[1], losses[0], atol=1e-5, rtol=1e-5)
    assert grads[0].keys() == grads[1].keys() and any("score" in n for n in grads[0])
    for name, grad in grads[0].items():
        assert grad.abs().max() > 0, name
        torch.testing.assert_close(grads[1][name], grad, atol=1e-6, rtol=1e-4, msg=name)


def test_default_config_trains_long_batches_in_micro_batches(
    tiny_model: Path, marker_data: dict[str, Path], tmp_path: Path
) -> None:
    """Fails if the memory-saving path is silently not taken with the shipped defaults."""
    defaults = load_config(RewardRunConfig, Path("configs/reward.yaml"), [])
    budget = defaults.reward.micro_batch_tokens
    assert budget is not None and budget == RewardRunConfig().reward.micro_batch_tokens
    train = long_pairs(tmp_path / "train.jsonl", 8, prompt_words=150)
    overrides = [
        *tiny_reward_overrides(tiny_model, tmp_path / "run", train, marker_data["eval"]),
        "data.max_length=512",
        "training.max_steps=1",
    ]
    trainer = build_reward_trainer(load_config(RewardRunConfig, Path("configs/reward.yaml"), overrides))
    forwards: list[int] = []
    score = trainer.model.get_base_model().score
    hook = score.register_forward_hook(
        lambda m, a, out: forwards.append(out.shape[0]) if m.training else None
    )
    try:
        trainer.train()
    finally:
        hook.remove()
    assert len(forwards) >= 2 and trainer.micro_batch_forwards == len(forwards)
    assert sum(forwards) == 2 * 8  # every pair's two sides scored once
