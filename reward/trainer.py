"""Reward model: a scalar head on a causal LM, trained on preference pairs with TRL's RewardTrainer.

    config = load_config(RewardRunConfig, "configs/reward.yaml")
    metrics = train_reward(config)   # adapter (LoRA + score head) + eval report/plot in output_dir

Loss (Bradley-Terry, Ouyang et al. 2022; margin from Llama 2, Touvron et al. 2023):
    loss = -log sigmoid(r_chosen - r_rejected - margin),  margin = agreement_margin * annotator_agreement

What makes it fast, all within TRL's RewardTrainer:
- shared prompt tokens run once: chosen and rejected share their prompt, and the prompts of a batch
  share a prefix (a chat template's system prompt), so a batch's pairs are packed into one row,
  [batch prefix | prompt 1 | chosen 1 | rejected 1 | prompt 2 | ...], with no padding, and attend one
  sequence at a time, so every token gets the context of its own sequence
  (`alignment.shared_prompt.segment_attention`): exactly the full-sequence numbers for the distinct
  tokens' cost (on the bundled data ~54 tokens a pair instead of ~124), and attention costs what the
  sequences cost, not the square of the row;
- micro-batches under a token budget (`reward.micro_batch_tokens`, 1024): a long batch runs forward
  and backward in groups of its pairs, each loss weighted by its share of the pairs, so the gradient
  is the batch's while peak memory follows the budget (long pairs: peak RSS ~2 GB, below TRL's
  checkpointed 3.8 GB, with no recompute);
- bf16 base weights (TRL's default loads fp32 and autocasts, copying every weight on every forward),
  and bf16 LoRA/head weights with fp32 optimizer copies: no autocast at all (`alignment.lora_precision`);
- no gradient checkpointing (TRL's default recomputes activations; `training.gradient_checkpointing=true`
  still works, for budgets the micro-batches cannot reach);
- length-grouped batches (by packed width; from when rows were padded: with one unpadded row they
  no longer save tokens in training, `reward.group_by_length=false` gives random batches);
- one held-out evaluation, after training (`train_reward`); per-epoch evaluation only with early
  stopping or `training.eval_steps`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from pydantic import Field
from transformers import AutoModelForSequenceClassification, PreTrainedModel
from transformers.modeling_outputs import SequenceClassifierOutputWithPast
from trl import RewardConfig

from alignment.config import StrictModel
from alignment.launch import run_training
from alignment.lora_precision import apply_mixed_precision
from alignment.models import load_causal_lm, load_tokenizer
from alignment.preference_data import PreferenceDataSettings, prepare_preferences
from alignment.quiet import new_head_expected
from alignment.runner import (
    RunConfig,
    callbacks,
    data_fingerprint,
    device_plan,
    evaluates_during_training,
    lora_config,
    training_arguments,
    write_model_card,
)
from alignment.shared_prompt import pack_pairs, use_segment_attention
from alignment.trl_compat import ExtraColumnsRewardTrainer
from reward.metrics import reward_metrics, write_reward_metrics
from reward.scorer import RewardScorer, shared_length, split_pair

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
    eval_batch_size: int = Field(32, ge=1, description="Batch size of the post-training evaluation scorer.")
    # 1024: on the issue-14 long pairs (batch 8, ~2,000 packed tokens) peak RSS 3.1 -> 2.0 GB for the
    # same CPU time per step; short batches (the bundled set: ~450 tokens) never split.
    micro_batch_tokens: int | None = Field(
        1024,
        ge=1,
        description="Run a batch's packed pairs forward and backward in micro-batches of at most this many "
        "tokens, accumulating the same gradient: peak memory follows the budget, not the batch. null: the "
        "whole batch at once. Needs reward.shared_prefix.",
    )


class RewardRunConfig(RunConfig):
    output_dir: Path = Path("runs/reward")
    data: PreferenceDataSettings = Field(default_factory=PreferenceDataSettings)
    reward: RewardSettings = Field(default_factory=RewardSettings)


@dataclass
class PackedPairCollator:
    """Pairs -> packed rows (`alignment.shared_prompt.pack_pairs`): shared prompt tokens once, then each side.

    The whole batch goes into one row (no padding). `attention_mask` stays a (rows, T) mask of real
    tokens, which TRL counts for its token metric; the model attends per sequence along
    `pair_segments` and scores the rows at `score_index`. With `micro_batch_tokens`, a batch whose
    packed pairs exceed that many tokens also carries `micro_batches`: consecutive groups of its pairs,
    each packed on its own within the budget (a pair longer than it goes alone), which
    `PrefloopRewardTrainer.training_step` runs forward and backward one at a time.
    """

    pad_token_id: int
    micro_batch_tokens: int | None = None

    def pack(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        parts = [split_pair(ex["chosen_ids"], ex["rejected_ids"]) for ex in examples]
        # One row for the batch: with per-sequence attention a wider row costs nothing extra, while
        # rows of ~256 tokens (`shared_prompt.ROW_TOKENS`) were padded to the longest pair, 40-45% of a
        # long-pair batch's tokens (every matmul ran over them; measured on the issue-14 long set).
        packed = pack_pairs(
            *(list(p) for p in zip(*parts, strict=True)), pad_id=self.pad_token_id, row_tokens=None
        )
        batch = {
            "input_ids": packed.input_ids,
            "position_ids": packed.position_ids,
            "attention_mask": packed.token_mask,
            "pair_segments": packed.segments,
            "score_index": packed.last_token_index(),
        }
        if "margin" in examples[0]:
            batch["margin"] = torch.tensor([ex["margin"] for ex in examples], dtype=torch.float)
        if self.micro_batch_tokens is not None:
            # Forwards capped by the budget: keep the attention scores for the backward rather than
            # recompute them (measured 5% of a long-pair step; peak RSS 1.95 -> 2.44 GB there).
            batch["keep_attention_scores"] = True
        return batch

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.pack(examples)
        if self.micro_batch_tokens is not None:
            groups = micro_batch_groups([packed_length(ex) for ex in examples], self.micro_batch_tokens)
            if len(groups) > 1:
                batch["micro_batches"] = [self.pack([examples[i] for i in group]) for group in groups]
        return batch


def micro_batch_groups(sizes: list[int], budget: int) -> list[list[int]]:
    """Consecutive groups of pair indices whose packed sizes sum to at most `budget` (a bigger pair alone)."""
    groups: list[list[int]] = [[]]
    used = 0
    for i, size in enumerate(sizes):
        if groups[-1] and used + size > budget:
            groups.append([])
            used = 0
        groups[-1].append(i)
        used += size
    return groups


def packed_length(example: dict[str, Any]) -> int:
    """Width of the pair's packed row: what length-grouped batching should group on."""
    chosen, rejected = example["chosen_ids"], example["rejected_ids"]
    return len(chosen) + len(rejected) - shared_length(chosen, rejected)


def add_packed_pair_scoring(model: PreTrainedModel) -> None:
    """Let a sequence-classification model score packed pairs: `model(..., pair_segments=, score_index=)`.

    Returns the scores at `score_index` as `logits` (2B, 1), chosen half then rejected half, which is
    the layout TRL's `RewardTrainer.compute_loss` reads. Patched on the model itself, so the call
    still goes through PEFT and, under Ray, DDP's forward (its gradient hooks need that).
    """
    original_forward = type(model).forward.__get__(model)
    transformer = model.base_model

    def forward(
        self: PreTrainedModel,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        pair_segments: torch.Tensor | None = None,
        score_index: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> Any:
        kwargs.pop("margin", None)
        if pair_segments is None:
            return original_forward(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        for unused in ("use_cache", "labels", "output_attentions", "output_hidden_states", "return_dict"):
            kwargs.pop(unused, None)
        # No mask: the segment attention (`alignment.shared_prompt`) attends per sequence.
        hidden = transformer(
            input_ids=input_ids, pair_segments=pair_segments, use_cache=False, **kwargs
        ).last_hidden_state
        scores = self.score(hidden.reshape(-1, hidden.shape[-1])[score_index])
        return SequenceClassifierOutputWithPast(logits=scores)

    model.forward = types.MethodType(forward, model)


class PrefloopRewardTrainer(ExtraColumnsRewardTrainer):
    """TRL's RewardTrainer plus a `length` column (for HF's length-grouped sampler), the packed pair
    inputs of `PackedPairCollator`, and micro-batches under a token budget.

    A batch with `micro_batches` runs forward and backward once per micro-batch, each loss weighted by
    its share of the batch's pairs: the Bradley-Terry loss and the centring term are means over pairs,
    so the accumulated gradient is the whole batch's (up to float summation order) while only one
    micro-batch's activations are alive at a time. Under DDP only the last backward all-reduces.
    """

    extra_columns = ("length",)
    loss_weight = 1.0
    micro_batch_forwards = 0  # micro-batches run by `training_step` (read by the tests)

    def add_columns(self, dataset: Dataset, name: str) -> Dataset:
        if "length" in dataset.column_names:
            return dataset
        return dataset.map(lambda ex: {"length": packed_length(ex)}, desc=f"Measuring {name} lengths")

    def training_step(
        self, model: torch.nn.Module, inputs: dict[str, Any], num_items_in_batch: Any = None
    ) -> torch.Tensor:
        micro_batches = inputs.pop("micro_batches", None)
        if not micro_batches:
            return super().training_step(model, inputs, num_items_in_batch)
        pairs = len(inputs["score_index"]) // 2
        total = torch.zeros(())
        try:
            for i, micro in enumerate(micro_batches):
                self.loss_weight = (len(micro["score_index"]) // 2) / pairs
                last = i == len(micro_batches) - 1
                with contextlib.nullcontext() if last else self.accelerator.no_sync(model):
                    loss = super().training_step(model, micro, num_items_in_batch)
                total = total.to(loss.device) + loss
                self.micro_batch_forwards += 1
        finally:
            self.loss_weight = 1.0
        return total

    def compute_loss(
        self,
        model: torch.nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ) -> Any:
        inputs.pop("micro_batches", None)  # evaluation runs the whole batch: no activations are kept
        result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if self.loss_weight == 1.0:
            return result
        return (result[0] * self.loss_weight, result[1]) if return_outputs else result * self.loss_weight


def with_margin(dataset: Dataset, scale: float) -> Dataset:
    """Pairs annotators agreed on more must be separated by more; rows without agreement get no margin."""
    return dataset.map(lambda ex: {"margin": scale * (ex["annotator_agreement"] or 0.0)})


def reward_model(config: RewardRunConfig) -> torch.nn.Module:
    plan = device_plan(config)
    with new_head_expected():  # the scalar head is created here: its MISSING report is expected
        model = load_causal_lm(
            config.model,
            plan,
            quantization=config.lora.quantization,
            model_cls=AutoModelForSequenceClassification,
            num_labels=1,
        )
    use_segment_attention(model)
    add_packed_pair_scoring(model)
    return model


def build_reward_trainer(config: RewardRunConfig) -> PrefloopRewardTrainer:
    tokenizer = load_tokenizer(config.model)
    train, eval_ds, report = prepare_preferences(config.data, tokenizer)
    log.info("reward data: %s", {k: v for k, v in report.items() if k != "removed_ids"})
    if config.reward.agreement_margin > 0:
        train = with_margin(train, config.reward.agreement_margin)
        eval_ds = with_margin(eval_ds, config.reward.agreement_margin) if eval_ds is not None else None
    # The held-out pairs are otherwise scored once, after training (`train_reward`).
    if not evaluates_during_training(config):
        eval_ds = None
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
    collator = (
        PackedPairCollator(tokenizer.pad_token_id, config.reward.micro_batch_tokens)
        if config.reward.shared_prefix
        else None
    )
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
    apply_mixed_precision(trainer, device_plan(config).dtype, config.training.mixed_precision)
    return trainer


def evaluate_pairs(scorer: RewardScorer, dataset: Dataset) -> dict[str, Any]:
    """Score each held-out pair (one packed row a pair: the prompt runs once) and compute accuracy,
    margin, length bias and calibration."""
    prompts = list(dataset["prompt"])
    chosen = [msgs[-1]["content"] for msgs in dataset["chosen"]]
    rejected = [msgs[-1]["content"] for msgs in dataset["rejected"]]
    chosen_rewards, rejected_rewards = scorer.score_pairs(prompts, chosen, rejected)
    lengths = [len(ids) for ids in scorer.tokenizer(chosen + rejected, add_special_tokens=False)["input_ids"]]
    n = len(prompts)
    return reward_metrics(chosen_rewards, rejected_rewards, lengths[:n], lengths[n:])


def train_reward(config: RewardRunConfig) -> dict[str, Any]:
    """Train, save the adapter, then evaluate it once on the held-out pairs; those numbers go into
    metrics.json, the model card and the eval report (JSON + PNG in output_dir)."""
    data_paths = [p for p in (config.data.train, config.data.eval) if p]
    tokenizer = load_tokenizer(config.model)
    _, eval_ds, _ = prepare_preferences(config.data, tokenizer)
    metrics = run_training(config, "reward", build_reward_trainer, data_paths)
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
