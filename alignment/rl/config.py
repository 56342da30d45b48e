"""Run configs of the RL stages (PPO, GRPO, RLOO) and the reward they train against.

Configs live here, apart from the trainers, so that the CLI, the Ray worker and the trainers all
import a config without importing each other. `RewardFn` is the one reward signature: any scoring
callable (a reward model from `reward/`, a rule, a judge) with (prompts, responses) -> one float each.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Literal

from pydantic import Field

from alignment.config import StrictModel
from alignment.messages import Message
from alignment.prompts import EXAMPLE_PROMPTS
from alignment.runner import PolicyRunConfig

RewardFn = Callable[[list[list[Message]] | list[str], list[str]], list[float]]


# --- shared by every RL run -------------------------------------------------------------------------


class RLRunConfig(PolicyRunConfig):
    """What every RL run from a reward (PPO, GRPO, RLOO) adds: the reward model."""

    reward_model: str | None = Field(
        None, description="Reward model directory; the `prefloop train` command builds the reward from it."
    )


# --- PPO -------------------------------------------------------------------------------------------


class GenerationSettings(StrictModel):
    max_new_tokens: int = Field(64, gt=0, description="Response length cap; longer responses are truncated.")
    temperature: float = Field(0.7, gt=0, description="Sampling temperature; logprobs use the same one.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling (1.0 = the full distribution).")


class PPOConfig(StrictModel):
    """PPO hyperparameters, named as in the papers."""

    rollout_batch_size: int = Field(16, ge=1, description="Prompts sampled per PPO step.")
    mini_batch_size: int = Field(8, ge=1, description="Rollouts per optimizer step.")
    ppo_epochs: int = Field(4, ge=1, description="Passes over each rollout batch.")
    gamma: float = Field(1.0, ge=0, le=1, description="GAE discount.")
    lam: float = Field(0.95, ge=0, le=1, description="GAE lambda.")
    cliprange: float = Field(0.2, gt=0, description="epsilon of the clipped policy ratio.")
    cliprange_value: float = Field(0.2, gt=0, description="Clip range of the value prediction.")
    vf_coef: float = Field(0.1, ge=0, description="Value loss weight (shared trunk only).")
    kl_controller: Literal["adaptive", "fixed"] = Field(
        "adaptive", description="Fixed beta, or Ziegler et al.'s proportional controller towards target_kl."
    )
    init_kl_coef: float = Field(0.05, ge=0, description="beta: weight of the per-token KL penalty.")
    target_kl: float = Field(6.0, gt=0, description="Adaptive controller's target KL (nats per response).")
    kl_horizon: int = Field(10000, gt=0, description="Adaptive controller's horizon (rollouts).")
    kl_estimator: Literal["k1", "k3"] = Field(
        "k1",
        description="k1 = log-ratio (unbiased), k3 = (ratio-1) - log ratio (non-negative, lower variance).",
    )
    score_norm: Literal["none", "running"] = Field(
        "none", description="Normalise reward scores by their running mean/std before the KL penalty."
    )
    whiten_rewards: bool = Field(False, description="Whiten the per-token rewards (scale only) before GAE.")
    whiten_advantages: bool = Field(True, description="Normalise advantages to mean 0, std 1 per batch.")
    missing_eos_penalty: float | None = Field(
        1.0, description="Subtracted from the score of responses that hit max_new_tokens without EOS."
    )
    ptx_coef: float = Field(
        0.0, ge=0, description="gamma_ptx: weight of the SFT (pretraining) loss; 0 = off."
    )
    ptx_batch_size: int = Field(4, ge=1, description="SFT examples per optimizer step for PPO-ptx.")
    critic: Literal["shared", "separate"] = Field(
        "separate", description="Value head on the policy trunk, or on its own LoRA model."
    )
    critic_model: str | None = Field(
        None, description="Base of the separate critic (default: the policy's base model)."
    )
    critic_learning_rate: float | None = Field(None, gt=0, description="Default: training.learning_rate.")
    reference: Literal["init_adapter", "base"] = Field(
        "init_adapter",
        description="Frozen copy of the init adapter, or the base with adapters disabled (always the "
        "base when there is no init adapter).",
    )
    generation: GenerationSettings = Field(default_factory=GenerationSettings)


class PPODataSettings(StrictModel):
    prompts: Path = Field(
        EXAMPLE_PROMPTS,
        description="JSONL/datasets rows with 'prompt' (text or messages), preference pairs, or SFT "
        "'messages' (their user turns are the prompts).",
    )
    max_prompt_length: int = Field(256, gt=0, description="Longer prompts are dropped (and counted).")
    ptx: Path | None = Field(None, description="SFT data for PPO-ptx (messages or Alpaca rows).")
    ptx_max_length: int = Field(512, gt=8, description="Tokens per PPO-ptx example (truncated).")


class PPORunConfig(RLRunConfig):
    """`training.max_steps` counts PPO steps (rollout batches), `training.epochs` passes over the prompts;
    batch sizes live in `ppo` (rollout_batch_size, mini_batch_size), so `training.batch_size` is unused."""

    output_dir: Path = Path("runs/ppo")
    data: PPODataSettings = Field(default_factory=PPODataSettings)
    ppo: PPOConfig = Field(default_factory=PPOConfig)


# --- GRPO / RLOO -----------------------------------------------------------------------------------


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
