"""Device and dtype choice, in one place: every trainer, scorer and server asks here.

CUDA when present, else CPU; bf16 where the hardware runs it natively (Ampere+ GPUs, CPUs with
AMX or AVX512-BF16), fp16 on older GPUs, fp32 otherwise. A config may force any of them.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Literal

import torch

DTypeName = Literal["auto", "bf16", "fp16", "fp32"]
AttentionName = Literal["auto", "eager", "sdpa"]
log = logging.getLogger(__name__)
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


# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_MMAP_THRESHOLD_MAX = 32 * 2**20  # glibc's ceiling for M_MMAP_THRESHOLD on 64-bit


@lru_cache(maxsize=1)
def keep_freed_cpu_memory() -> bool:
    """Make glibc reuse freed tensor memory instead of unmapping it and faulting fresh pages in again.

    PyTorch has no caching allocator on CPU: every activation of a training step is a malloc, and
    glibc serves blocks above its (adaptive) mmap threshold with mmap and returns them with munmap, so
    each step page-faults its activations in anew. Measured on a bundled DPO step (SmolLM2-135M, one
    thread): 25 s of the bench's 88 s were kernel time; with blocks up to 32 MiB kept in the heap and
    the heap never trimmed, 5 s, and 1.42 -> 1.23 s a step, peak RSS 1636 -> 1668 MiB. Blocks above
    32 MiB still use mmap (glibc's ceiling). Once per process; False where the C library is not glibc.
    """
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        mallopt = libc.mallopt if libc is not None else None
    except (OSError, AttributeError):
        mallopt = None
    if mallopt is None:
        return False
    ok = bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
    log.debug("glibc malloc: keep freed blocks up to 32 MiB (%s)", "set" if ok else "refused")
    return ok
