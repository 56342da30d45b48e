"""Reward model: a scalar head on a causal LM, trained on preference pairs with TRL's RewardTrainer.

    config = load_config(RewardRunConfig, "configs/reward.yaml")
    metrics = train_reward(config)   # adapter (LoRA + score head) + eval report/plot in output_dir

Loss (Bradley-Terry, Ouyang et al. 2022; margin from Llama 2, Touvron et al. 2023):
    loss = -log sigmoid(r_chosen - r_rejected - margin),  margin = agreement_margin * annotator_agreement

What makes it fast, all within TRL's RewardTrainer:
- shared prompt prefix: chosen and rejected share their prompt (with a chat template's system
  prompt, often half the tokens), so each pair's common prefix is run once and its KV cache serves
  both responses; with causal attention this is exactly the full-sequence computation;
- bf16 base weights (TRL's default loads fp32 and autocasts, copying every weight on every forward);
- no gradient checkpointing (the small models this runs fit; TRL's default recomputes activations);
- on CPU, eager attention: for chat-length sequences PyTorch's CPU flash-attention backward costs
  several times its forward (a fifth of a step, profiled); eager attention's backward is plain matmuls;
- length-grouped batches, so pairs of similar length share a padded batch.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Literal

import torch
from datasets import Dataset
from pydantic import Field
from transformers import AutoModelForSequenceClassification
from trl import RewardConfig, RewardTrainer
from trl.data_utils import common_prefix_length

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
    shared_prefix: bool = Field(True, description="Run each pair's common prompt prefix once for both sides.")
    trainable_dtype: Literal["fp32", "bf16"] = Field(
        "fp32",
        description="LoRA + head weights: fp32 masters under bf16 autocast, or bf16 without autocast "
        "(no casts: ~15% faster on CPU, but updates below bf16 resolution round away late in the schedule).",
    )
    attention: Literal["auto", "sdpa", "eager"] = Field(
        "auto", description="auto = eager on CPU (faster backward for short sequences), sdpa on GPU."
    )
    eval_batch_size: int = Field(32, ge=1, description="Batch size of the post-training evaluation scorer.")


class RewardRunConfig(RunConfig):
    output_dir: Path = Path("runs/reward")
    data: PreferenceDataSettings = Field(default_factory=PreferenceDataSettings)
    reward: RewardSettings = Field(default_factory=RewardSettings)


@dataclass
class SharedPrefixCollator:
    """Pairs -> their common token prefix (once per pair) and the two suffixes (chosen then rejected).

    Both are right-padded: suffix tokens attend to the prefix cache through the attention mask and
    take explicit position ids, so padding inside the prefix never shifts a position.
    """

    pad_token_id: int

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        prefixes, suffixes = [], []
        for ex in examples:
            chosen, rejected = ex["chosen_ids"], ex["rejected_ids"]
            # Keep at least one token per side: the reward is read at the last one.
            n = min(common_prefix_length(chosen, rejected), len(chosen) - 1, len(rejected) - 1)
            prefixes.append(chosen[:n])
            suffixes.append((chosen[n:], rejected[n:]))
        ordered = [c for c, _ in suffixes] + [
            r for _, r in suffixes
        ]  # TRL's order: chosen half, rejected half
        prefix_ids, prefix_mask = self._pad(prefixes)
        input_ids, attention_mask = self._pad(ordered)
        batch = {
            "prefix_ids": prefix_ids,
            "prefix_attention_mask": prefix_mask,
            "input_ids": input_ids,
            "attention_mask": attention_mask,
        }
        if "margin" in examples[0]:
            batch["margin"] = torch.tensor([ex["margin"] for ex in examples], dtype=torch.float)
        return batch

    def _pad(self, seqs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(1, *map(len, seqs))
        ids = torch.full((len(seqs), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, seq in enumerate(seqs):
            ids[i, : len(seq)] = torch.tensor(seq, dtype=torch.long)
            mask[i, : len(seq)] = 1
        return ids, mask


def shared_prefix_forward(
    model: torch.nn.Module,
    prefix_ids: torch.Tensor,
    prefix_attention_mask: torch.Tensor,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    **kwargs: Any,
) -> Any:
    """Rewards of prefix + suffix sequences, with each prefix computed once for its two suffixes."""
    kwargs.pop("use_cache", None)
    kwargs.pop("margin", None)
    prefix_len = prefix_attention_mask.sum(-1)
    prefix_out = model(
        input_ids=prefix_ids,
        attention_mask=prefix_attention_mask,
        position_ids=torch.arange(prefix_ids.shape[1], device=prefix_ids.device).expand_as(prefix_ids),
        use_cache=True,
    )
    cache = prefix_out.past_key_values
    cache.batch_repeat_interleave(2)  # [p0, p0, p1, p1, ...]: one copy per side, gradients flow to both
    batch = prefix_ids.shape[0]
    # Suffixes come chosen-half then rejected-half; interleave them to match the cache rows.
    interleave = torch.arange(2 * batch, device=input_ids.device).view(2, batch).t().reshape(-1)
    suffix_ids, suffix_mask = input_ids[interleave], attention_mask[interleave]
    positions = prefix_len.repeat_interleave(2)[:, None] + torch.arange(
        suffix_ids.shape[1], device=input_ids.device
    )
    out = model(
        input_ids=suffix_ids,
        attention_mask=torch.cat([prefix_attention_mask.repeat_interleave(2, dim=0), suffix_mask], dim=1),
        position_ids=positions,
        past_key_values=cache,
        use_cache=False,
    )
    # Back to TRL's layout (chosen half, rejected half) for its loss and metrics.
    out.logits = out.logits.view(batch, 2, -1).transpose(0, 1).reshape(2 * batch, -1)
    out.past_key_values = None
    return out


class PrefloopRewardTrainer(RewardTrainer):
    """TRL's RewardTrainer plus a `length` column (for HF's length-grouped sampler) and the
    shared-prefix forward when the batch comes from `SharedPrefixCollator`."""

    def compute_loss(
        self, model: Any, inputs: dict[str, Any], return_outputs: bool = False, num_items_in_batch: Any = None
    ) -> Any:
        if "prefix_ids" in inputs:
            prefix = {
                "prefix_ids": inputs.pop("prefix_ids"),
                "prefix_attention_mask": inputs.pop("prefix_attention_mask"),
            }
            model = partial(shared_prefix_forward, model, **prefix)
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

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


def cast_trainable_params(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """fp32: master copies of the few trainable weights (LoRA, score head), so small AdamW updates are not
    rounded away; autocast still runs their matmuls in bf16 and the frozen bf16 base is never copied."""
    for param in model.parameters():
        if param.requires_grad and param.dtype != dtype:
            param.data = param.data.to(dtype)


def reward_model(config: RewardRunConfig) -> torch.nn.Module:
    plan = device_plan(config)
    attention = config.reward.attention
    if attention == "auto":
        attention = "eager" if plan.device.type == "cpu" else "sdpa"
    return load_causal_lm(
        config.model,
        plan,
        quantization=config.lora.quantization,
        model_cls=AutoModelForSequenceClassification,
        num_labels=1,
        attn_implementation=attention,
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
    pure_bf16 = config.reward.trainable_dtype == "bf16" and args.bf16
    if pure_bf16:
        # Every weight is bf16 already: autocast would only add casts. (mixed_precision is derived
        # from bf16 when the arguments are built, so both change.)
        args.bf16, args.mixed_precision = False, "no"
    collator = SharedPrefixCollator(tokenizer.pad_token_id) if config.reward.shared_prefix else None
    trainer = PrefloopRewardTrainer(
        model=reward_model(config),
        args=args,
        data_collator=collator,
        train_dataset=train,
        eval_dataset=eval_ds,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=callbacks(config, has_eval),
    )
    cast_trainable_params(trainer.model, torch.bfloat16 if pure_bf16 else torch.float32)
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
