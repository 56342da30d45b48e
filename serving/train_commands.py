"""Every `prefloop train ...` command, in one place, with the same flags wherever the stage has them.

All six take `--config`, `--set`, `--resume`, `--ray` and `--workers` (each flag is sugar for a
`--set` override, see `alignment.cli_common.run_overrides`); PPO and GRPO add `--reward-model`.
This module is in serving/, the top layer, because it imports trainers from every stage; the
imports are inside the commands so `prefloop --help` starts fast.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer

from alignment.cli_common import (
    ConfigOption,
    RayOption,
    ResumeOption,
    SetOption,
    WorkersOption,
    option_overrides,
    print_metrics,
    run_stage,
)

if TYPE_CHECKING:
    from reward.scorer import RewardScorer

train_app = typer.Typer(
    help="Training stages (each takes --config FILE.yaml and --set key=value).", no_args_is_help=True
)

RewardModelOption = Annotated[
    str | None, typer.Option("--reward-model", help="Reward model directory (the config's reward_model).")
]


@train_app.command("sft")
def train_sft(
    config: ConfigOption = None,
    overrides: SetOption = None,
    resume: ResumeOption = False,
    ray: RayOption = False,
    workers: WorkersOption = None,
) -> None:
    """Supervised fine-tuning of a LoRA/QLoRA adapter (TRL SFTTrainer)."""
    from alignment.sft import SFTRunConfig, train_sft
    from reward.curation import curation_scorers

    def train(cfg: SFTRunConfig) -> dict:
        # A `curate:` block's reward-model/judge scores come from the reward layer, built here.
        return train_sft(cfg, curation_scorers(cfg.curate))

    cfg, metrics = run_stage(SFTRunConfig, train, config, overrides, resume, ray, workers)
    print_metrics(f"SFT -> {cfg.output_dir}", metrics)


@train_app.command("dpo")
def train_dpo(
    config: ConfigOption = None,
    overrides: SetOption = None,
    resume: ResumeOption = False,
    ray: RayOption = False,
    workers: WorkersOption = None,
) -> None:
    """Direct Preference Optimization from an SFT adapter on chosen/rejected pairs (TRL DPOTrainer)."""
    from alignment.dpo import DPORunConfig, train_dpo

    cfg, metrics = run_stage(DPORunConfig, train_dpo, config, overrides, resume, ray, workers)
    print_metrics(f"DPO -> {cfg.output_dir}", metrics)


@train_app.command("kto")
def train_kto(
    config: ConfigOption = None,
    overrides: SetOption = None,
    resume: ResumeOption = False,
    ray: RayOption = False,
    workers: WorkersOption = None,
) -> None:
    """KTO on unpaired thumbs-up/thumbs-down feedback (TRL KTOTrainer)."""
    from alignment.kto import KTORunConfig, train_kto

    cfg, metrics = run_stage(KTORunConfig, train_kto, config, overrides, resume, ray, workers)
    print_metrics(f"KTO -> {cfg.output_dir}", metrics)


@train_app.command("reward")
def train_reward(
    config: ConfigOption = None,
    overrides: SetOption = None,
    resume: ResumeOption = False,
    ray: RayOption = False,
    workers: WorkersOption = None,
) -> None:
    """Train a reward model (LoRA + scalar head, TRL RewardTrainer) on preference pairs."""
    from reward.trainer import RewardRunConfig, train_reward

    cfg, metrics = run_stage(RewardRunConfig, train_reward, config, overrides, resume, ray, workers)
    shown = {k: v for k, v in metrics.items() if k.startswith(("heldout_", "train_loss", "train_runtime"))}
    print_metrics(f"reward -> {cfg.output_dir} (report: reward_eval.json / .png)", shown)


def reward_scorer(reward_model: str | None, stage: str) -> RewardScorer:
    """The scoring callable an RL trainer takes, from the run's reward model directory."""
    from alignment.config import ConfigError
    from reward.scorer import RewardScorer

    if reward_model is None:
        raise ConfigError(f"{stage}: no reward model; pass --reward-model or set reward_model in the config")
    return RewardScorer.from_pretrained(reward_model)


def with_reward_model(overrides: list[str] | None, reward_model: str | None) -> list[str]:
    """`--reward-model X` is sugar for `--set reward_model=X`."""
    return option_overrides({"reward_model": reward_model}, overrides)


@train_app.command("ppo")
def train_ppo(
    config: ConfigOption = None,
    overrides: SetOption = None,
    reward_model: RewardModelOption = None,
    resume: ResumeOption = False,
    ray: RayOption = False,
    workers: WorkersOption = None,
) -> None:
    """PPO of the SFT adapter against a reward model (GAE, clipped losses, KL control, optional ptx)."""
    from alignment.rl.config import PPORunConfig
    from alignment.rl.ppo import train_ppo

    cfg, metrics = run_stage(
        PPORunConfig,
        lambda cfg: train_ppo(cfg, reward_scorer(cfg.reward_model, "ppo")),
        config,
        with_reward_model(overrides, reward_model),
        resume,
        ray,
        workers,
    )
    print_metrics(f"PPO -> {cfg.output_dir} (curves: ppo_curves.png)", metrics)


@train_app.command("grpo")
def train_grpo(
    config: ConfigOption = None,
    overrides: SetOption = None,
    reward_model: RewardModelOption = None,
    resume: ResumeOption = False,
    ray: RayOption = False,
    workers: WorkersOption = None,
) -> None:
    """GRPO or RLOO (TRL, no critic) of the SFT adapter against a reward model."""
    from alignment.rl.config import GRPORunConfig
    from alignment.rl.grpo import train_grpo

    cfg, metrics = run_stage(
        GRPORunConfig,
        lambda cfg: train_grpo(cfg, reward_scorer(cfg.reward_model, cfg.grpo.algorithm)),
        config,
        with_reward_model(overrides, reward_model),
        resume,
        ray,
        workers,
    )
    print_metrics(f"{cfg.grpo.algorithm.upper()} -> {cfg.output_dir}", metrics)
