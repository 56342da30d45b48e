"""Direct Preference Optimization of a LoRA adapter with TRL's DPOTrainer.

config = load_config(DPORunConfig, "configs/dpo.yaml", ["dpo.beta=0.2"])
metrics = train_dpo(config)   # adapter + tokenizer + model card in config.output_dir

The policy is the SFT adapter (`init_adapter`) made trainable; the reference is a frozen copy of it
loaded as a second adapter ("ref") on the same base weights, or, without an SFT adapter, the base
model with adapters disabled. There is never a second full model in memory.

`PrefloopDPOTrainer` changes what a DPO step costs, not what it computes (a profile of TRL's step
on CPU showed under a third of the time in matmuls):
- reference log-probs are computed once, before training, and cached on disk
  (`alignment.reference_cache`): a step is one forward and one backward instead of two forwards and a
  backward, and a re-run with the same model, adapter and data skips them entirely;
- a pair's prompt runs once: [prompt | chosen] and [prompt | rejected] share it in one row, and the
  prefix all prompts of a batch share (a chat template's system prompt) runs once per row
  (`share_prompts`, `alignment.shared_prompt`, `share_prompt=batch`, the default); attending per
  sequence, every token gets exactly its own sequence's context and the same bf16 numbers in any
  batch (tests/alignment/test_dpo_reference_smollm2.py), so the cached reference stays exact;
- the LM head scores only completion tokens: the (tokens x vocab) logits of the prompt and the padding
  are never built (TRL's fused head scores every position on devices without Triton);
- LoRA weights in bf16 with fp32 optimizer copies (`training.mixed_precision`, `alignment.lora_precision`):
  no autocast casts, and no fp32 copies of LoRA inputs;
- weights are held in bf16 (the device plan), attention is eager on CPU (its backward is plain
  matmuls) and gradient checkpointing is off (`training` settings), so no fp32 weight is re-cast and
  no forward is recomputed.
The loss itself is TRL's `_compute_loss`, untouched, so every TRL loss type works. The hooks into TRL's
internals (reference precompute, fused LM head contract) live in `alignment.trl_compat`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from datasets import Dataset
from pydantic import Field
from rich.progress import Progress
from torch.utils.data import DataLoader
from transformers import PreTrainedModel
from trl import DPOConfig

from alignment.config import StrictModel
from alignment.launch import run_training
from alignment.lm_head import completion_log_probs
from alignment.lora_addmm import use_addmm_lora
from alignment.lora_precision import MixedPrecision, apply_mixed_precision
from alignment.models import resolve_model
from alignment.policy import load_run_policy, load_run_tokenizer
from alignment.preference_data import PreferenceDataSettings, prepare_preferences
from alignment.reference_cache import ReferenceCache, attach, cache_key
from alignment.runner import (
    PolicyRunConfig,
    callbacks,
    training_arguments,
)
from alignment.shared_prompt import (
    mask_for_attention,
    pack_pairs,
    use_segment_attention,
    uses_segment_attention,
)
from alignment.trl_compat import CachedReferenceDPOTrainer, FusedCausalLMOutput, patch_fused_lm_head

log = logging.getLogger(__name__)

LossType = Literal[
    "sigmoid",
    "hinge",
    "ipo",
    "exo_pair",
    "nca_pair",
    "robust",
    "bco_pair",
    "sppo_hard",
    "aot",
    "aot_unpaired",
    "apo_zero",
    "apo_down",
    "discopop",
    "sft",
    "sigmoid_norm",
]


class DPOSettings(StrictModel):
    beta: float = Field(0.1, gt=0, description="Strength of the KL tie to the reference (tau for IPO).")
    loss_type: list[LossType] = Field(
        default_factory=lambda: ["sigmoid"],
        description="TRL loss types; several are summed with loss_weights (e.g. MPO: [sigmoid, bco_pair, sft]).",
    )
    loss_weights: list[float] | None = Field(
        None, description="One weight per loss type (default: 1.0 each)."
    )
    label_smoothing: float = Field(
        0.0, ge=0, lt=0.5, description="Probability a label is flipped (robust) / epsilon (exo_pair)."
    )
    precompute_ref_log_probs: bool = Field(
        True, description="Compute reference log-probs once before training and cache them on disk."
    )
    reference_cache_dir: Path | None = Field(
        None,
        description="Where cached reference log-probs live (default: $PREFLOOP_HOME/cache/reference-logps).",
    )
    share_prompt: Literal["pair", "batch", "off"] = Field(
        "batch",
        description="Run the prefix all prompts of a batch share once per row and each pair's prompt once "
        "for both responses (batch: fewest tokens), only the pair's prompt (pair: a row per pair), or "
        "neither (off). Per-sequence attention gives the same bf16 numbers in every mode and batch. "
        "See alignment.shared_prompt.",
    )
    precompute_batch_size: int = Field(
        16, ge=1, description="Pairs per reference forward while precomputing."
    )


class DPORunConfig(PolicyRunConfig):
    output_dir: Path = Path("runs/dpo")
    data: PreferenceDataSettings = Field(default_factory=PreferenceDataSettings)
    dpo: DPOSettings = Field(default_factory=DPOSettings)


# --- prompt shared by the two responses of a pair, completion-only LM head (`alignment.lm_head`) -----------


@dataclass
class SharedPromptBatch:
    """Packed pairs (`alignment.shared_prompt`) and where each scored token goes."""

    input_ids: torch.Tensor  # (rows, T)
    position_ids: torch.Tensor  # (rows, T)
    attention_mask: torch.Tensor  # (rows, 1, T, T) bool, True = may attend
    segments: torch.Tensor  # (B, 6) each pair's place, for per-sequence attention (`alignment.shared_prompt`)
    predictor: torch.Tensor  # (N,) flat index into (rows*T) of the hidden state predicting each scored token
    targets: torch.Tensor  # (N,) the scored tokens
    rows: torch.Tensor  # (N,) their row in TRL's (2B, L - 1) layout: chosen rows, then rejected rows
    cols: torch.Tensor  # (N,) their column there (the position of the predicting token)


def share_prompts(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor, across_pairs: bool = False
) -> SharedPromptBatch | None:
    """TRL's [chosen rows; rejected rows] batch -> packed rows, shared prompt tokens run once (`pack_pairs`).

    None when the rows do not pair up (odd count, or a pair whose prompts differ).
    """
    n_rows = input_ids.shape[0]
    if n_rows % 2:
        return None
    pairs = n_rows // 2
    lengths = attention_mask.sum(1).tolist()
    starts = (labels != -100).int().argmax(1).tolist()  # first completion token of each row
    prompts, chosen, rejected = [], [], []
    for i in range(pairs):
        p, j = starts[i], pairs + i
        if p == 0 or starts[j] != p or not torch.equal(input_ids[i, :p], input_ids[j, :p]):
            return None
        prompts.append(input_ids[i, :p])
        chosen.append(input_ids[i, p : lengths[i]])
        rejected.append(input_ids[j, p : lengths[j]])
    packed = pack_pairs(prompts, chosen, rejected, across_pairs=across_pairs)
    predictor, targets, rows, cols = [], [], [], []
    for b, place in enumerate(packed.places):
        # TRL's layout: completion token t (t >= p) of row b sits at column t - 1 of the log-prob rows.
        p = place.prefix + place.prompt
        predictor += [packed.predictor_index(place, "chosen"), packed.predictor_index(place, "rejected")]
        targets += [chosen[b], rejected[b]]
        rows += [torch.full((place.chosen,), b), torch.full((place.rejected,), pairs + b)]
        cols += [torch.arange(p - 1, p - 1 + place.chosen), torch.arange(p - 1, p - 1 + place.rejected)]
    return SharedPromptBatch(
        input_ids=packed.input_ids,
        position_ids=packed.position_ids,
        attention_mask=packed.attention_mask,
        segments=packed.segments,
        predictor=torch.cat(predictor),
        targets=torch.cat(targets),
        rows=torch.cat(rows).to(input_ids.device),
        cols=torch.cat(cols).to(input_ids.device),
    )


def add_completion_lm_head(model: PreTrainedModel, share_prompt: str = "batch") -> None:
    """Make `model(..., labels=labels, fused_lm_head=True)` score only the positions whose label is not -100.

    Same contract as TRL's `add_fused_lm_head` (it returns a `FusedCausalLMOutput` with per-token fields of
    shape (batch, seq_len - 1), zero where unscored), so TRL's `_compute_loss` reads it unchanged. With
    `share_prompt`, a [chosen; rejected] batch runs as packed rows (see `share_prompts`).
    """

    def forward(
        self: PreTrainedModel,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor,
        **kwargs: Any,
    ) -> FusedCausalLMOutput:
        scored = labels[:, 1:] != -100
        shared = (
            share_prompts(input_ids, attention_mask, labels, across_pairs=share_prompt == "batch")
            if share_prompt != "off"
            else None
        )
        if shared is not None:
            # Per-sequence attention: no (rows, heads, T, T) scores of a whole packed row.
            attend = (
                {"pair_segments": shared.segments}
                if uses_segment_attention(self)
                else {
                    "attention_mask": mask_for_attention(
                        shared.attention_mask, self, self.get_input_embeddings().weight.dtype
                    )
                }
            )
            hidden = self.base_model(
                input_ids=shared.input_ids,
                position_ids=shared.position_ids,
                use_cache=False,
                **attend,
                **kwargs,
            ).last_hidden_state
            hidden = hidden.reshape(-1, hidden.shape[-1])[shared.predictor]
            targets, rows, cols = shared.targets, shared.rows, shared.cols
        else:
            hidden = self.base_model(
                input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **kwargs
            ).last_hidden_state[:, :-1][scored]
            targets = labels[:, 1:][scored]
            rows, cols = scored.nonzero(as_tuple=True)
        log_probs, entropy, mean_logits, is_top1 = completion_log_probs(
            hidden, self.get_output_embeddings().weight, targets
        )

        def place(values: torch.Tensor) -> torch.Tensor:
            # index_put keeps the autograd graph: gradients flow back to the scored positions only
            return values.new_zeros(scored.shape).index_put((rows, cols), values)

        log_probs = place(log_probs)
        return FusedCausalLMOutput(
            loss=-log_probs.sum() / scored.sum().clamp(min=1),
            log_probs=log_probs,
            entropy=place(entropy),
            mean_logits=place(mean_logits),
            is_top1=place(is_top1),
            label_mask=scored,
        )

    if share_prompt != "off":
        use_segment_attention(model)  # packed rows attend per sequence; unpacked calls get SDPA
    patch_fused_lm_head(model, forward)


# --- trainer ----------------------------------------------------------------------------------------


class PrefloopDPOTrainer(CachedReferenceDPOTrainer):
    """TRL's DPOTrainer with disk-cached reference log-probs and a completion-only LM head."""

    def __init__(
        self,
        *args: Any,
        reference_cache: ReferenceCache | None = None,
        reference_identity: tuple[str, str | None] = ("", None),
        share_prompt: str = "batch",
        mixed_precision: MixedPrecision | None = None,
        **kwargs: Any,
    ) -> None:
        # TRL's own precompute hashes every weight and caches in a temp dir; ours runs below, after init.
        super().__init__(*args, **kwargs)
        self.reference_cache = reference_cache or ReferenceCache()
        self.reference_identity = reference_identity
        self.share_prompt = share_prompt
        add_completion_lm_head(
            self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model,
            share_prompt=share_prompt,
        )
        use_addmm_lora(self.model)  # scale + add of each LoRA inside its B matmul (`alignment.lora_addmm`)
        if mixed_precision is not None:  # before the reference forwards below
            apply_mixed_precision(self, self.model.get_input_embeddings().weight.dtype, mixed_precision)
        self.precompute_reference_datasets()

    def _reference_settings(self) -> dict[str, Any]:
        """Everything besides weights and token ids that changes the reference numbers."""
        model = self.accelerator.unwrap_model(self.model)
        return {
            "reference": "ref-adapter" if "ref" in getattr(model, "peft_config", {}) else "base",
            "dtype": str(model.dtype),
            "max_length": self.args.max_length,
            "truncation_mode": self.args.truncation_mode,
            "ld_alpha": self.args.ld_alpha,
            "share_prompt": self.share_prompt,
        }

    def precompute_reference(self, dataset: Dataset, name: str, batch_size: int) -> Dataset:
        model_id, adapter = self.reference_identity
        key = cache_key(model_id, adapter, dataset, self._reference_settings())
        if (cached := self.reference_cache.load(key, len(dataset))) is not None:
            log.info("reference log-probs for %s: cache hit %s", name, self.reference_cache.path(key))
            return attach(dataset, cached)
        loader = DataLoader(dataset, batch_size=batch_size, collate_fn=self.data_collator, shuffle=False)
        model = self.reference_model()
        was_training = model.training
        model.eval()
        chosen, rejected = [], []
        with Progress(transient=True) as progress:
            task = progress.add_task(f"reference log-probs ({name})", total=len(loader))
            for batch in loader:
                ref_chosen, ref_rejected = self.reference_log_probs(model, batch)
                chosen.append(ref_chosen.float().cpu())
                rejected.append(ref_rejected.float().cpu())
                progress.advance(task)
        model.train(was_training)
        tensors = {"ref_chosen_logps": torch.cat(chosen), "ref_rejected_logps": torch.cat(rejected)}
        log.info("reference log-probs for %s cached at %s", name, self.reference_cache.save(key, tensors))
        return attach(dataset, tensors)


def build_dpo_trainer(config: DPORunConfig) -> PrefloopDPOTrainer:
    base = resolve_model(config.base_model())
    tokenizer = load_run_tokenizer(config)
    train, eval_ds, report = prepare_preferences(config.data, tokenizer)
    log.info("DPO data: %s", {k: v for k, v in report.items() if not isinstance(v, dict | list)})
    # Given a PEFT model and no peft_config, TRL loads a frozen copy of the adapter as "ref".
    model, peft_config = load_run_policy(config)
    has_eval = eval_ds is not None and len(eval_ds) > 0
    dpo = config.dpo
    args = training_arguments(
        DPOConfig,
        config,
        has_eval,
        beta=dpo.beta,
        loss_type=list(dpo.loss_type),
        loss_weights=dpo.loss_weights,
        label_smoothing=dpo.label_smoothing,
        max_length=config.data.max_length,
        precompute_ref_log_probs=dpo.precompute_ref_log_probs,
        precompute_ref_batch_size=dpo.precompute_batch_size,
    )
    trainer = PrefloopDPOTrainer(
        model=model,
        args=args,
        train_dataset=train,
        eval_dataset=eval_ds if has_eval else None,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=callbacks(config, has_eval),
        reference_cache=ReferenceCache(dpo.reference_cache_dir),
        reference_identity=(base, str(config.init_adapter) if config.init_adapter else None),
        share_prompt=dpo.share_prompt,
        mixed_precision=config.training.mixed_precision,
    )
    return trainer


def train_dpo(config: DPORunConfig) -> dict[str, Any]:
    return run_training(
        config, "dpo", build_dpo_trainer, [p for p in (config.data.train, config.data.eval) if p]
    )
