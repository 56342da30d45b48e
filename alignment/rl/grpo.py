"""Critic-free RL from a reward function: TRL's GRPOTrainer (or RLOOTrainer), thinly wrapped.

config = load_config(GRPORunConfig, "configs/grpo.yaml", ["grpo.num_generations=8"])
metrics = train_grpo(config, reward_fn)   # reward_fn(prompts, responses) -> list[float]

GRPO (Shao et al., 2024) samples `num_generations` responses per prompt and uses each response's
reward relative to its group as the advantage; RLOO (Ahmadian et al., 2024) uses the mean of the
other responses as the baseline. Neither trains a value model, which is what makes them the cheap
alternative to PPO (`alignment.rl.ppo`). The reward is the same scoring callable PPO takes, adapted to TRL's
reward-function signature by `trl_reward_function`. The policy is the init (SFT) adapter made
trainable, or a fresh LoRA; the KL reference is the same weights with the adapter disabled.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from datasets import Dataset
from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer

from alignment.config import ConfigError
from alignment.launch import run_training
from alignment.lora_precision import apply_mixed_precision
from alignment.policy import load_run_policy, load_run_tokenizer
from alignment.prompts import load_prompts
from alignment.rl.config import GRPORunConfig, RewardFn
from alignment.runner import callbacks, device_plan, training_arguments


def trl_reward_function(reward_fn: RewardFn, name: str = "reward_model") -> Callable[..., list[float]]:
    """(prompts, responses) -> rewards, as TRL calls it: keyword `prompts` and `completions`, where a
    conversational completion is a list holding the assistant message."""

    def reward(prompts: list[Any], completions: list[Any], **_: Any) -> list[float]:
        responses = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return [float(r) for r in reward_fn(prompts, responses)]

    reward.__name__ = name  # TRL logs rewards/<name>/mean
    return reward


def build_grpo_trainer(config: GRPORunConfig, reward_fn: RewardFn) -> GRPOTrainer | RLOOTrainer:
    g = config.grpo
    t = config.training
    generation_batch = t.batch_size * t.gradient_accumulation_steps * config.distributed.num_workers
    if generation_batch % g.num_generations:
        raise ConfigError(
            f"training.batch_size x gradient_accumulation_steps x workers ({generation_batch}) must be a "
            f"multiple of grpo.num_generations ({g.num_generations})"
        )
    tokenizer = load_run_tokenizer(config)
    dataset = Dataset.from_list([{"prompt": p} for p in load_prompts(config.data.prompts)])
    plan = device_plan(config)
    model, peft_config = load_run_policy(config, plan)
    common: dict[str, Any] = dict(
        num_generations=g.num_generations,
        max_completion_length=g.max_completion_length,
        temperature=g.temperature,
        top_p=g.top_p,
        beta=g.beta,
        epsilon=g.epsilon,
        num_iterations=g.num_iterations,
        mask_truncated_completions=g.mask_truncated_completions,
    )
    if g.algorithm == "grpo":
        args_cls, trainer_cls = GRPOConfig, GRPOTrainer
        common |= dict(loss_type=g.loss_type, scale_rewards=g.scale_rewards)
    else:
        args_cls, trainer_cls = RLOOConfig, RLOOTrainer
    args = training_arguments(args_cls, config, has_eval=False, **common)
    trainer = trainer_cls(
        model=model,
        reward_funcs=trl_reward_function(reward_fn),
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=callbacks(config, has_eval=False),
    )
    apply_mixed_precision(trainer, plan.dtype, config.training.mixed_precision)
    return trainer


def train_grpo(config: GRPORunConfig, reward_fn: RewardFn) -> dict[str, Any]:
    """Train and write adapter + tokenizer + model card + resolved config to output_dir."""
    return run_training(
        config, config.grpo.algorithm, lambda c: build_grpo_trainer(c, reward_fn), [config.data.prompts]
    )
