"""Critic-free RL from a reward function: TRL's GRPOTrainer (or RLOOTrainer), thinly wrapped.

config = load_config(GRPORunConfig, "configs/grpo.yaml", ["grpo.num_generations=8"])
metrics = train_grpo(config, reward_fn)   # reward_fn(prompts, responses) -> list[float]

GRPO (Shao et al., 2024) samples `num_generations` responses per prompt and uses each response's
reward relative to its group as the advantage; RLOO (Ahmadian et al., 2024) uses the mean of the
other responses as the baseline. Neither trains a value model, which is what makes them the cheap
alternative to `alignment.ppo`. The reward is the same scoring callable PPO takes, adapted to TRL's
reward-function signature by `trl_reward_function`. The policy is the init (SFT) adapter made
trainable, or a fresh LoRA; the KL reference is the same weights with the adapter disabled.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from datasets import Dataset
from pydantic import Field
from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer

from alignment.config import ConfigError, StrictModel
from alignment.lora_precision import apply_mixed_precision
from alignment.models import load_causal_lm, load_with_adapter
from alignment.ppo import EXAMPLE_PROMPTS, RewardFn, RLRunConfig, load_policy_tokenizer, load_prompts
from alignment.runner import callbacks, device_plan, lora_config, run_training, training_arguments


class GRPOSettings(StrictModel):
    algorithm: Literal["grpo", "rloo"] = Field(
        "grpo", description="Group-relative (GRPO) or leave-one-out (RLOO)."
    )
    num_generations: int = Field(4, ge=2, description="Responses sampled per prompt (the group).")
    max_completion_length: int = Field(64, gt=0, description="Response length cap.")
    temperature: float = Field(0.7, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    beta: float = Field(0.04, ge=0, description="KL coefficient to the reference (0 = no reference pass).")
    epsilon: float = Field(0.2, gt=0, description="Clip range of the importance ratio.")
    num_iterations: int = Field(1, ge=1, description="Optimisation passes per generation batch (mu).")
    loss_type: str = Field(
        "dapo", description="GRPO loss aggregation: grpo, dr_grpo, dapo, bnpo, ... (GRPO only)."
    )
    scale_rewards: Literal["group", "batch", "none"] = Field("group", description="GRPO reward scaling.")
    mask_truncated_completions: bool = Field(
        False, description="Exclude responses that hit max_completion_length from the loss (DAPO)."
    )


class GRPODataSettings(StrictModel):
    prompts: Path = Field(
        EXAMPLE_PROMPTS,
        description="Rows with 'prompt', preference pairs, or SFT conversations (user turns).",
    )


class GRPORunConfig(RLRunConfig):
    output_dir: Path = Path("runs/grpo")
    data: GRPODataSettings = Field(default_factory=GRPODataSettings)
    grpo: GRPOSettings = Field(default_factory=GRPOSettings)


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
    tokenizer = load_policy_tokenizer(config.init_adapter, config.base_model())
    dataset = Dataset.from_list([{"prompt": p} for p in load_prompts(config.data.prompts)])
    plan = device_plan(config)
    if config.init_adapter is not None:
        model = load_with_adapter(config.base_model(), config.init_adapter, plan, trainable=True)
        peft_config = None
    else:
        model = load_causal_lm(config.base_model(), plan, quantization=config.lora.quantization)
        peft_config = lora_config(config.lora)
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
