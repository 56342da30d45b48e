"""A Llama-family forward pass written for generation: prefill and decode, on a static KV cache.

Hugging Face's forward builds attention masks, cache objects and module hooks at every call;
on a CPU at batch 16 that per-call and per-operation overhead (not arithmetic) dominates a
decode step. This module runs the same operations on the same weights (the model's own
tensors, not copies, unless LoRA is merged) and keeps HF's numerics where a test compares
against `generate`: fp32 RMSNorm, HF's rotary module, eager attention with an fp32 softmax.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from alignment.generation.kv_cache import StaticKVCache
from alignment.generation.lora import FULL, Adapter, RowLora, merge_into

SUPPORTED = ("llama", "mistral", "qwen2")


class UnsupportedModelError(ValueError):
    """The engine implements the Llama family; other architectures need another backend."""


@dataclass
class Layer:
    input_norm: torch.Tensor
    post_norm: torch.Tensor
    proj: dict[str, torch.Tensor]  # fused group (qkv, o, gate_up, down) -> weight [out, in]
    bias: dict[str, torch.Tensor]  # qwen2 has q/k/v biases
    packed: dict[str, torch.Tensor] | None = None  # the same weights in oneDNN's blocked layout
    # Per-row LoRA fused into the packed weights (`LlamaWeights.with_adapters`): `packed[group]`
    # then also holds every adapter's A rows below W, and `lora_b[group]` is the adapters' B
    # side by side [out, sum r], packed; `lora_cols[group]` says whose columns are where.
    lora_b: dict[str, torch.Tensor] | None = None
    lora_cols: dict[str, tuple[tuple[str, int, int], ...]] | None = None


def _prepacking(weight: torch.Tensor) -> bool:
    """On CPU in bf16, F.linear re-lays out the weight for oneDNN at every call; packing it once
    made a decode-sized matmul 27% faster with bitwise the same result (measured)."""
    return (
        weight.device.type == "cpu"
        and weight.dtype == torch.bfloat16
        and torch.backends.mkldnn.is_available()
    )


def _pack(weight: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(weight, 16)


def _linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, packed: torch.Tensor | None
) -> torch.Tensor:
    if packed is None:
        return F.linear(x, weight, bias)
    return torch.ops.mkldnn._linear_pointwise(x.contiguous(), packed, bias, "none", [], "")


class LlamaWeights:
    """The tensors of a (PEFT-wrapped or plain) HF Llama-family causal LM, by reference."""

    def __init__(self, model: torch.nn.Module):
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        config = base.config
        if config.model_type not in SUPPORTED:
            raise UnsupportedModelError(
                f"the generation engine runs {', '.join(SUPPORTED)} models; this one is {config.model_type!r}"
            )
        window = getattr(config, "sliding_window", None)
        if window and getattr(config, "use_sliding_window", config.model_type == "mistral"):
            raise UnsupportedModelError("sliding-window attention is not implemented by the engine")
        self.config = config
        inner = base.model
        self.embed = inner.embed_tokens.weight
        self.norm = inner.norm.weight
        self.lm_head = base.lm_head.weight
        self.rotary = inner.rotary_emb  # HF's own: every rope_type, same cos/sin numerics
        self.eps = config.rms_norm_eps
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.scaling = self.head_dim**-0.5
        q_out, kv_out = self.heads * self.head_dim, self.kv_heads * self.head_dim
        hidden, inter = config.hidden_size, config.intermediate_size
        # Fused projections: q/k/v share their input, and so do gate/up. One matmul each gives
        # bitwise the same numbers as three (checked on SmolLM2 bf16) with fewer calls.
        self.sizes: dict[str, list[tuple[str, int]]] = {
            "qkv": [("q_proj", q_out), ("k_proj", kv_out), ("v_proj", kv_out)],
            "o": [("o_proj", hidden)],
            "gate_up": [("gate_proj", inter), ("up_proj", inter)],
            "down": [("down_proj", hidden)],
        }
        self.layers: list[Layer] = []
        for block in inner.layers:
            proj, bias = {}, {}
            for group, members in self.sizes.items():
                owner = block.self_attn if group in ("qkv", "o") else block.mlp
                linears = [getattr(owner, name) for name, _ in members]
                linears = [getattr(lin, "base_layer", lin) for lin in linears]  # PEFT wraps them
                weights = [lin.weight.detach() for lin in linears]
                proj[group] = weights[0] if len(weights) == 1 else torch.cat(weights)
                if any(lin.bias is not None for lin in linears):
                    bias[group] = torch.cat(
                        [lin.bias.detach() if lin.bias is not None else lin.weight.new_zeros(lin.out_features)
                         for lin in linears]
                    )  # fmt: skip
            self.layers.append(
                Layer(block.input_layernorm.weight, block.post_attention_layernorm.weight, proj, bias)
            )
        self.prepack = _prepacking(self.embed)
        if self.prepack:
            for layer in self.layers:
                layer.packed = {group: _pack(weight) for group, weight in layer.proj.items()}
        self.lm_head_packed = _pack(self.lm_head.detach()) if self.prepack else None

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.dtype

    @property
    def device(self) -> torch.device:
        return self.embed.device

    def merged(self, adapter: Adapter) -> LlamaWeights:
        """A copy whose projections have `adapter` merged in (W + B A rounded once to the dtype)."""
        copy = object.__new__(LlamaWeights)
        copy.__dict__.update(self.__dict__)
        copy.layers = []
        for i, layer in enumerate(self.layers):
            proj = dict(layer.proj)
            for group, members in self.sizes.items():
                at = 0
                for name, out in members:
                    if (i, name) in adapter.weights:
                        if proj[group] is layer.proj[group]:
                            proj[group] = proj[group].clone()
                        rows = proj[group][at : at + out]
                        rows.copy_(merge_into(rows, *adapter.weights[i, name]))
                    at += out
            packed = None
            if self.prepack:  # the packed copy is all a forward reads: drop the unpacked one
                packed = {g: _pack(wt) for g, wt in proj.items()}
                proj = {g: packed[g] if proj[g] is not layer.proj[g] else proj[g] for g in proj}
            copy.layers.append(Layer(layer.input_norm, layer.post_norm, proj, layer.bias, packed))
        return copy

    def with_adapters(self, adapters: Seq[Adapter]) -> LlamaWeights:
        """A copy that applies `adapters` per row from the packed weights (bf16 on CPU only).

        Each projection's packed matrix becomes [W; A_1; ...; A_n], so one oneDNN call gives
        both the base output and every adapter's x A^T; a row mask keeps its own adapter's
        columns and one more call adds (x A^T) B^T with the add fused. Two calls per projection
        instead of three, and no per-row gather of A/B (measured: bench/README.md). Zero mask
        entries make it exact; the extra columns cost sum r outputs per projection."""
        assert self.prepack, "fused per-row LoRA needs the packed bf16 CPU weights"
        copy = object.__new__(LlamaWeights)
        copy.__dict__.update(self.__dict__)
        copy.layers = []
        groups = [(a.name, a.groups(self.sizes)) for a in adapters]
        for i, layer in enumerate(self.layers):
            packed, lora_b, lora_cols, bias = dict(layer.packed or {}), {}, {}, dict(layer.bias)
            for group, weight in layer.proj.items():
                present = [(name, g[i, group]) for name, g in groups if (i, group) in g]
                if not present:
                    continue
                a_all = torch.cat([weight, *(a for _, (a, _) in present)])
                packed[group] = _pack(a_all)
                lora_b[group] = _pack(torch.cat([b for _, (_, b) in present], dim=1).contiguous())
                cols, at = [], 0
                for name, (a, _) in present:
                    cols.append((name, at, at + a.shape[0]))
                    at += a.shape[0]
                lora_cols[group] = tuple(cols)
                if group in bias:
                    bias[group] = torch.cat([bias[group], bias[group].new_zeros(at)])
            copy.layers.append(
                Layer(layer.input_norm, layer.post_norm, layer.proj, bias, packed, lora_b, lora_cols)
            )
        return copy

    def new_cache(self, slots: int, capacity: int) -> StaticKVCache:
        return StaticKVCache(
            len(self.layers), self.kv_heads, self.head_dim, slots, capacity, self.dtype, self.device
        )


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # HF's LlamaRMSNorm: normalise in fp32, scale after casting back (one fused kernel for the
    # normalisation instead of five elementwise ops).
    return weight * F.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """HF's `x * cos + rotate_half(x) * sin`, with rotate_half's negation moved into sin (exact:
    only signs change) and the half swap done by one flip."""
    halves = x.unflatten(-1, (2, -1)).flip(-2).flatten(-2)
    return x * cos + halves * sin_signed


def _project(layer: Layer, i: int, group: str, x: torch.Tensor, lora: RowLora) -> torch.Tensor:
    packed = layer.packed[group] if layer.packed is not None else None
    y = _linear(x, layer.proj[group], layer.bias.get(group), packed)
    if layer.lora_cols is not None and group in layer.lora_cols:
        out = layer.proj[group].shape[0]
        y, xa = y[..., :out], y[..., out:]
        mask = lora.mask(layer.lora_cols[group], xa)
        if mask is None:  # no row of this batch uses a fused adapter here
            return y
        xa = xa if mask is FULL else xa * mask
        return torch.ops.mkldnn._linear_pointwise.binary(
            xa.contiguous(), y.contiguous(), layer.lora_b[group], None, "add"
        )
    return lora.add_delta(i, group, x, y)


def forward(
    w: LlamaWeights,
    cache: StaticKVCache,
    ids: torch.Tensor,
    positions: torch.Tensor,
    lora: RowLora,
    *,
    slots: torch.Tensor | None = None,
    lengths: torch.Tensor | None = None,
    last: torch.Tensor | None = None,
) -> torch.Tensor:
    """Logits [rows, vocab] (the weights' dtype, as HF computes them; `sample` upcasts) of one
    position per row, updating the cache.

    Prefill (`slots` given): ids [rows, t] right-padded prompts written to cache rows `slots`
    at positions 0..t-1; `lengths` are the real prompt lengths, `last` the position whose
    logits are returned. Decode (`slots` None): ids [rows, 1] for cache rows 0..rows-1, each at
    its own position `positions[:, 0]`; attention covers positions <= that.
    """
    rows, t = ids.shape
    decode = slots is None
    h = F.embedding(ids, w.embed)
    cos, sin = w.rotary(h, positions)
    half = sin.shape[-1] // 2
    sin = torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    min_value = torch.finfo(h.dtype).min
    if decode:
        span = int(positions.max()) + 1
        pos = positions[:, 0]
        visible = torch.arange(span, device=ids.device)[None, :] <= pos[:, None]
        mask = torch.zeros(rows, 1, 1, span, dtype=h.dtype, device=ids.device).masked_fill_(
            ~visible[:, None, None, :], min_value
        )
        row_index = torch.arange(rows, device=ids.device)
    else:
        assert lengths is not None and last is not None
        causal = torch.ones(t, t, dtype=torch.bool, device=ids.device).tril()
        key_valid = torch.arange(t, device=ids.device)[None, :] < lengths[:, None]
        visible = causal[None] & key_valid[:, None, :]
        mask = torch.zeros(rows, 1, t, t, dtype=h.dtype, device=ids.device).masked_fill_(
            ~visible[:, None], min_value
        )
    groups = w.heads // w.kv_heads
    for i, layer in enumerate(w.layers):
        x = _rms_norm(h, layer.input_norm, w.eps)
        qkv = _project(layer, i, "qkv", x, lora)
        q_out, kv_out = w.heads * w.head_dim, w.kv_heads * w.head_dim
        # q and k are adjacent in the fused output: one rotary pass covers both.
        qk = qkv[..., : q_out + kv_out].view(rows, t, w.heads + w.kv_heads, w.head_dim).transpose(1, 2)
        qk = _rope(qk, cos, sin)
        q, k = qk[:, : w.heads], qk[:, w.heads :]
        v = qkv[..., q_out + kv_out :].view(rows, t, w.kv_heads, w.head_dim).transpose(1, 2)
        keys, values = cache.keys[i], cache.values[i]
        if decode:
            keys[row_index, :, pos] = k[:, :, 0]
            values[row_index, :, pos] = v[:, :, 0]
            # Explicit copies of the cached span: bf16 matmul on the strided slices (rows and
            # positions of a larger cache) took 3x longer than the copy plus a contiguous one.
            k_all, v_all = keys[:rows, :, :span].contiguous(), values[:rows, :, :span].contiguous()
            # GQA without repeat_kv's copy: the query heads of one KV head become query rows.
            qg = q.reshape(rows, w.kv_heads, groups, w.head_dim) * w.scaling  # scale the smaller side
            scores = torch.matmul(qg, k_all.transpose(2, 3)) + mask
            probs = scores.softmax(dim=-1, dtype=torch.float32).to(q.dtype)
            attn = torch.matmul(probs, v_all).reshape(rows, 1, w.heads * w.head_dim)
        else:
            keys[slots, :, :t] = k
            values[slots, :, :t] = v
            # Prefill mirrors HF's eager attention (repeat_kv), so prompts score exactly as there.
            k_rep = k.repeat_interleave(groups, dim=1)
            v_rep = v.repeat_interleave(groups, dim=1)
            scores = torch.matmul(q, k_rep.transpose(2, 3)) * w.scaling + mask
            probs = scores.softmax(dim=-1, dtype=torch.float32).to(q.dtype)
            attn = torch.matmul(probs, v_rep).transpose(1, 2).reshape(rows, t, w.heads * w.head_dim)
        h = h + _project(layer, i, "o", attn, lora)
        x = _rms_norm(h, layer.post_norm, w.eps)
        gate, up = _project(layer, i, "gate_up", x, lora).chunk(2, dim=-1)
        h = h + _project(layer, i, "down", F.silu(gate) * up, lora)
    if not decode:
        h = h[torch.arange(rows, device=ids.device), last][:, None]
    h = _rms_norm(h, w.norm, w.eps)
    return _linear(h[:, -1], w.lm_head, None, w.lm_head_packed)
