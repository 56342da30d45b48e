"""Supervised fine-tuning of a LoRA/QLoRA adapter with TRL's SFTTrainer.

config = load_config(SFTRunConfig, "configs/sft.yaml", ["training.epochs=2"])
metrics = train_sft(config)   # adapter + tokenizer + model card in config.output_dir
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from datasets import Dataset
from pydantic import Field
from transformers import PreTrainedTokenizerBase
from trl import SFTConfig, SFTTrainer

from alignment.config import StrictModel
from alignment.data_files import DataError
from alignment.devices import plan_device
from alignment.launch import run_training
from alignment.lora_precision import apply_mixed_precision
from alignment.models import load_causal_lm, load_tokenizer, load_with_adapter
from alignment.runner import RunConfig, callbacks, device_plan, lora_config, training_arguments
from alignment.sft_curation import CurationSettings, Scorer, curate_for_training
from alignment.sft_data import load_conversations, to_prompt_completion

log = logging.getLogger(__name__)

EXAMPLE_DATA = Path(__file__).parent / "data" / "sft_house_style.jsonl"


class SFTDataSettings(StrictModel):
    train: Path = Field(EXAMPLE_DATA, description="JSONL (messages or Alpaca rows) or a datasets directory.")
    eval: Path | None = Field(
        None, description="Held-out file; when unset, eval_fraction of train is held out."
    )
    eval_fraction: float = Field(0.1, ge=0, lt=1)
    max_length: int = Field(512, gt=8, description="Tokens per example (prompt + response).")
    overlength: Literal["truncate", "drop"] = "truncate"
    packing: bool = Field(False, description="Pack several examples per sequence (BFD, padding-free).")


class SFTRunConfig(RunConfig):
    output_dir: Path = Path("runs/sft")
    data: SFTDataSettings = Field(default_factory=SFTDataSettings)
    merge: bool = Field(False, description="Also export base+adapter merged weights to output_dir/merged.")
    curate: CurationSettings | None = Field(
        None, description="Curate data.train first (alignment.sft_curation), then train on it."
    )


def _token_length(tokenizer: PreTrainedTokenizerBase, example: dict) -> int:
    return len(
        tokenizer.apply_chat_template(
            example["prompt"] + example["completion"], tokenize=True, return_dict=False
        )
    )


def build_datasets(
    config: SFTRunConfig, tokenizer: PreTrainedTokenizerBase
) -> tuple[Dataset, Dataset | None, dict[str, int]]:
    """Conversations -> prompt/completion datasets, with over-length rows truncated or dropped and counted."""
    data = config.data
    train = Dataset.from_list(to_prompt_completion(load_conversations(data.train)))
    eval_ds = Dataset.from_list(to_prompt_completion(load_conversations(data.eval))) if data.eval else None
    if eval_ds is None and data.eval_fraction > 0 and len(train) >= 10:
        split = train.train_test_split(test_size=data.eval_fraction, seed=config.training.seed)
        train, eval_ds = split["train"], split["test"]

    def with_length(ds: Dataset) -> Dataset:
        return ds.map(lambda ex: {"n_tokens": _token_length(tokenizer, ex)}, desc="measuring lengths")

    train = with_length(train)
    over = sum(n > data.max_length for n in train["n_tokens"])
    stats = {"train_examples": len(train), "overlength_examples": over}
    if over:
        log.warning(
            "%d of %d training examples exceed max_length=%d (%s)",
            over,
            len(train),
            data.max_length,
            data.overlength,
        )
    if data.overlength == "drop":
        train = train.filter(lambda ex: ex["n_tokens"] <= data.max_length)
        if eval_ds is not None:
            eval_ds = with_length(eval_ds).filter(lambda ex: ex["n_tokens"] <= data.max_length)
        stats["dropped_examples"] = over
    if len(train) == 0:
        raise DataError(f"{data.train}: no training examples left after dropping over-length rows")
    stats["eval_examples"] = len(eval_ds) if eval_ds is not None else 0
    return train.remove_columns("n_tokens"), eval_ds, stats


def build_sft_trainer(config: SFTRunConfig) -> SFTTrainer:
    tokenizer = load_tokenizer(config.model, trust_remote_code=config.trust_remote_code)
    train, eval_ds, stats = build_datasets(config, tokenizer)
    log.info("SFT data: %s", stats)
    model = load_causal_lm(
        config.model,
        device_plan(config),
        quantization=config.lora.quantization,
        trust_remote_code=config.trust_remote_code,
    )
    has_eval = eval_ds is not None and len(eval_ds) > 0
    args = training_arguments(
        SFTConfig,
        config,
        has_eval,
        max_length=config.data.max_length,
        packing=config.data.packing,
        completion_only_loss=True,  # loss on the assistant's tokens only
    )
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=train,
        eval_dataset=eval_ds if has_eval else None,
        processing_class=tokenizer,
        peft_config=lora_config(config.lora),
        callbacks=callbacks(config, has_eval),
    )
    apply_mixed_precision(trainer, device_plan(config).dtype, config.training.mixed_precision)
    return trainer


def train_sft(config: SFTRunConfig, scorers: Mapping[str, Scorer] | None = None) -> dict:
    """`scorers` (name -> (prompts, responses) -> scores) serve a `curate.score` block."""
    extra: dict[str, Any] = {}
    if config.curate is not None:
        curated, result = curate_for_training(config.curate, config.data.train, scorers)
        data = config.data.model_copy(update={"train": curated.train_file})
        config = config.model_copy(update={"data": data})
        extra = {"curated_version": str(curated.path), "curated_rows": curated.rows}
        extra["curated_rows_read"] = result.rows_read
    metrics = run_training(
        config, "sft", build_sft_trainer, [p for p in (config.data.train, config.data.eval) if p], extra
    )
    if config.merge:
        merge_adapter(config.output_dir, config.output_dir / "merged")
    return metrics


def merge_adapter(adapter_dir: Path, out_dir: Path) -> Path:
    """Fold the LoRA weights into the base model and save plain safetensors (for serving without PEFT)."""
    # dtype "auto": the base's own dtype, as AutoPeftModelForCausalLM used to load it
    model = load_with_adapter(None, adapter_dir, plan_device("fp32"), dtype="auto")
    merged = model.merge_and_unload()
    merged.save_pretrained(out_dir, safe_serialization=True)
    load_tokenizer(adapter_dir).save_pretrained(out_dir)
    return out_dir
