"""LoRA adapters applied per row, so one batch can mix adapters (and rows without one).

Each adapter is a set of (A, scaled B) pairs per (layer, projection). On packed bf16 CPU weights,
every loaded adapter's A rides along in the base projection's packed matrix and a 0/1 column
mask picks each row's adapter (`LlamaWeights.with_adapters`, chosen by the engine). Otherwise
(fp32, GPU) a batch where every row uses the same adapter takes two plain matmuls per
projection, and a mixed batch gathers the rows' adapters once into [rows, r, in] / [rows, out, r]
stacks (again only when the batch's composition changes) for two batched matmuls; a batch with
no adapter takes none. Both replace PEFT's `adapter_names` path, which splits every
projection's input by adapter and runs each part separately.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_KEY = re.compile(r"layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])(?:\.[\w-]+)?\.weight$")


class AdapterError(ValueError):
    """An adapter the engine cannot apply (unsupported PEFT feature, or not for this model)."""


@dataclass
class Adapter:
    """One adapter: (layer, projection) -> (A [r, in], B * scaling [out, r])."""

    name: str
    weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    _groups: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] | None = None

    def groups(
        self, sizes: dict[str, list[tuple[str, int]]]
    ) -> dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]:
        """The adapter on the engine's fused projections (`sizes`: group -> [(projection, out)]):
        A stacked [sum r, in] and B block-diagonal [sum out, sum r], so q/k/v (and gate/up) take
        one LoRA matmul pair instead of three (two). Zero blocks make it exact."""
        if self._groups is None:
            self._groups = {}
            layers = {layer for layer, _ in self.weights}
            for layer in layers:
                for group, members in sizes.items():
                    present = [(name, out) for name, out in members if (layer, name) in self.weights]
                    if not present:
                        continue
                    a_cat = torch.cat([self.weights[layer, name][0] for name, _ in present])
                    first_b = self.weights[layer, present[0][0]][1]
                    b_bd = first_b.new_zeros(sum(out for _, out in members), a_cat.shape[0])
                    out_at, r_at = 0, 0
                    for name, out in members:
                        if (layer, name) in self.weights:
                            b = self.weights[layer, name][1]
                            b_bd[out_at : out_at + out, r_at : r_at + b.shape[1]] = b
                            r_at += b.shape[1]
                        out_at += out
                    self._groups[layer, group] = (a_cat, b_bd)
        return self._groups


def _check_config(config: dict, where: str) -> None:
    if config.get("use_dora"):
        raise AdapterError(f"{where}: DoRA adapters are not supported by the generation engine")
    if config.get("modules_to_save"):
        raise AdapterError(
            f"{where}: adapters with modules_to_save are not supported by the generation engine"
        )
    targets = config.get("target_modules") or []
    if isinstance(targets, str):
        return  # a regex or "all-linear": checked per key below
    unknown = {t.rsplit(".", 1)[-1] for t in targets} - set(PROJECTIONS)
    if unknown:
        raise AdapterError(f"{where}: target_modules {sorted(unknown)} are not attention/MLP projections")


def _scaling(config: dict, module: str, rank: int) -> float:
    alpha = config.get("alpha_pattern", {}).get(module, config.get("lora_alpha", 8))
    return alpha / (rank**0.5 if config.get("use_rslora") else rank)


def load_adapter_files(name: str, path: str | Path, dtype: torch.dtype, device: torch.device) -> Adapter:
    """Read a PEFT adapter directory (adapter_config.json + adapter_model.safetensors)."""
    from safetensors.torch import load_file

    path = Path(path)
    config_file, weights_file = path / "adapter_config.json", path / "adapter_model.safetensors"
    if not config_file.is_file() or not weights_file.is_file():
        raise AdapterError(f"{path}: expected adapter_config.json and adapter_model.safetensors")
    config = json.loads(config_file.read_text())
    _check_config(config, str(config_file))
    pairs: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, tensor in load_file(str(weights_file)).items():
        match = _KEY.search(key)
        if match is None:
            raise AdapterError(f"{weights_file}: tensor {key!r} is not a LoRA weight of a projection")
        layer, module, which = int(match[1]), match[2], match[3]
        if module not in PROJECTIONS:
            raise AdapterError(f"{weights_file}: tensor {key!r} targets {module!r}, not a projection")
        pairs.setdefault((layer, module), {})[which] = tensor
    adapter = Adapter(name)
    for (layer, module), ab in pairs.items():
        a, b = ab["A"], ab["B"]
        scale = _scaling(config, module, a.shape[0])
        adapter.weights[layer, module] = (
            a.to(device=device, dtype=dtype),
            (b.float() * scale).to(device=device, dtype=dtype),
        )
    return adapter


def adapters_of(model: torch.nn.Module, dtype: torch.dtype) -> dict[str, Adapter]:
    """Copy the LoRA weights of a live PEFT model (for rollouts of a policy being trained)."""
    adapters: dict[str, Adapter] = {}
    for qualified, module in model.named_modules():
        if not hasattr(module, "lora_A") or not hasattr(module, "base_layer"):
            continue
        match = re.search(r"layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)$", qualified)
        if match is None or match[2] not in PROJECTIONS:
            raise AdapterError(
                f"LoRA on {qualified!r}: the engine applies LoRA to attention/MLP projections only"
            )
        if getattr(module, "use_dora", {}) and any(module.use_dora.values()):
            raise AdapterError(f"{qualified}: DoRA adapters are not supported by the generation engine")
        for name, lora_a in module.lora_A.items():
            a = lora_a.weight.detach()
            b = module.lora_B[name].weight.detach().float() * module.scaling[name]
            entry = adapters.setdefault(name, Adapter(name))
            entry.weights[int(match[1]), match[2]] = (a.to(dtype), b.to(dtype))
    return adapters


FULL = torch.ones(())  # sentinel mask: every row keeps every fused column


class RowLora:
    """The LoRA deltas of one batch: built from each row's adapter (None = no adapter).

    fused: the weights carry the adapters as extra packed columns (`LlamaWeights.with_adapters`,
    bf16 on CPU); the batch then only needs a 0/1 mask per column layout (`mask`). Otherwise
    the rows' A/B are gathered into per-row stacks for two batched matmuls (`add_delta`)."""

    def __init__(
        self,
        adapters: list[Adapter | None],
        sizes: dict[str, list[tuple[str, int]]],
        fused: bool = False,
    ):
        used = {id(a): a for a in adapters if a is not None}
        self.none = not used
        self.fused = fused
        self._names = [a.name if a is not None else None for a in adapters]
        self._masks: dict[tuple[tuple[str, int, int], ...], torch.Tensor | None] = {}
        self.shared: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] | None = None
        if len(used) == 1 and None not in adapters and not fused:
            self.shared = next(iter(used.values())).groups(sizes)
        self._stacks: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}
        if self.none or self.shared is not None or fused:
            return
        grouped = {id(a): a.groups(sizes) for a in used.values()}
        keys = {key for g in grouped.values() for key in g}
        for key in keys:
            present = [g[key] for g in grouped.values() if key in g]
            rank = max(a.shape[0] for a, _ in present)
            r_in, b_out = present[0][0].shape[1], present[0][1].shape[0]
            stack_a = present[0][0].new_zeros(len(adapters), rank, r_in)
            stack_b = present[0][1].new_zeros(len(adapters), b_out, rank)
            for row, adapter in enumerate(adapters):
                if adapter is not None and key in grouped[id(adapter)]:
                    a, b = grouped[id(adapter)][key]
                    stack_a[row, : a.shape[0]] = a  # zero-padded to the largest rank: exact
                    stack_b[row, :, : b.shape[1]] = b
            self._stacks[key] = (stack_a.transpose(1, 2), stack_b.transpose(1, 2))

    def mask(self, cols: tuple[tuple[str, int, int], ...], like: torch.Tensor) -> torch.Tensor | None:
        """[rows, 1, sum r] 0/1 for fused columns `cols` ((adapter, start, end), ...): FULL when
        every row keeps every column, None when no row uses any (then B is skipped)."""
        if cols not in self._masks:
            names = {name for name, _, _ in cols}
            if not names.intersection(self._names):
                self._masks[cols] = None
            elif len(cols) == 1 and all(n == cols[0][0] for n in self._names):
                self._masks[cols] = FULL
            else:
                mask = torch.zeros(len(self._names), 1, cols[-1][2], dtype=like.dtype, device=like.device)
                for row, name in enumerate(self._names):
                    for col_name, start, end in cols:
                        if col_name == name:
                            mask[row, :, start:end] = 1
                self._masks[cols] = mask
        return self._masks[cols]

    def add_delta(self, layer: int, group: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """y plus the LoRA term of fused projection `group` of `layer` on input x [rows, t, in]."""
        if self.none or self.fused:
            return y
        if self.shared is not None:
            ab = self.shared.get((layer, group))
            if ab is None:
                return y
            return y + F.linear(F.linear(x, ab[0]), ab[1])
        stacks = self._stacks.get((layer, group))
        if stacks is None:
            return y
        return y + torch.bmm(torch.bmm(x, stacks[0]), stacks[1])


def merge_into(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """W + B A in fp32, rounded once to W's dtype (a merged copy for single-adapter rollouts)."""
    return (weight.float() + b.float() @ a.float()).to(weight.dtype)
