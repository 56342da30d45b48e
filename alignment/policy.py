"""The policy every preference and RL stage starts from, loaded one way (DPO, KTO, PPO, GRPO, push).

model, peft_config = load_run_policy(config)          # a trainer's policy, from its run config
tokenizer = load_run_tokenizer(config)
model, _ = load_policy("smollm2-135m-instruct", adapter="runs/sft")   # a frozen policy to sample

The policy is the base model with `lora.quantization` applied (also under an init adapter: the
model card records the quantization, so the weights must have it), plus either
- the init (SFT) adapter as a PEFT adapter, trainable for training and frozen for sampling; or
- a fresh LoRA: returned as a `LoraConfig` for a TRL trainer to add (TRL's convention: a PEFT
  model with `peft_config=None` means "train this adapter, its frozen copy is the reference"), or
  added here (`wrap_lora=True`) for trainers of our own such as PPO.

The tokenizer rule: the adapter's own tokenizer when its run saved one, else the base model's.
An adapter is trained with the tokenizer its run saved (`run_training` saves it beside the
adapter), and that run may have changed it: a chat template or pad token added to a base that
had none (`load_tokenizer` adds ChatML and pad = eos), or a template edited by hand. Prompts must
be tokenized the way the adapter learnt them, so the adapter's copy wins; for an adapter whose run
did not save one (e.g. downloaded without it) the base's is the only source.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from alignment.config import LoraSettings
from alignment.devices import DevicePlan
from alignment.models import load_tokenizer, load_with_adapter
from alignment.runner import PolicyRunConfig, device_plan, lora_config


def has_own_tokenizer(adapter: str | Path | None) -> bool:
    return adapter is not None and (Path(adapter) / "tokenizer_config.json").is_file()


def load_policy_tokenizer(
    model: str, adapter: str | Path | None = None, trust_remote_code: bool = False
) -> PreTrainedTokenizerBase:
    """The adapter's own tokenizer when its run saved one, else the base model's (module docstring)."""
    source = adapter if has_own_tokenizer(adapter) else model
    return load_tokenizer(source, trust_remote_code=trust_remote_code)  # type: ignore[arg-type]


def load_policy(
    model: str,
    adapter: str | Path | None = None,
    plan: DevicePlan | None = None,
    *,
    trainable: bool = False,
    quantization: str = "none",
    lora: LoraSettings | None = None,
    wrap_lora: bool = False,
    trust_remote_code: bool = False,
) -> tuple[torch.nn.Module, Any]:
    """(model, peft_config): base in `quantization` (+ `adapter`, trainable or frozen).

    Without an adapter and with `lora`, a fresh LoRA: its `LoraConfig` is returned for a TRL trainer
    to add, or, with `wrap_lora`, added here (then peft_config is None).
    """
    policy = load_with_adapter(
        model,
        adapter,
        plan,
        trainable=trainable,
        quantization=quantization,
        trust_remote_code=trust_remote_code,
    )
    if adapter is not None or lora is None:
        return policy, None
    peft_config = lora_config(lora)
    if not wrap_lora:
        return policy, peft_config
    from peft import get_peft_model

    return get_peft_model(policy, peft_config), None


def load_run_tokenizer(config: PolicyRunConfig) -> PreTrainedTokenizerBase:
    return load_policy_tokenizer(config.base_model(), config.init_adapter, config.trust_remote_code)


def load_run_policy(
    config: PolicyRunConfig, plan: DevicePlan | None = None, wrap_lora: bool = False
) -> tuple[torch.nn.Module, Any]:
    """A training run's policy: the init adapter made trainable, or a fresh LoRA from `config.lora`."""
    return load_policy(
        config.base_model(),
        config.init_adapter,
        plan or device_plan(config),
        trainable=True,
        quantization=config.lora.quantization,
        lora=config.lora,
        wrap_lora=wrap_lora,
        trust_remote_code=config.trust_remote_code,
    )
