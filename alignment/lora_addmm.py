"""PEFT LoRA linears computed as one `addmm`: base(x) + scaling * B(A(x)) without two full-size passes.

PEFT's `lora.Linear.forward` computes `result + lora_B(lora_A(x)) * scaling`: the B output, the
scaled copy and the sum are each a (tokens x out_features) tensor, and the backward multiplies the
full-size gradient by `scaling` again. `torch.addmm(result, A(x), B^T, alpha=scaling)` does the
scale and the sum inside the matmul; its backward scales only the (tokens x r) and (r x out) pieces.
In a profiled bf16 DPO step on SmolLM2 those muls and adds were ~7% of the step; a gate/up-sized
LoRA linear runs 12-25% faster forward + backward (measured on this CPU). Same function: in fp32
equal to rounding, in bf16 one rounding instead of three.

Only the plain case is taken (one active adapter, no dropout, no DoRA/variants, a `nn.Linear`
base, matching dtypes); everything else, and any call with extra arguments, runs PEFT's forward.
"""

from __future__ import annotations

import types
from typing import Any

import torch
import torch.nn.functional as F


def _plain(layer: Any, x: torch.Tensor) -> str | None:
    """The active adapter's name when `layer` can run as base + addmm, else None."""
    if layer.disable_adapters or layer.merged or layer.fan_in_fan_out:
        return None
    active = [name for name in layer.active_adapters if name in layer.lora_A]
    if len(active) != 1:
        return None
    name = active[0]
    base = layer.base_layer
    if (
        name in layer.lora_variant
        or type(base) is not torch.nn.Linear
        or not isinstance(layer.lora_dropout[name], torch.nn.Identity)
        or getattr(layer.lora_A[name], "bias", None) is not None
        or getattr(layer.lora_B[name], "bias", None) is not None
        or not (
            x.dtype == base.weight.dtype == layer.lora_A[name].weight.dtype == layer.lora_B[name].weight.dtype
        )
        or torch.is_autocast_enabled(x.device.type)
    ):
        return None
    return name


def _addmm_forward(self: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    name = None if (args or kwargs) else _plain(self, x)
    if name is None:
        return self._peft_forward(x, *args, **kwargs)
    out = F.linear(x, self.base_layer.weight, self.base_layer.bias)
    down = F.linear(x, self.lora_A[name].weight)
    fused = torch.addmm(
        out.reshape(-1, out.shape[-1]),
        down.reshape(-1, down.shape[-1]),
        self.lora_B[name].weight.t(),
        alpha=self.scaling[name],
    )
    return fused.view(out.shape)


def use_addmm_lora(model: torch.nn.Module) -> int:
    """Route every PEFT `lora.Linear` of `model` through `_addmm_forward`; returns how many were patched."""
    from peft.tuners.lora.layer import Linear as LoraLinear

    patched = 0
    for module in model.modules():
        if type(module) is LoraLinear and not hasattr(module, "_peft_forward"):
            module._peft_forward = module.forward
            module.forward = types.MethodType(_addmm_forward, module)
            patched += 1
    return patched
