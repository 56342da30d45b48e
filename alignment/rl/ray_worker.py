"""Data-parallel PPO on Ray workers: the one-process PPO step on each worker, gradients averaged.

history, metrics = run_ppo_on_ray(config, reward_fn)   # `train_ppo` calls this for backend=ray

PPO is prefloop's own loop, not an HF Trainer, so it brings its own Ray worker to the generic glue in
`alignment.distributed` (`fit_on_ray`). Each worker holds the whole PPO stack (policy LoRA,
reference = the same weights with the adapter off, critic, reward function) and takes 1/N of every
rollout batch: it generates, scores and computes advantages for its slice, and the gradients of
every trainable weight are averaged across workers inside backward (per-parameter hooks), so every
worker applies the same clipped update and the replicas never drift apart.

Why not OpenRLHF's split (rollout / reward / reference / critic as separate Ray actors)? With LoRA,
policy, reference and a shared-trunk critic are one set of base weights; splitting them into actors
means a full copy of the base per actor and shipping the adapter to the rollout actor after every
update. That pays off when generation wants its own GPUs (vLLM) and the models are large; on the CPU
machines and small models prefloop targets first, data parallelism is the faster and simpler choice.
The phase functions in `alignment.rl.experience` are already separate, so the split can be added.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import ray.train
import torch
import torch.distributed as dist
from ray.train import Checkpoint

from alignment.config import ConfigError, DistributedSettings
from alignment.distributed import FINAL, fit_on_ray
from alignment.prompts import PromptSampler
from alignment.rl.config import PPORunConfig, RewardFn
from alignment.rl.ppo_trainer import build_ppo_trainer, total_steps


def average_gradients_in_backward(params: list[torch.nn.Parameter], world_size: int) -> None:
    """All-reduce each gradient as soon as backward has produced it, so clipping sees the global gradient."""

    def hook(param: torch.nn.Parameter) -> None:
        dist.all_reduce(param.grad)
        param.grad /= world_size

    for param in params:
        param.register_post_accumulate_grad_hook(hook)


def _mean_across_workers(values: dict[str, float]) -> dict[str, float]:
    keys = sorted(values)
    tensor = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64)
    dist.all_reduce(tensor)
    tensor /= dist.get_world_size()
    return dict(zip(keys, tensor.tolist(), strict=True))


def ppo_worker(loop_config: dict[str, Any]) -> None:
    config: PPORunConfig = loop_config["config"]
    reward_fn: RewardFn = loop_config["reward_fn"]
    with contextlib.suppress(OSError):
        os.chdir(loop_config["cwd"])
    rank, world = dist.get_rank(), dist.get_world_size()
    # Each worker runs the one-process PPO on its share of every batch.
    ppo = config.ppo.model_copy(
        update={
            "rollout_batch_size": config.ppo.rollout_batch_size // world,
            "mini_batch_size": config.ppo.mini_batch_size // world,
        }
    )
    # ...and a 1/N share of the epochs, so its LR schedule spans the same number of steps as the run.
    training = config.training.model_copy(update={"epochs": config.training.epochs / world})
    local = config.model_copy(
        update={"ppo": ppo, "training": training, "distributed": DistributedSettings(), "resume": False}
    )
    trainer, prompts, prompt_ids = build_ppo_trainer(local, reward_fn)
    params = [p for m in (trainer.policy, trainer.critic) for p in m.parameters() if p.requires_grad]
    for param in params:  # identical starting weights, whatever each worker's RNG did
        dist.broadcast(param.data, src=0)
    average_gradients_in_backward(params, world)
    torch.manual_seed(config.training.seed + rank)  # ...but different samples on each worker

    steps = total_steps(config, len(prompts))
    # The same seed on every worker: all agree on each global batch, and each takes its 1/N share.
    sampler = PromptSampler(len(prompts), config.ppo.rollout_batch_size, config.training.seed)
    for _ in range(steps):
        batch = sampler.next_batch()[rank::world]
        kl_coef = trainer.kl_ctl.value
        stats = trainer.step([prompts[i] for i in batch], [prompt_ids[i] for i in batch])
        # Logged statistics are global means. The KL controller then steps as in a one-process run:
        # on the global batch's KL and its number of rollouts (not each worker's share), so every
        # worker keeps the same coefficient and N workers move it as fast as one.
        stats = _mean_across_workers(stats)
        trainer.kl_ctl.value = kl_coef
        trainer.kl_ctl.update(stats["objective/kl"], config.ppo.rollout_batch_size)
        stats["objective/kl_coef"] = trainer.kl_ctl.value
        trainer.history[-1] = stats
        ray.train.report(metrics=stats)
    # Replicas that drifted apart would mean the gradient averaging is broken: measure, never assume.
    checksum = torch.tensor([sum(p.detach().double().sum().item() for p in params)], dtype=torch.float64)
    low, high = checksum.clone(), checksum.clone()
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    with tempfile.TemporaryDirectory() as tmp:
        if rank == 0:
            trainer.save(Path(tmp) / FINAL)
            (Path(tmp) / FINAL / "ppo_log.jsonl").write_text(
                "".join(json.dumps({"step": i, **h}) + "\n" for i, h in enumerate(trainer.history, 1))
            )
        ray.train.report(
            metrics={
                "steps": len(trainer.history),
                "ray_workers": world,
                "replica_spread": (high - low).item(),
            },
            checkpoint=Checkpoint.from_directory(tmp) if rank == 0 else None,
        )


def run_ppo_on_ray(
    config: PPORunConfig, reward_fn: RewardFn
) -> tuple[list[dict[str, float]], dict[str, Any]]:
    """Data-parallel PPO on `config.distributed.num_workers` workers: (per-step statistics, run metrics).

    `rollout_batch_size` and `mini_batch_size` stay global: each worker takes 1/N of both. Output_dir
    gets what a local run saves (policy adapter, tokenizer, value head) and `ppo_log.jsonl`; the
    reward function is pickled to every worker.
    """
    world = config.distributed.num_workers
    for field in ("rollout_batch_size", "mini_batch_size"):
        if getattr(config.ppo, field) % world:
            raise ConfigError(
                f"ppo.{field}={getattr(config.ppo, field)} must be a multiple of "
                f"distributed.num_workers={world} (each worker takes an equal share)"
            )
    metrics = fit_on_ray(config, ppo_worker, {"reward_fn": reward_fn})
    log_path = config.output_dir / "ppo_log.jsonl"
    return [json.loads(line) for line in log_path.read_text().splitlines()], metrics
