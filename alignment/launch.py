"""Run a training stage where its config says: in this process, or on Ray workers; then write its outputs.

metrics = run_training(config, "dpo", build_dpo_trainer, [config.data.train])

Every HF-Trainer stage (SFT, DPO, KTO, reward, GRPO/RLOO) ends here. `config.distributed.backend`
decides who calls `build_trainer(config)`: this process, or each worker of
`alignment.distributed.run_on_ray`; either way output_dir ends up with the adapter, tokenizer,
metrics, resolved config and model card (`alignment.runner`).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from transformers import Trainer

from alignment.checkpoints import latest_checkpoint
from alignment.config import dump_config
from alignment.runner import (
    RunConfig,
    data_fingerprint,
    final_evaluation,
    save_final,
    use_rich_progress,
    write_model_card,
)

C = TypeVar("C", bound=RunConfig)


def finish_tracking() -> None:
    """End this stage's wandb run. HF's WandbCallback reuses a run left open, so the next stage in the
    same process (the quickstart's reward and DPO after SFT) would log into this one and clash on its
    config ("A ConfigError was raised whilst setting the number of model parameters"). The teardown
    drops wandb's settings singleton, which holds the first stage's WANDB_DIR."""
    wandb = sys.modules.get("wandb")  # imported only where tracking is on
    if wandb is not None and wandb.run is not None:
        wandb.finish()
        wandb.teardown()


def run_training(
    config: C,
    stage: str,
    build_trainer: Callable[[C], Trainer],
    data_paths: list[Path],
    extra_metrics: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Train locally (or via Ray when configured) and write the run's outputs; returns the metrics."""
    config.output_dir.mkdir(parents=True, exist_ok=True)
    dump_config(config, config.output_dir / "prefloop-config.yaml")
    if config.distributed.backend == "ray":
        from alignment.distributed import run_on_ray  # Ray is imported only by runs that use it

        metrics = run_on_ray(config, build_trainer)
    else:
        trainer = use_rich_progress(build_trainer(config))
        checkpoint = latest_checkpoint(config.output_dir) if config.resume else None
        resume = str(checkpoint) if checkpoint else None
        result = trainer.train(resume_from_checkpoint=resume)
        metrics = dict(result.metrics)
        metrics.update(final_evaluation(trainer))
        save_final(trainer, config.output_dir)
        finish_tracking()
    metrics.update(extra_metrics or {})
    (config.output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, default=str))
    write_model_card(config.output_dir, stage, config, data_fingerprint(data_paths), metrics)
    return metrics
