"""Reward model: a scalar head on a causal LM, trained on preference pairs with TRL's RewardTrainer.

    config = load_config(RewardRunConfig, "configs/reward.yaml")
    metrics = train_reward(config)   # adapter (LoRA + score head) + eval report/plot in output_dir

Loss (Bradley-Terry, Ouyang et al. 2022; margin from Llama 2, Touvron et al. 2023):
    loss = -log sigmoid(r_chosen - r_rejected - margin),  margin = agreement_margin * annotator_agreement

What makes it fast on a CPU with AMX, all within TRL's RewardTrainer: bf16 base weights (TRL's
default loads fp32 and autocasts, copying every weight to bf16 on every forward), no gradient
checkpointing (the small models this runs fit; TRL's default recomputes every activation), and
length-grouped batches so chosen/rejected sequences of similar length share a padded batch.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from pydantic import Field
from transformers import AutoModelForSequenceClassification
from trl import RewardConfig, RewardTrainer

from alignment.config import StrictModel
from alignment.models import load_causal_lm, load_tokenizer
from alignment.preference_data import PreferenceDataSettings, prepare_preferences
from alignment.runner import (
    RunConfig,
    callbacks,
    data_fingerprint,
    device_plan,
    lora_config,
    run_training,
    training_arguments,
    write_model_card,
)
from reward.metrics import reward_metrics, write_reward_metrics
from reward.scorer import RewardScorer

log = logging.getLogger(__name__)


class RewardSettings(StrictModel):
    agreement_margin: float = Field(
        0.0, ge=0, description="margin = agreement_margin * annotator_agreement in the loss; 0 = no margin."
    )
    center_rewards_coefficient: float | None = Field(
        None, ge=0, description="Pull rewards towards zero mean (Eisenstein et al. 2023); e.g. 0.01."
    )
    group_by_length: bool = Field(True, description="Batch pairs of similar length together: less padding.")
    eval_batch_size: int = Field(32, ge=1, description="Batch size of the post-training evaluation scorer.")


class RewardRunConfig(RunConfig):
    output_dir: Path = Path("runs/reward")
    data: PreferenceDataSettings = Field(default_factory=PreferenceDataSettings)
    reward: RewardSettings = Field(default_factory=RewardSettings)


class PrefloopRewardTrainer(RewardTrainer):
    """TRL's RewardTrainer plus a `length` column, so HF's length-grouped sampler can batch similar pairs."""

    def _prepare_dataset(self, dataset: Any, processing_class: Any, args: Any, dataset_name: str) -> Any:
        dataset = super()._prepare_dataset(dataset, processing_class, args, dataset_name)
        if isinstance(dataset, Dataset) and "length" not in dataset.column_names:
            dataset = dataset.map(
                lambda ex: {"length": max(len(ex["chosen_ids"]), len(ex["rejected_ids"]))},
                desc=f"Measuring {dataset_name} lengths",
            )
        return dataset

    def _set_signature_columns_if_needed(self) -> None:
        if self._signature_columns is None:
            self._signature_columns = ["chosen_ids", "rejected_ids", "margin", "length"]


def with_margin(dataset: Dataset, scale: float) -> Dataset:
    """Pairs annotators agreed on more must be separated by more; rows without agreement get no margin."""
    return dataset.map(lambda ex: {"margin": scale * (ex["annotator_agreement"] or 0.0)})


def fp32_trainable_params(model: torch.nn.Module) -> None:
    """Master copies of the few trainable weights (LoRA, score head) in fp32: AdamW updates of bf16 weights
    round away. Autocast still runs their matmuls in bf16, and the frozen bf16 base is never copied."""
    for param in model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()


def reward_model(config: RewardRunConfig) -> torch.nn.Module:
    return load_causal_lm(
        config.model,
        device_plan(config),
        quantization=config.lora.quantization,
        model_cls=AutoModelForSequenceClassification,
        num_labels=1,
    )


def build_reward_trainer(config: RewardRunConfig) -> PrefloopRewardTrainer:
    tokenizer = load_tokenizer(config.model)
    train, eval_ds, report = prepare_preferences(config.data, tokenizer)
    log.info("reward data: %s", {k: v for k, v in report.items() if k != "removed_ids"})
    if config.reward.agreement_margin > 0:
        train = with_margin(train, config.reward.agreement_margin)
        eval_ds = with_margin(eval_ds, config.reward.agreement_margin) if eval_ds is not None else None
    has_eval = eval_ds is not None
    args = training_arguments(
        RewardConfig,
        config,
        has_eval,
        max_length=config.data.max_length,
        center_rewards_coefficient=config.reward.center_rewards_coefficient,
        train_sampling_strategy="group_by_length" if config.reward.group_by_length else "random",
        length_column_name="length",
    )
    peft_config = lora_config(config.lora, task_type="SEQ_CLS")
    peft_config.modules_to_save = ["score"]  # the randomly initialised head must be trained and saved
    trainer = PrefloopRewardTrainer(
        model=reward_model(config),
        args=args,
        train_dataset=train,
        eval_dataset=eval_ds,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=callbacks(config, has_eval),
    )
    fp32_trainable_params(trainer.model)
    trainer.prefloop_data_report = report  # type: ignore[attr-defined]
    return trainer


def evaluate_pairs(scorer: RewardScorer, dataset: Dataset) -> dict[str, Any]:
    """Score each held-out pair's two sides and compute accuracy, margin, length bias and calibration."""
    prompts = list(dataset["prompt"])
    chosen = [msgs[-1]["content"] for msgs in dataset["chosen"]]
    rejected = [msgs[-1]["content"] for msgs in dataset["rejected"]]
    ids = scorer.tokenize(prompts + prompts, chosen + rejected)
    rewards = scorer.score_ids(ids)
    n = len(prompts)
    lengths = [
        len(scorer.tokenizer(text, add_special_tokens=False)["input_ids"]) for text in chosen + rejected
    ]
    return reward_metrics(rewards[:n], rewards[n:], lengths[:n], lengths[n:])


def train_reward(config: RewardRunConfig) -> dict[str, Any]:
    """Train, save the adapter, then evaluate it on the held-out pairs (JSON + PNG in output_dir)."""
    data_paths = [p for p in (config.data.train, config.data.eval) if p]
    metrics = run_training(config, "reward", build_reward_trainer, data_paths)
    tokenizer = load_tokenizer(config.model)
    _, eval_ds, _ = prepare_preferences(config.data, tokenizer)
    if eval_ds is not None:
        scorer = RewardScorer.from_pretrained(
            config.output_dir, device_plan(config), batch_size=config.reward.eval_batch_size
        )
        report = evaluate_pairs(scorer, eval_ds)
        json_path, png_path = write_reward_metrics(report, config.output_dir)
        log.info("reward eval: %s, %s", json_path, png_path)
        metrics.update({f"heldout_{k}": v for k, v in report.items() if isinstance(v, int | float)})
        # The held-out numbers belong in the run's metrics file and model card too.
        (config.output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, default=str))
        write_model_card(config.output_dir, "reward", config, data_fingerprint(data_paths), metrics)
    return metrics
