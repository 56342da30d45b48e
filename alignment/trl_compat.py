"""The one place that relies on TRL's (and HF Trainer's) private internals, so a TRL upgrade touches one file.

prefloop's trainers change what a step costs, not what TRL computes, and a few of those changes need
hooks TRL does not offer publicly. Each is named here, with the TRL contract it depends on (checked
against trl 1.16.0 / transformers 5.23):

- `CachedReferenceDPOTrainer`: TRL's `DPOTrainer` runs its own reference precompute inside
  `__init__` (hashing every weight, caching in a temp dir) when `args.precompute_ref_log_probs` is
  set, and later calls `self._precompute_ref_logps(dataset, name, batch_size)` for datasets given to
  `evaluate()`. The flag is hidden from `__init__`, `precompute_ref_logps` (the attribute
  `_compute_loss` reads to take reference log-probs from the batch) is set afterwards, and the
  private method is routed to the subclass's `precompute_reference`.
- `patch_fused_lm_head`: `DPOTrainer` calls `model(..., labels=labels, fused_lm_head=True)` and reads a
  `FusedCausalLMOutput` (per-token fields of shape (batch, seq_len - 1), zero where unscored), the
  contract of `trl.trainer.utils.add_fused_lm_head`, whose place we take.
- `ExtraColumnsRewardTrainer`: `RewardTrainer._prepare_dataset` tokenizes the pairs, and HF's column
  pruning keeps only `_signature_columns` (TRL sets them to chosen_ids, rejected_ids, margin); extra
  columns a collator or sampler needs are added after the first and kept through the second.
  `RewardTrainer.compute_loss` reads `outputs.logits` as (2B, 1), the chosen half then the rejected half.
- `common_prefix_length` from `trl.data_utils` (not exported at the top level).
"""

from __future__ import annotations

import types
from collections.abc import Callable
from typing import Any

import torch
from datasets import Dataset
from transformers import PreTrainedModel
from trl import DPOConfig, DPOTrainer, RewardTrainer
from trl.data_utils import common_prefix_length
from trl.trainer.utils import FusedCausalLMOutput

__all__ = [
    "CachedReferenceDPOTrainer",
    "ExtraColumnsRewardTrainer",
    "FusedCausalLMOutput",
    "common_prefix_length",
    "patch_fused_lm_head",
]

# Arguments TRL or HF pass to a causal LM's forward that a fused head does not take.
UNUSED_FORWARD_KWARGS = (
    "use_cache",
    "output_attentions",
    "output_hidden_states",
    "return_dict",
    "inputs_embeds",
)


class CachedReferenceDPOTrainer(DPOTrainer):
    """`DPOTrainer` whose reference precompute is the subclass's `precompute_reference`, run when it says.

    A subclass finishes its own set-up, then calls `precompute_reference_datasets()`.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        dpo_args: DPOConfig = kwargs["args"]
        self.wants_reference_precompute = dpo_args.precompute_ref_log_probs
        dpo_args.precompute_ref_log_probs = False
        try:
            super().__init__(*args, **kwargs)
        finally:
            dpo_args.precompute_ref_log_probs = self.wants_reference_precompute

    def precompute_reference(self, dataset: Dataset, name: str, batch_size: int) -> Dataset:
        """`dataset` with `ref_chosen_logps` / `ref_rejected_logps` columns added."""
        raise NotImplementedError

    def precompute_reference_datasets(self) -> None:
        if not self.wants_reference_precompute:
            return
        self.precompute_ref_logps = True  # `_compute_loss` now reads the reference from the batch
        args = self.args
        self.train_dataset = self.precompute_reference(
            self.train_dataset, "train", args.precompute_ref_batch_size or args.per_device_train_batch_size
        )
        if isinstance(self.eval_dataset, Dataset):
            self.eval_dataset = self.precompute_reference(
                self.eval_dataset, "eval", args.precompute_ref_batch_size or args.per_device_eval_batch_size
            )

    def _precompute_ref_logps(self, dataset: Dataset, name: str, batch_size: int) -> Dataset:
        return self.precompute_reference(dataset, name, batch_size)

    def reference_model(self) -> torch.nn.Module:
        """The model reference log-probs come from (with a PEFT policy: the policy, adapter handled by TRL)."""
        return self.ref_model or self.model

    def reference_log_probs(self, model: torch.nn.Module, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed reference log-probs of the chosen and rejected responses of one collated batch."""
        return self.compute_ref_log_probs(model, self._prepare_inputs(batch))


def patch_fused_lm_head(model: PreTrainedModel, fused_forward: Callable[..., FusedCausalLMOutput]) -> None:
    """Make `model(..., labels=labels, fused_lm_head=True)` return `fused_forward(model, input_ids,
    attention_mask, labels, **kwargs)`; every other call runs the original forward (generation included).

    Patched on the model itself, so calls still go through PEFT and DDP wrappers.
    """
    original_forward = type(model).forward.__get__(model)

    def forward(
        self: PreTrainedModel,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        fused_lm_head: bool = False,
        **kwargs: Any,
    ) -> Any:
        if not fused_lm_head:
            return original_forward(
                input_ids=input_ids, attention_mask=attention_mask, labels=labels, **kwargs
            )
        for unused in UNUSED_FORWARD_KWARGS:
            kwargs.pop(unused, None)
        return fused_forward(self, input_ids, attention_mask, labels, **kwargs)

    model.forward = types.MethodType(forward, model)


class ExtraColumnsRewardTrainer(RewardTrainer):
    """`RewardTrainer` whose prepared datasets get `add_columns` and keep `extra_columns` for the collator."""

    extra_columns: tuple[str, ...] = ()

    def add_columns(self, dataset: Dataset, name: str) -> Dataset:
        return dataset

    def _prepare_dataset(self, dataset: Any, processing_class: Any, args: Any, dataset_name: str) -> Any:
        dataset = super()._prepare_dataset(dataset, processing_class, args, dataset_name)
        return self.add_columns(dataset, dataset_name) if isinstance(dataset, Dataset) else dataset

    def _set_signature_columns_if_needed(self) -> None:
        if self._signature_columns is None:
            self._signature_columns = ["chosen_ids", "rejected_ids", "margin", *self.extra_columns]
