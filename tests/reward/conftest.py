"""Reward tests share one tiny synthetic task and run torch single-threaded (see `single_thread`)."""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from alignment.preference_data import write_preference_rows

WORDS = ["red", "blue", "green", "small", "big", "happy", "sad", "fast", "slow", "old", "new", "warm", "cold"]
MARKER = "ahoy"


@pytest.fixture(autouse=True, scope="package")
def single_thread() -> Iterator[None]:
    # On a shared 2-core machine, 2 OpenMP threads contending with other jobs run tiny models ~10x slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def marker_pairs(n: int, seed: int, shuffle_labels: bool = False) -> list[dict]:
    """Chosen responses end with the marker word, rejected ones never contain it; shuffle_labels swaps
    chosen and rejected at random, so there is nothing left to learn."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        chosen = " ".join(rng.sample(WORDS, 3)) + f" {MARKER}"
        rejected = " ".join(rng.sample(WORDS, 3))
        if shuffle_labels and rng.random() < 0.5:
            chosen, rejected = rejected, chosen
        rows.append({"prompt": f"Say {seed}-{i}", "chosen": chosen, "rejected": rejected})
    return rows


@pytest.fixture(scope="package")
def marker_data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("marker")
    files = {
        "train": marker_pairs(64, seed=1),
        "eval": marker_pairs(200, seed=2),
        "train_shuffled": marker_pairs(64, seed=1, shuffle_labels=True),
        "eval_shuffled": marker_pairs(200, seed=2, shuffle_labels=True),
    }
    paths = {}
    for name, rows in files.items():
        paths[name] = root / f"{name}.jsonl"
        write_preference_rows(paths[name], rows)
    return paths


def tiny_reward_overrides(tiny_model: Path, output_dir: Path, train: Path, eval_path: Path) -> list[str]:
    return [
        f"model={tiny_model}",
        f"output_dir={output_dir}",
        f"data.train={train}",
        f"data.eval={eval_path}",
        "data.near_dup_threshold=null",
        "tracking.report_to=none",
        "training.learning_rate=1e-3",
        "training.epochs=4",
        "training.batch_size=8",
        "training.save_steps=100000",
        "training.logging_steps=8",
    ]


@pytest.fixture(scope="package")
def trained(
    tiny_model: Path, marker_data: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> tuple:
    """(run dir, metrics, sequences scored in eval mode) of a tiny reward model trained on the marker task
    through `prefloop train reward`. The last counts every sequence the reward head scored outside
    training (any module call, whichever code path: TRL's evaluate, the scorer, ...)."""
    from typer.testing import CliRunner

    from serving.cli import app

    scored: list[int] = []

    def count(module: torch.nn.Module, args: object, output: object) -> None:
        # The reward head is the one Linear with a single output; (N, 1) packed or (B, T, 1) padded.
        if isinstance(module, torch.nn.Linear) and module.out_features == 1 and not module.training:
            scored.append(output.shape[0])  # type: ignore[attr-defined]

    out = tmp_path_factory.mktemp("reward-run")
    overrides = tiny_reward_overrides(tiny_model, out, marker_data["train"], marker_data["eval"])
    hook = torch.nn.modules.module.register_module_forward_hook(count)
    try:
        result = CliRunner().invoke(
            app, ["train", "reward", *(arg for o in overrides for arg in ("--set", o))]
        )
    finally:
        hook.remove()
    assert result.exit_code == 0, result.output
    assert "heldout_accuracy" in result.stdout
    return out, json.loads((out / "metrics.json").read_text()), sum(scored)
