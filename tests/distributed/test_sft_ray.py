"""SFT on a local Ray cluster: sharding, 1-vs-2-worker agreement, worker death, --resume, resource errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import ray.train
import torch
from safetensors.torch import load_file
from transformers import set_seed

from alignment.config import load_config
from alignment.distributed import ResourceError, run_on_ray
from alignment.sft import SFTRunConfig, build_sft_trainer, train_sft
from tests.distributed.conftest import assert_adapters_agree, crashing, sft_rows

pytestmark = [pytest.mark.ray, pytest.mark.usefixtures("ray_cluster")]


def ray_sft_config(tiny_model: Path, tmp_path: Path, name: str, *overrides: str) -> SFTRunConfig:
    return load_config(
        SFTRunConfig,
        None,
        [
            f"model={tiny_model}",
            f"output_dir={tmp_path / name}",
            f"data.train={sft_rows(tmp_path, 16)}",
            "data.eval_fraction=0",
            "data.max_length=64",
            "lora.dropout=0",  # no randomness that differs between one and two processes
            "training.dtype=fp32",
            "training.learning_rate=5e-3",
            "training.logging_steps=1",
            "tracking.report_to=none",
            "distributed.backend=ray",
            *overrides,
        ],
    )


def adapter_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "adapter_model.safetensors")


def test_two_workers_shard_the_data_and_match_one_worker_on_the_same_global_batch(
    tiny_model: Path, tmp_path: Path
) -> None:
    # One epoch over 16 rows with a global batch of 4: 4 optimizer steps either way. Without
    # sharding, each of the two workers would walk all 16 rows and take 8 steps. The one-worker
    # baseline runs locally (no Ray): the same numbers prove Ray changed nothing but who computes.
    one = ray_sft_config(tiny_model, tmp_path, "one", "distributed.backend=local", "training.batch_size=4")
    two = ray_sft_config(
        tiny_model,
        tmp_path,
        "two",
        "distributed.num_workers=2",
        "training.batch_size=2",
        "tracking.report_to=wandb",  # offline (conftest): files only
    )
    set_seed(one.training.seed)  # what each Ray worker does before building its trainer (LoRA init)
    m1, m2 = train_sft(one), train_sft(two)

    assert m2["global_step"] == 4
    assert m2["ray_workers"] == 2
    assert m2["train_loss"] == pytest.approx(m1["train_loss"], rel=1e-3)
    w1, w2 = adapter_weights(one.output_dir), adapter_weights(two.output_dir)
    assert w1.keys() == w2.keys()
    for key in w1:
        # Adam divides by sqrt(v): tiny gradient differences from another reduction order move near-zero
        # weights by a visible fraction, so compare each tensor as a whole.
        drift = (w2[key] - w1[key]).norm() / w1[key].norm().clamp_min(1e-8)
        assert drift < 1e-3, (key, drift.item())

    # The run dir looks like a local run's: adapter, tokenizer, card, config, metrics.
    for name in (
        "adapter_config.json",
        "tokenizer.json",
        "README.md",
        "prefloop-config.yaml",
        "metrics.json",
    ):
        assert (two.output_dir / name).is_file(), name
    assert json.loads((two.output_dir / "metrics.json").read_text())["global_step"] == 4
    # One wandb run for the whole job: rank 0 logs, rank 1 does not.
    assert len(list((two.output_dir / "wandb").glob("offline-run-*"))) == 1

    assert_adapters_agree(one.output_dir, two.output_dir)


def test_a_worker_killed_mid_run_restarts_from_the_latest_checkpoint(
    tiny_model: Path, tmp_path: Path
) -> None:
    marker = tmp_path / "crashed"
    cfg = ray_sft_config(
        tiny_model,
        tmp_path,
        "fault",
        "distributed.num_workers=2",
        "distributed.max_failures=1",
        "training.batch_size=2",
        "training.max_steps=4",
        "training.save_steps=2",
    )
    metrics = run_on_ray(cfg, crashing(build_sft_trainer, step=3, marker=marker))

    assert marker.exists(), "the fault was never injected"
    assert metrics["resumed_from_step"] == 2
    assert metrics["global_step"] == 4
    assert (cfg.output_dir / "adapter_model.safetensors").is_file()


def test_resume_continues_a_stopped_run(tiny_model: Path, tmp_path: Path) -> None:
    marker = tmp_path / "crashed"
    overrides = [
        "training.batch_size=2",
        "training.max_steps=4",
        "training.save_steps=2",
    ]
    cfg = ray_sft_config(tiny_model, tmp_path, "stopped", *overrides, "distributed.num_workers=1")
    with pytest.raises(ray.train.TrainingFailedError):  # max_failures=0: the run stops at step 3
        run_on_ray(cfg, crashing(build_sft_trainer, step=3, marker=marker))
    assert not (cfg.output_dir / "adapter_model.safetensors").exists()

    resumed = cfg.model_copy(update={"resume": True})
    metrics = run_on_ray(resumed, build_sft_trainer)
    assert metrics["resumed_from_step"] == 2
    assert metrics["global_step"] == 4


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["distributed.num_workers=4", "distributed.use_gpu=true"], "4 workers x {'CPU': 1.0, 'GPU': 1.0}"),
        (["distributed.num_workers=3"], "3 workers x {'CPU': 1.0}"),
        (["distributed.resources_per_worker={CPU: 2}", "distributed.num_workers=2"], "1 worker(s) fit"),
    ],
)
def test_unsatisfiable_resources_fail_fast_with_the_numbers(
    tiny_model: Path, tmp_path: Path, overrides: list[str], message: str
) -> None:
    cfg = ray_sft_config(tiny_model, tmp_path, "too-big", *overrides)
    with pytest.raises(ResourceError, match="cannot be placed") as info:
        run_on_ray(cfg, build_sft_trainer)
    assert message in str(info.value)
