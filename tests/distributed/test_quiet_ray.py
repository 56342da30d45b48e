"""Ray Train workers install alignment/quiet.py's filters as their process setup hook, like the CLI."""

from __future__ import annotations

import json
import os
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from ray import cloudpickle
from transformers import Trainer

from alignment.config import load_config
from alignment.distributed import run_on_ray
from alignment.sft import SFTRunConfig, build_sft_trainer
from tests.distributed.conftest import sft_rows

pytestmark = [pytest.mark.ray, pytest.mark.usefixtures("ray_cluster")]
cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import tests


def reporting_filters(report: Path) -> Callable[[Any], Trainer]:
    def build(config: Any) -> Trainer:
        from alignment import quiet

        filters = [f[1].pattern for f in warnings.filters if f[0] == "ignore" and f[1] is not None]
        report.write_text(
            json.dumps(
                {
                    "pid": os.getpid(),
                    "installed": quiet._installed,
                    "filters": filters,
                    "datasets_bars": os.environ.get("HF_DATASETS_DISABLE_PROGRESS_BARS"),
                }
            )
        )
        return build_sft_trainer(config)

    return build


def test_ray_workers_get_the_library_noise_filters(tiny_model: Path, tmp_path: Path) -> None:
    config = load_config(
        SFTRunConfig,
        None,
        [
            f"model={tiny_model}",
            f"output_dir={tmp_path / 'run'}",
            f"data.train={sft_rows(tmp_path, 8)}",
            "data.eval_fraction=0",
            "data.max_length=64",
            "training.max_steps=1",
            "training.batch_size=2",
            "tracking.report_to=none",
            "distributed.backend=ray",
        ],
    )
    report = tmp_path / "worker.json"
    run_on_ray(config, reporting_filters(report))
    seen = json.loads(report.read_text())
    assert seen["pid"] != os.getpid()  # it ran in a worker
    assert seen["installed"] is True
    assert r"`is_gradient_checkpointing` is deprecated" in seen["filters"]
    assert seen["datasets_bars"] == "1"
