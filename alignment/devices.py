"""Device and dtype choice, in one place: every trainer, scorer and server asks here.

CUDA when present, else CPU; bf16 where the hardware runs it natively (Ampere+ GPUs, CPUs with
AMX or AVX512-BF16), fp16 on older GPUs, fp32 otherwise. A config may force any of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Literal

import torch

DTypeName = Literal["auto", "bf16", "fp16", "fp32"]
AttentionName = Literal["auto", "eager", "sdpa"]
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass(frozen=True)
class DevicePlan:
    device: torch.device
    dtype: torch.dtype
    attention: str = "sdpa"  # the models' attn_implementation

    @property
    def name(self) -> str:
        return {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[self.dtype]

    def trainer_precision(self, autocast_bf16: bool = True) -> dict[str, bool]:
        """The `bf16`/`fp16` flags (autocast) for HF TrainingArguments."""
        return {"bf16": self.dtype == torch.bfloat16 and autocast_bf16, "fp16": self.dtype == torch.float16}


@lru_cache(maxsize=1)
def cpu_has_native_bf16() -> bool:
    """AMX or AVX512-BF16: bf16 matmuls are then several times faster than fp32 on this CPU."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(flag in flags for flag in (" amx_bf16", " avx512_bf16"))


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def best_dtype(device: torch.device) -> torch.dtype:
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_has_native_bf16() else torch.float32


def attention_implementation(device: torch.device, choice: AttentionName) -> str:
    """auto: eager on CPU, sdpa elsewhere. On CPU, PyTorch's flash-attention backward took a fifth of a
    DPO or reward training step on chat-length sequences (profiled); eager's backward is plain matmuls."""
    if choice == "auto":
        return "eager" if device.type == "cpu" else "sdpa"
    return choice


def plan_device(
    dtype: DTypeName = "auto", device: str | None = None, attention: AttentionName = "sdpa"
) -> DevicePlan:
    dev = torch.device(device) if device else default_device()
    if dtype == "fp16" and dev.type == "cpu":
        raise ValueError("dtype fp16 is not supported on CPU; use bf16 or fp32")
    chosen = best_dtype(dev) if dtype == "auto" else _DTYPES[dtype]
    return DevicePlan(dev, chosen, attention_implementation(dev, attention))
