"""Run any prefloop trainer on Ray Train: the same `build_trainer(config)`, called inside each worker.

The driver connects to a Ray cluster (or starts a local one), checks that the workers can be placed,
and hands `TorchTrainer` a train function that builds the HF Trainer, wraps it with Ray's
`prepare_trainer`, and trains it under DDP (gloo on CPU, nccl on GPU). The HF Trainer shards the data
itself (a distributed sampler per rank). Checkpoints are reported to Ray storage, so a dead worker
restarts the group from the latest one (`FailureConfig(max_failures)`), and the final adapter comes
back as a last checkpoint that the driver unpacks into output_dir, exactly where a local run writes it.

`fit_on_ray(config, train_fn, extra)` is the stage-independent part: a stage that is not an HF
Trainer brings its own `train_fn` (PPO's is `alignment.rl.ray_worker.ppo_worker`).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import ray
import ray.train
import torch.distributed as dist
from ray._private.ray_constants import WORKER_PROCESS_SETUP_HOOK_ENV_VAR
from ray.train import (
    Checkpoint,
    CheckpointConfig,
    CheckpointConsistencyMode,
    FailureConfig,
    RunConfig,
    ScalingConfig,
)
from ray.train.huggingface.transformers import RayTrainReportCallback, prepare_trainer
from ray.train.torch import TorchConfig, TorchTrainer
from transformers import Trainer, set_seed

from alignment.checkpoints import latest_checkpoint
from alignment.config import ConfigError, DistributedSettings
from alignment.runner import RunConfig as PrefloopRunConfig
from alignment.runner import final_evaluation, save_final, use_rich_progress

C = TypeVar("C", bound=PrefloopRunConfig)

FINAL = "final"  # the adapter + tokenizer inside the last Ray checkpoint
HF_CHECKPOINT = RayTrainReportCallback.CHECKPOINT_NAME  # an HF Trainer checkpoint inside a Ray one
# Workers see the same model cache, offline switches and tracking setup as the driver.
PROPAGATED_ENV_PREFIXES = ("PREFLOOP_", "HF_", "TRANSFORMERS_", "WANDB_", "TOKENIZERS_")
# Credentials never travel in a worker's environment (PREFLOOP_ADMIN_KEY, PREFLOOP_API_KEYS,
# HF_TOKEN, WANDB_API_KEY...): a worker needs none of the serving keys, and hub/tracking logins
# are read from their own files. Matched on whole name parts, so TOKENIZERS_* still goes.
SECRET_ENV_PARTS = frozenset({"KEY", "KEYS", "TOKEN", "TOKENS", "PASSWORD", "SECRET", "SECRETS"})
# The driver's library-noise filters (alignment/quiet.py), run by each worker process at start, before
# it unpickles the train function (whose imports already log). A per-actor runtime_env's
# `worker_process_setup_hook` is a no-op in Ray (only ray.init's is exported, as this env var).
QUIET_WORKER_HOOK = {WORKER_PROCESS_SETUP_HOOK_ENV_VAR: "alignment.quiet.quiet_libraries"}


class ResourceError(ConfigError):
    """The `distributed:` block asks for more than the Ray cluster has."""


def connect(settings: DistributedSettings) -> None:
    """Join `address` (or $RAY_ADDRESS); without either, start a private local cluster."""
    if ray.is_initialized():
        return
    address = settings.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
    else:
        # "local" always starts a fresh cluster instead of attaching to a stray `ray start` one.
        ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False)


def wants_gpu(settings: DistributedSettings) -> bool:
    if settings.use_gpu == "auto":
        return ray.cluster_resources().get("GPU", 0) > 0
    return bool(settings.use_gpu)


def worker_resources(settings: DistributedSettings, use_gpu: bool) -> dict[str, float]:
    """What one worker reserves: 1 CPU (+1 GPU) unless resources_per_worker says otherwise."""
    per_worker = {"CPU": 1.0, **({"GPU": 1.0} if use_gpu else {})}
    per_worker.update(settings.resources_per_worker)
    return per_worker


def check_resources(num_workers: int, per_worker: dict[str, float]) -> None:
    """Fail now, with the numbers, rather than let the placement group wait forever for resources."""
    wanted = {k: v for k, v in per_worker.items() if v > 0}
    nodes = [node["Resources"] for node in ray.nodes() if node["Alive"]]
    # A worker lives on one node: count how many fit on each node, not in the cluster's sum.
    fits = (
        sum(min(int(node.get(k, 0) // v) for k, v in wanted.items()) for node in nodes)
        if wanted
        else num_workers
    )
    if fits < num_workers:
        total = {k: ray.cluster_resources().get(k, 0) for k in wanted}
        raise ResourceError(
            f"distributed: {num_workers} workers x {wanted} cannot be placed on this Ray cluster "
            f"(it has {total} over {len(nodes)} node(s); {fits} worker(s) fit). Lower "
            "distributed.num_workers or distributed.resources_per_worker, set distributed.use_gpu=false, "
            "or connect to a bigger cluster with distributed.address."
        )


def worker_env() -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k.startswith(PROPAGATED_ENV_PREFIXES) and not SECRET_ENV_PARTS & set(k.upper().split("_"))
    }
    # Ray Train's print patch re-logs output that libraries capture on purpose (datasets' dill
    # disassembles every map function into a captured stdout), flooding the driver's console.
    env.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    return env


def experiment_name(config: PrefloopRunConfig) -> str:
    return config.tracking.run_name or config.output_dir.name


def storage_path(config: PrefloopRunConfig) -> str:
    return config.distributed.storage_path or str(config.output_dir / "ray")


def forget_previous_run(storage: str, name: str) -> None:
    """Ray Train restores a run whose storage dir exists; without --resume a run starts fresh."""
    import pyarrow.fs

    fs, root = pyarrow.fs.FileSystem.from_uri(storage)
    path = f"{root.rstrip('/')}/{name}"
    if fs.get_file_info(path).type != pyarrow.fs.FileType.NotFound:
        fs.delete_dir(path)


class ReportCheckpointCallback(RayTrainReportCallback):
    """Ray's HF report callback, made safe for several workers sharing one output_dir.

    The HF Trainer has no barrier after saving, so every rank waits until all shards (model, optimizer,
    per-rank RNG states) are on disk; then rank 0 alone uploads the checkpoint of *this* step (not
    "the newest dir", which may be left over from an earlier run), and every rank reports metrics.
    """

    def on_save(self, args, state, control, **kwargs):
        if dist.is_available() and dist.is_initialized():
            dist.barrier()
        metrics: dict[str, Any] = {}
        for log in state.log_history:
            metrics.update(log)
        source = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if ray.train.get_context().get_world_rank() == 0 and source.is_dir():
            with tempfile.TemporaryDirectory() as tmp:
                shutil.copytree(source, Path(tmp) / HF_CHECKPOINT)
                ray.train.report(metrics=metrics, checkpoint=Checkpoint.from_directory(tmp))
        else:
            ray.train.report(metrics=metrics)
        # A report only counts once the controller has collected it from every rank; a worker dying
        # before that would silently lose this checkpoint, so no rank trains on until it is committed.
        ray.train.get_all_reported_checkpoints(consistency_mode=CheckpointConsistencyMode.COMMITTED)


def enter_driver_cwd(loop_config: dict[str, Any]) -> None:
    """Ray moves workers into its run dir; relative paths in the config mean the driver's cwd."""
    with contextlib.suppress(OSError):
        os.chdir(loop_config["cwd"])


def _step_of(checkpoint_dir: str) -> int:
    return json.loads((Path(checkpoint_dir) / "trainer_state.json").read_text())["global_step"]


def train_worker(loop_config: dict[str, Any]) -> None:
    """What each Ray worker runs: build the stage's Trainer, resume if there is a checkpoint, train."""
    config: PrefloopRunConfig = loop_config["config"]
    build_trainer: Callable[[Any], Trainer] = loop_config["build_trainer"]
    enter_driver_cwd(loop_config)
    context = ray.train.get_context()
    rank = context.get_world_rank()
    # Fresh heads (a reward model's score layer, LoRA A) are drawn before the HF Trainer seeds anything:
    # seed first, so 1 and N workers start from the same weights.
    set_seed(config.training.seed)
    # One worker per node builds first, filling the node's caches (dataset maps, DPO's precomputed
    # reference log-probs); the others then read them instead of racing to write the same files.
    first_on_node = context.get_local_rank() == 0
    if not first_on_node:
        dist.barrier()
    trainer = prepare_trainer(use_rich_progress(build_trainer(config)))
    if first_on_node:
        dist.barrier()
    trainer.add_callback(ReportCheckpointCallback())

    restored = ray.train.get_checkpoint()
    with restored.as_directory() if restored else contextlib.nullcontext(None) as restored_dir:
        resume = None
        if restored_dir and (Path(restored_dir) / HF_CHECKPOINT).is_dir():
            resume = str(Path(restored_dir) / HF_CHECKPOINT)  # a worker died or the run was stopped
        elif config.resume:
            found = latest_checkpoint(config.output_dir)  # e.g. a run started locally
            resume = str(found) if found else None
        result = trainer.train(resume_from_checkpoint=resume)

    metrics: dict[str, Any] = dict(result.metrics)
    metrics.update(global_step=result.global_step, ray_workers=ray.train.get_context().get_world_size())
    if resume:
        metrics["resumed_from_step"] = _step_of(resume)
    metrics.update(final_evaluation(trainer))
    with tempfile.TemporaryDirectory() as tmp:
        save_final(trainer, Path(tmp) / FINAL)  # every rank calls save_model (sharded setups need it)
        checkpoint = Checkpoint.from_directory(tmp) if rank == 0 else None
        ray.train.report(metrics=metrics, checkpoint=checkpoint)


def run_on_ray(config: C, build_trainer: Callable[[C], Trainer]) -> dict[str, Any]:
    """Train `build_trainer(config)` on `config.distributed.num_workers` Ray workers; returns the metrics.

    Afterwards output_dir holds the adapter and tokenizer (as after a local run) and `ray/` with
    Ray's checkpoints; `run_training` adds the model card, config and metrics.
    """
    return fit_on_ray(config, train_worker, {"build_trainer": build_trainer})


def fit_on_ray(
    config: PrefloopRunConfig, train_fn: Callable[[dict], None], extra: dict[str, Any]
) -> dict[str, Any]:
    """Run `train_fn` on the configured workers; unpack the final checkpoint into output_dir."""
    settings = config.distributed
    # Workers may run elsewhere and in another cwd: give them absolute paths.
    config = config.model_copy(update={"output_dir": config.output_dir.absolute()})
    connect(settings)
    use_gpu = wants_gpu(settings)
    per_worker = worker_resources(settings, use_gpu)
    check_resources(settings.num_workers, per_worker)

    storage, name = storage_path(config), experiment_name(config)
    if not config.resume:
        forget_previous_run(storage, name)
    trainer = TorchTrainer(
        train_fn,
        train_loop_config={"config": config, "cwd": os.getcwd(), **extra},
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=settings.num_workers, use_gpu=use_gpu, resources_per_worker=per_worker
        ),
        run_config=RunConfig(
            name=name,
            storage_path=storage,
            failure_config=FailureConfig(max_failures=settings.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=max(config.training.save_total_limit, 1) + 1),
            worker_runtime_env={"env_vars": {**worker_env(), **QUIET_WORKER_HOOK}},
        ),
    )
    result = trainer.fit()
    with result.checkpoint.as_directory() as checkpoint_dir:
        shutil.copytree(Path(checkpoint_dir) / FINAL, config.output_dir, dirs_exist_ok=True)
    return dict(result.metrics)
