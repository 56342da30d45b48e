"""How trainable LoRA/head weights meet the bf16 base; shared by every trainer (`training.mixed_precision`).

The frozen base is stored in bf16 (the device plan). The trainable weights are few, and three ways
to hold them are offered:
- master   (default): bf16 in the model, so every matmul and activation is bf16 with no autocast
  casts, and fp32 copies in the optimizer (`FP32MasterWeights`), so updates smaller than bf16's
  resolution still accumulate - the scheme of large-model mixed-precision training;
- autocast: fp32 in the model under bf16 autocast (HF's `bf16=True`), with PEFT's fp32 copies of
  every LoRA input switched off (`keep_activations_in_autocast_dtype`);
- pure:     bf16 everywhere, updates included (fastest; late small updates round away).
With an fp16 or fp32 plan the setting has no effect: fp16 keeps HF's autocast + loss scaling.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from transformers import Trainer, TrainerCallback

MixedPrecision = Literal["master", "autocast", "pure"]


def keep_activations_in_autocast_dtype(model: torch.nn.Module) -> None:
    """Stop PEFT from casting every LoRA input to the adapter's fp32.

    Under bf16 autocast the LoRA matmuls run in bf16 anyway, so that cast is a copy of the activations
    that autocast undoes at once - twice per adapted layer per forward, and again in the backward.
    The profile of a DPO step showed these copies at ~20% of the time; the numbers are unchanged.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            module.cast_input_dtype_enabled = False


def cast_adapter_params(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Hold every fp32 weight PEFT added (adapters, trained heads, a frozen reference adapter) in `dtype`."""
    for param in model.parameters():
        if param.dtype == torch.float32:
            param.data = param.data.to(dtype)


class FP32MasterWeights(TrainerCallback):
    """The optimizer updates fp32 copies of the bf16 trainable weights; the model gets them rounded.

    At train start each bf16 parameter in the optimizer is swapped for an fp32 copy (optimizer state
    restored from a checkpoint moves with it, back to fp32). Before each step the bf16 gradients are
    copied into the masters; after it, the masters are rounded into the model.
    """

    def __init__(self) -> None:
        self.pairs: list[tuple[torch.nn.Parameter, torch.Tensor]] = []

    def on_train_begin(
        self, args: Any, state: Any, control: Any, optimizer: Any = None, **kwargs: Any
    ) -> None:
        self.pairs = []
        for group in optimizer.param_groups:
            params = []
            for param in group["params"]:
                if param.dtype != torch.bfloat16:
                    params.append(param)
                    continue
                master = param.detach().float().requires_grad_(True)
                if param in optimizer.state:  # resumed: moments were cast to bf16 on load
                    optimizer.state[master] = {
                        k: v.float() if torch.is_tensor(v) and v.is_floating_point() and v.dim() else v
                        for k, v in optimizer.state.pop(param).items()
                    }
                self.pairs.append((param, master))
                params.append(master)
            group["params"] = params

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        for param, master in self.pairs:
            master.grad = None if param.grad is None else param.grad.float()

    @torch.no_grad()
    def on_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        for param, master in self.pairs:
            param.copy_(master)


def apply_mixed_precision(trainer: Trainer, dtype: torch.dtype, mode: MixedPrecision) -> None:
    """Put a built trainer's trainable weights in the form `mode` asks for (see the module docstring)."""
    if dtype != torch.bfloat16:
        return
    if mode == "autocast":
        keep_activations_in_autocast_dtype(trainer.model)
        return
    cast_adapter_params(trainer.model, torch.bfloat16)
    if mode == "master":
        trainer.add_callback(FP32MasterWeights())
