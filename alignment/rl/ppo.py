"""`train_ppo`: PPO for RLHF, prefloop's own (TRL 1.x no longer ships a PPOTrainer), as one run.

config = load_config(PPORunConfig, "configs/ppo.yaml", ["ppo.init_kl_coef=0.1"])
metrics = train_ppo(config, reward_fn)   # reward_fn(prompts, responses) -> list[float]

The run draws rollout batches from a `PromptSampler`, calls `PPOTrainer.step` on each, logs every
step (ppo_log.jsonl, rich progress, wandb offline by default), checkpoints every
`training.save_steps`, and finishes with the policy adapter, value head, curves, metrics and model
card in output_dir. With `distributed.backend: ray` the same steps run data-parallel on Ray workers
(`alignment.rl.ray_worker`) and the run dir ends up the same.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from alignment.checkpoints import latest_checkpoint
from alignment.config import ConfigError, dump_config
from alignment.prompts import PromptSampler, load_prompts
from alignment.rl.config import PPORunConfig, RewardFn
from alignment.rl.ppo_trainer import (
    TRAINER_STATE_FILE,
    PPOTrainer,
    build_ppo_trainer,
    check_supported,
    total_steps,
)
from alignment.runner import data_fingerprint, setup_tracking, write_model_card

log = logging.getLogger(__name__)


def train_ppo(config: PPORunConfig, reward_fn: RewardFn) -> dict[str, Any]:
    """Run PPO and write policy adapter, value head, config, per-step log, curves and model card."""
    out = config.output_dir
    out.mkdir(parents=True, exist_ok=True)
    dump_config(config, out / "prefloop-config.yaml")
    if config.distributed.backend == "ray":
        return _train_ppo_on_ray(config, reward_fn)
    trainer, prompts, prompt_ids = build_ppo_trainer(config, reward_fn)
    run = _start_wandb(config)
    steps = total_steps(config, len(prompts))
    sampler = PromptSampler(len(prompts), config.ppo.rollout_batch_size, config.training.seed)
    log_path = out / "ppo_log.jsonl"
    first = _resume(config, trainer, sampler, log_path, steps) if config.resume else 1
    if first == 1:
        log_path.write_text("")
    columns = (
        TextColumn("[bold]PPO"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.description}"),
    )
    with Progress(*columns) as progress:
        task = progress.add_task("", total=steps, completed=first - 1)
        for step in range(first, steps + 1):
            batch = sampler.next_batch()
            stats = trainer.step([prompts[i] for i in batch], [prompt_ids[i] for i in batch])
            with log_path.open("a") as fh:
                fh.write(json.dumps({"step": step, **stats}) + "\n")
            if run is not None:
                run.log(stats, step=step)
            progress.update(
                task,
                advance=1,
                description=f"reward {stats['reward/raw']:.3f}  kl {stats['objective/kl']:.3f}  beta {trainer.kl_ctl.value:.3g}",
            )
            save_every = config.training.save_steps
            if save_every and step % save_every == 0 and step < steps:
                trainer.save_checkpoint(out / f"checkpoint-{step}", step, sampler.state())
    trainer.save(out)
    plot_curves(trainer.history, out / "ppo_curves.png")
    metrics = _summary(trainer.history, len(prompts))
    if run is not None:
        run.summary.update(metrics)
        run.finish()
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    data = [p for p in (config.data.prompts, config.data.ptx) if p]
    write_model_card(out, "ppo", config, data_fingerprint(data), metrics)
    return metrics


def _resume(
    config: PPORunConfig, trainer: PPOTrainer, sampler: PromptSampler, log_path: Path, steps: int
) -> int:
    """Restore the latest checkpoint into trainer and sampler; returns the first step still to run."""
    checkpoint = latest_checkpoint(config.output_dir, marker=TRAINER_STATE_FILE)
    if checkpoint is None:
        raise ConfigError(
            f"ppo: resume asked for, but {config.output_dir} holds no checkpoint-N with a trainer state"
        )
    restored = trainer.load_checkpoint(checkpoint)
    first = restored["step"] + 1
    sampler.load_state(restored["sampler"])
    log.info("ppo: resumed from %s (step %d of %d)", checkpoint, restored["step"], steps)
    # The log keeps the steps the checkpoint has; later lines came from the interrupted run.
    lines = log_path.read_text().splitlines() if log_path.is_file() else []
    log_path.write_text("".join(f"{line}\n" for line in lines if json.loads(line)["step"] < first))
    return first


def _train_ppo_on_ray(config: PPORunConfig, reward_fn: RewardFn) -> dict[str, Any]:
    """Data-parallel PPO on Ray workers; the run dir ends up as a local run leaves it."""
    from alignment.rl.ray_worker import run_ppo_on_ray  # Ray is imported only by runs that use it

    check_supported(config)
    history, ray_metrics = run_ppo_on_ray(config, reward_fn)
    out = config.output_dir
    plot_curves(history, out / "ppo_curves.png")
    data = [p for p in (config.data.prompts, config.data.ptx) if p]
    metrics = {**_summary(history, len(load_prompts(config.data.prompts))), **ray_metrics}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    write_model_card(out, "ppo", config, data_fingerprint(data), metrics)
    return metrics


def plot_curves(history: list[dict[str, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = range(1, len(history) + 1)
    fig, (ax_r, ax_kl) = plt.subplots(1, 2, figsize=(9, 3.2))
    ax_r.plot(steps, [h["reward/raw"] for h in history], label="reward")
    ax_r.plot(steps, [h["objective/rlhf_reward"] for h in history], label="score - beta KL")
    ax_r.set_xlabel("PPO step")
    ax_r.legend()
    ax_kl.plot(steps, [h["objective/kl"] for h in history], color="tab:red")
    ax_kl.set_xlabel("PPO step")
    ax_kl.set_ylabel("KL(pi || pi_ref), nats")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _summary(history: list[dict[str, float]], n_prompts: int) -> dict[str, Any]:
    k = max(1, len(history) // 4)
    first, last = history[:k], history[-k:]

    def mean(rows: list[dict[str, float]], key: str) -> float:
        return sum(r[key] for r in rows) / len(rows)

    return {
        "steps": len(history),
        "prompts": n_prompts,
        "reward_first": mean(first, "reward/raw"),
        "reward_last": mean(last, "reward/raw"),
        "kl_last": mean(last, "objective/kl"),
        "kl_coef": history[-1]["objective/kl_coef"],
        "eos_fraction_last": mean(last, "rollout/eos_fraction"),
        "response_length_last": mean(last, "rollout/response_length"),
    }


def _start_wandb(config: PPORunConfig) -> Any:
    if config.tracking.report_to != "wandb":
        return None
    setup_tracking(config.tracking, config.output_dir)
    import wandb

    return wandb.init(
        project=config.tracking.project,
        name=config.tracking.run_name or config.output_dir.name,
        config=config.model_dump(mode="json"),
        dir=str(config.output_dir),
        mode=config.tracking.wandb_mode,
    )
