"""One generation engine for everything that samples: PPO/GRPO rollouts, `annotate push`,
`prefloop eval` and `prefloop serve` (see engine.py)."""

from __future__ import annotations

from typing import Any, Literal

import torch

from alignment.generation.engine import Engine, FinishReason, SamplingParams, Sequence
from alignment.generation.llama import UnsupportedModelError
from alignment.generation.lora import AdapterError

Backend = Literal["native"]

__all__ = [
    "AdapterError",
    "Backend",
    "Engine",
    "FinishReason",
    "SamplingParams",
    "Sequence",
    "UnsupportedModelError",
    "load_engine",
    "policy_engine",
]


def load_engine(
    model: torch.nn.Module, tokenizer: Any | None = None, backend: Backend = "native", **kwargs: Any
) -> Engine:
    """The engine for `model`. Only "native" ships: a vLLM backend for GPU machines would be
    added here behind the same interface once a test has run it."""
    if backend != "native":
        raise ValueError(f"generation backend {backend!r} is not available; choose 'native'")
    return Engine(model, tokenizer, **kwargs)


def policy_engine(model: torch.nn.Module, tokenizer: Any, max_batch_size: int = 16, **kwargs: Any) -> Engine:
    """An engine that samples `model` as it stands, one adapter for every row: a PEFT model's
    active adapter is merged into a copy of the weights (pass `engine.merged` as the adapter).
    Merging moves sampled log-probs about as far from a forward of the unmerged policy as bf16
    noise already does (mean 0.037-0.050 vs HF generate's own 0.039-0.040 nats; bench/README.md)."""
    adapter = model.active_adapter if hasattr(model, "peft_config") else None
    return load_engine(model, tokenizer, max_batch_size=max_batch_size, merge_adapter=adapter, **kwargs)
