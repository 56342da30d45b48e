"""What every training stage shares: the run config shape, TrainingArguments, LoRA, tracking, outputs.

A stage (SFT, DPO, KTO, reward, ...) defines a `RunConfig` subclass and a `build_trainer(config)`
that returns a ready HF `Trainer`; `alignment.launch.run_training` then trains it, here or on Ray
workers (`alignment.distributed`), and writes the run's outputs with the helpers below (adapter,
tokenizer, model card, resolved config, metrics) the same way for every stage. Both of those import
this module and it imports neither, so there is no cycle between the launcher and the Ray glue.
"""

from __future__ import annotations

import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from pydantic import Field
from transformers import EarlyStoppingCallback, PrinterCallback, Trainer, TrainingArguments

from alignment.config import (
    DistributedSettings,
    LoraSettings,
    StrictModel,
    TrackingSettings,
)
from alignment.devices import AttentionName, DevicePlan, DTypeName, plan_device
from alignment.fingerprints import expand_dirs, sha256_files
from alignment.lora_precision import MixedPrecision
from alignment.models import DEFAULT_MODEL, adapter_base_model
from alignment.progress import RichProgress


class TrainingSettings(StrictModel):
    """Optimisation settings shared by every trainer (mapped onto HF TrainingArguments)."""

    epochs: float = Field(1.0, gt=0)
    max_steps: int = Field(-1, description="Overrides epochs when > 0.")
    learning_rate: float = Field(2e-4, gt=0)
    batch_size: int = Field(4, ge=1, description="Per-device train batch size.")
    eval_batch_size: int = Field(8, ge=1)
    gradient_accumulation_steps: int = Field(1, ge=1)
    warmup: float = Field(0.0, ge=0, description="Warmup steps, or a fraction of all steps when < 1.")
    weight_decay: float = Field(0.0, ge=0)
    lr_scheduler: str = "cosine"
    optim: str = Field(
        "adamw_torch_fused", description="Any HF optimizer name (HF's default here), e.g. 'paged_adamw_8bit'."
    )
    max_grad_norm: float = 1.0
    logging_steps: int = Field(5, ge=1)
    eval_steps: int | None = Field(
        None, description="Also evaluate every N steps during training (default: once, after training)."
    )
    save_steps: int | None = Field(None, description="Checkpoint every N steps (default: once per epoch).")
    save_total_limit: int = 2
    early_stopping_patience: int | None = Field(
        None, description="Evaluations without improvement before stopping."
    )
    gradient_checkpointing: bool = False
    mixed_precision: MixedPrecision = Field(
        "master",
        description="bf16 plans: trainable weights bf16 with fp32 optimizer copies (master), fp32 under "
        "autocast, or bf16 throughout (pure). See alignment.lora_precision.",
    )
    dtype: DTypeName = Field("auto", description="auto = bf16 where the hardware has it, else fp16/fp32.")
    attention: AttentionName = Field(
        "auto", description="auto = eager on CPU (a faster backward on chat-length sequences), sdpa on GPU."
    )
    seed: int = 42


class RunConfig(StrictModel):
    """Fields every stage's config has."""

    model: str = Field(DEFAULT_MODEL, description="Embedded model name, local path or Hugging Face id.")
    trust_remote_code: bool = Field(
        False, description="Run model code shipped with a hub model (off: only transformers' own code)."
    )
    output_dir: Path = Path("runs/default")
    lora: LoraSettings = Field(default_factory=LoraSettings)
    training: TrainingSettings = Field(default_factory=TrainingSettings)
    distributed: DistributedSettings = Field(default_factory=DistributedSettings)
    tracking: TrackingSettings = Field(default_factory=TrackingSettings)
    resume: bool = Field(False, description="Resume from the latest checkpoint in output_dir.")


class PolicyRunConfig(RunConfig):
    """A run that trains a policy from an SFT adapter (DPO, KTO, PPO, GRPO, RLOO)."""

    init_adapter: Path | None = Field(
        None,
        description="SFT adapter directory, trained further as the policy; DPO, KTO and PPO (by default) "
        "take its frozen copy as the reference. Unset: a fresh LoRA (the `lora` block) on `model`, with "
        "the base model as reference.",
    )

    def base_model(self) -> str:
        """The base under the SFT adapter, unless `model` was named explicitly."""
        if self.init_adapter is not None and "model" not in self.model_fields_set:
            return adapter_base_model(self.init_adapter)
        return self.model


def device_plan(config: RunConfig) -> DevicePlan:
    return plan_device(config.training.dtype, attention=config.training.attention)


def lora_config(settings: LoraSettings, task_type: str = "CAUSAL_LM") -> Any:
    from peft import LoraConfig

    return LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=settings.target_modules,
        task_type=task_type,
    )


def setup_tracking(tracking: TrackingSettings, output_dir: Path) -> list[str]:
    """Configure wandb through its env vars (offline by default, files under the run dir)."""
    if tracking.report_to == "none":
        return []
    if tracking.report_to == "wandb":
        os.environ.setdefault("WANDB_MODE", tracking.wandb_mode)
        os.environ.setdefault("WANDB_PROJECT", tracking.project)
        os.environ["WANDB_DIR"] = str(output_dir)
        os.environ.setdefault("WANDB_SILENT", "true")
        os.environ.setdefault("WANDB_LOG_MODEL", "false")
    return [tracking.report_to]


A = TypeVar("A", bound=TrainingArguments)


def training_arguments(args_cls: type[A], config: RunConfig, has_eval: bool, **extra: Any) -> A:
    """Map the shared settings onto a TRL/HF arguments class; stage-specific fields come in `extra`."""
    t = config.training
    plan = device_plan(config)
    strategy = "steps" if t.eval_steps else "epoch"
    # Otherwise the held-out set is evaluated once, after training (`final_evaluation`): an
    # epoch-end evaluation of the same weights would double its cost for nothing.
    eval_during = has_eval and evaluates_during_training(config)
    return args_cls(
        output_dir=str(config.output_dir),
        num_train_epochs=t.epochs,
        max_steps=t.max_steps,
        learning_rate=t.learning_rate,
        per_device_train_batch_size=t.batch_size,
        per_device_eval_batch_size=t.eval_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        warmup_steps=t.warmup,
        weight_decay=t.weight_decay,
        lr_scheduler_type=t.lr_scheduler,
        optim=t.optim,
        max_grad_norm=t.max_grad_norm,
        logging_steps=t.logging_steps,
        eval_strategy=strategy if eval_during else "no",
        eval_steps=t.eval_steps,
        save_strategy="steps" if t.save_steps else "epoch",
        save_steps=t.save_steps or 500,
        save_total_limit=t.save_total_limit,
        # Early stopping needs the best checkpoint tracked on the eval loss.
        load_best_model_at_end=eval_during and t.early_stopping_patience is not None,
        metric_for_best_model="eval_loss" if eval_during else None,
        activation_checkpointing=t.gradient_checkpointing,
        seed=t.seed,
        report_to=setup_tracking(config.tracking, config.output_dir),
        run_name=config.tracking.run_name or config.output_dir.name,
        use_cpu=plan.device.type == "cpu",
        disable_tqdm=True,  # rich progress instead (see `callbacks`)
        **plan.trainer_precision(autocast_bf16=t.mixed_precision == "autocast"),
        **extra,
    )


def evaluates_during_training(config: RunConfig) -> bool:
    """Evaluation during training only where something reads it: early stopping, or asked for."""
    t = config.training
    return t.early_stopping_patience is not None or t.eval_steps is not None


def callbacks(config: RunConfig, has_eval: bool) -> list[Any]:
    found: list[Any] = [RichProgress()]
    if has_eval and (patience := config.training.early_stopping_patience):
        found.append(EarlyStoppingCallback(early_stopping_patience=patience))
    return found


def use_rich_progress(trainer: Trainer) -> Trainer:
    """With tqdm disabled HF adds a PrinterCallback that prints raw dicts; RichProgress replaces it."""
    trainer.remove_callback(PrinterCallback)
    return trainer


def data_fingerprint(paths: list[Path]) -> str:
    """sha256 over the input files (or every file of a dataset directory), for the model card."""
    return sha256_files(expand_dirs(paths))


def write_model_card(
    output_dir: Path, stage: str, config: RunConfig, data_hash: str, metrics: dict[str, Any]
) -> None:
    rows = "\n".join(
        f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in metrics.items()
    )
    card = f"""---
library_name: peft
base_model: {config.model}
tags: [prefloop, {stage}, lora]
---
# prefloop {stage} adapter

- base model: `{config.model}`
- stage: {stage}
- data sha256: `{data_hash}`
- created: {datetime.now(UTC).isoformat(timespec="seconds")}
- LoRA: r={config.lora.r}, alpha={config.lora.alpha}, dropout={config.lora.dropout},
  targets={config.lora.target_modules}, quantization={config.lora.quantization}

## Metrics

| metric | value |
|---|---|
{rows}

## Config

The full resolved config is in `prefloop-config.yaml`; re-run with `prefloop train {stage} --config prefloop-config.yaml`.
"""
    (output_dir / "README.md").write_text(card)


def final_evaluation(trainer: Trainer) -> dict[str, float]:
    """Eval metrics after training (none without an eval set), for either backend."""
    if trainer.eval_dataset is None:
        return {}
    return trainer.evaluate()


def save_final(trainer: Trainer, output_dir: Path) -> None:
    """The adapter and tokenizer at the top of the run dir, whatever the backend."""
    trainer.save_model(str(output_dir))
    if trainer.processing_class is not None:
        trainer.processing_class.save_pretrained(str(output_dir))
