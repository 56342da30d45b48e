"""Kahneman-Tversky Optimization on unpaired thumbs-up / thumbs-down feedback, with TRL's KTOTrainer.

Production feedback is mostly one response and a verdict, not a ranked pair. KTO learns from exactly
that: rows `{"prompt": [messages], "completion": [assistant message], "label": true|false}`.
Preference pairs are accepted too (each pair becomes a desirable and an undesirable row).

config = load_config(KTORunConfig, "configs/kto.yaml")
metrics = train_kto(config)   # adapter + tokenizer + model card in config.output_dir
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Literal

from datasets import Dataset
from pydantic import Field, model_validator
from trl import KTOConfig, KTOTrainer

from alignment.config import StrictModel
from alignment.data_files import DataError, read_rows
from alignment.launch import run_training
from alignment.lora_precision import apply_mixed_precision
from alignment.messages import Message
from alignment.policy import load_run_policy, load_run_tokenizer
from alignment.runner import PolicyRunConfig, callbacks, device_plan, training_arguments

log = logging.getLogger(__name__)

EXAMPLE_DATA = Path(__file__).parent / "data" / "preferences_house_style.jsonl"


class KTODataSettings(StrictModel):
    train: Path = Field(
        EXAMPLE_DATA,
        description="JSONL / datasets dir of prompt+completion+label rows (or preference pairs).",
    )
    eval: Path | None = Field(
        None, description="Held-out rows; when unset, eval_fraction of train is held out."
    )
    eval_fraction: float = Field(0.1, ge=0, lt=1)
    max_length: int = Field(
        512, gt=8, description="Tokens of prompt + completion; longer rows are truncated."
    )


class KTOSettings(StrictModel):
    beta: float = Field(0.1, gt=0, description="Strength of the KL tie to the reference.")
    loss_type: Literal["kto", "apo_zero_unpaired"] = "kto"
    desirable_weight: float | Literal["auto"] = Field(
        "auto",
        description="Weight of thumbs-up rows; 'auto' balances them against thumbs-down "
        "(the KTO paper keeps desirable_weight * n_up / (undesirable_weight * n_down) in [1, 4/3]).",
    )
    undesirable_weight: float = Field(1.0, gt=0)


class KTORunConfig(PolicyRunConfig):
    output_dir: Path = Path("runs/kto")
    data: KTODataSettings = Field(default_factory=KTODataSettings)
    kto: KTOSettings = Field(default_factory=KTOSettings)

    @model_validator(mode="after")
    def _kl_needs_batches(self) -> KTORunConfig:
        # KTO estimates its KL term by pairing each prompt with another row's completion in the batch.
        if self.kto.loss_type == "kto" and self.training.batch_size < 2:
            raise ValueError(
                "training.batch_size must be >= 2 for loss_type 'kto' (its KL estimate pairs rows)"
            )
        return self


# --- data -------------------------------------------------------------------------------------------


def _messages(value: Any, role: str, where: str, field: str) -> list[Message]:
    if isinstance(value, str):
        value = [{"role": role, "content": value}]
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: field {field!r} must be a non-empty string or list of messages")
    for message in value:
        if not (isinstance(message, dict) and isinstance(message.get("content"), str) and "role" in message):
            raise DataError(f"{where}: field {field!r} has a message without 'role' and string 'content'")
    if not "".join(m["content"] for m in value).strip():
        raise DataError(f"{where}: field {field!r} is empty")
    return value


def _label(value: Any, where: str) -> bool:
    # Only real booleans (or 0/1): "false" as a string would silently count as thumbs-up.
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise DataError(f"{where}: field 'label' must be true or false, got {value!r}")


def to_unpaired(row: dict[str, Any], where: str) -> list[dict[str, Any]]:
    """One feedback row -> one KTO row; a preference pair -> a thumbs-up and a thumbs-down row."""
    if "prompt" not in row:
        raise DataError(f"{where}: missing field 'prompt'")
    prompt = _messages(row["prompt"], "user", where, "prompt")
    if "completion" in row:
        if "label" not in row:
            raise DataError(f"{where}: missing field 'label' (true = thumbs-up, false = thumbs-down)")
        completion = _messages(row["completion"], "assistant", where, "completion")
        return [{"prompt": prompt, "completion": completion, "label": _label(row["label"], where)}]
    if "chosen" in row and "rejected" in row:
        return [
            {
                "prompt": prompt,
                "completion": _messages(row["chosen"], "assistant", where, "chosen"),
                "label": True,
            },
            {
                "prompt": prompt,
                "completion": _messages(row["rejected"], "assistant", where, "rejected"),
                "label": False,
            },
        ]
    raise DataError(f"{where}: expected 'completion' + 'label' (or a 'chosen'/'rejected' pair)")


def load_feedback(path: Path) -> list[dict[str, Any]]:
    rows = [out for where, row in read_rows(path) for out in to_unpaired(row, where)]
    if not rows:
        raise DataError(f"{path}: no rows")
    return rows


def build_datasets(config: KTORunConfig) -> tuple[Dataset, Dataset | None, dict[str, int]]:
    data = config.data
    # KTO's KL estimate pairs each row with its batch neighbours in order (sequential sampling),
    # so the rows are shuffled once here, deterministically.
    train = Dataset.from_list(load_feedback(data.train)).shuffle(seed=config.training.seed)
    eval_ds = Dataset.from_list(load_feedback(data.eval)) if data.eval else None
    if eval_ds is None and data.eval_fraction > 0 and len(train) >= 10:
        split = train.train_test_split(test_size=data.eval_fraction, seed=config.training.seed)
        train, eval_ds = split["train"], split["test"]
    n_up = sum(train["label"])
    stats = {"train_rows": len(train), "desirable": n_up, "undesirable": len(train) - n_up}
    if n_up == 0 or n_up == len(train):
        raise DataError(f"{data.train}: KTO needs both thumbs-up and thumbs-down rows, got {stats}")
    stats["eval_rows"] = len(eval_ds) if eval_ds is not None else 0
    return train, eval_ds, stats


def loss_weights(settings: KTOSettings, n_up: int, n_down: int) -> tuple[float, float]:
    if settings.desirable_weight != "auto":
        return float(settings.desirable_weight), settings.undesirable_weight
    # lambda_D * n_D == lambda_U * n_U: each class contributes equally, the low end of the paper's range
    return settings.undesirable_weight * n_down / n_up, settings.undesirable_weight


# --- trainer ----------------------------------------------------------------------------------------


def build_kto_trainer(config: KTORunConfig) -> KTOTrainer:
    tokenizer = load_run_tokenizer(config)
    train, eval_ds, stats = build_datasets(config)
    log.info("KTO data: %s", stats)
    model, peft_config = load_run_policy(config)
    has_eval = eval_ds is not None and len(eval_ds) > 0
    desirable, undesirable = loss_weights(config.kto, stats["desirable"], stats["undesirable"])
    args = training_arguments(
        KTOConfig,
        config,
        has_eval,
        beta=config.kto.beta,
        loss_type=config.kto.loss_type,
        desirable_weight=desirable,
        undesirable_weight=undesirable,
        max_length=config.data.max_length,
    )
    trainer = KTOTrainer(
        model=model,
        args=args,
        train_dataset=train,
        eval_dataset=eval_ds if has_eval else None,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=callbacks(config, has_eval),
    )
    apply_mixed_precision(trainer, device_plan(config).dtype, config.training.mixed_precision)
    return trainer


def train_kto(config: KTORunConfig) -> dict[str, Any]:
    return run_training(
        config, "kto", build_kto_trainer, [p for p in (config.data.train, config.data.eval) if p]
    )
