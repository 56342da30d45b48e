"""A pre-allocated key/value cache with one slot per running sequence.

Hugging Face's `DynamicCache` concatenates every layer's keys and values at every decode step
(a copy that grows with the sequence). Here each running sequence owns a slot (a row) of
tensors allocated once; a decode step writes one position per row in place. Rows stay packed
in slots `0..n-1` so a decode step reads plain views: when a sequence finishes, the last
running row is moved into its slot (one copy per finished sequence, not per step).
"""

from __future__ import annotations

import torch


class StaticKVCache:
    """keys/values per layer: [slots, kv_heads, capacity, head_dim]; grows (rarely) by doubling."""

    def __init__(
        self,
        layers: int,
        kv_heads: int,
        head_dim: int,
        slots: int,
        capacity: int,
        dtype: torch.dtype,
        device: torch.device,
    ):
        self.layers, self.kv_heads, self.head_dim = layers, kv_heads, head_dim
        self.dtype, self.device = dtype, device
        self.slots, self.capacity = 0, 0
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.reserve(slots, capacity)

    def reserve(self, slots: int, capacity: int) -> None:
        """Make room for `slots` rows of `capacity` positions, keeping what is cached."""
        if slots <= self.slots and capacity <= self.capacity:
            return
        new_slots, new_capacity = max(slots, self.slots), max(capacity, self.capacity)
        if capacity > self.capacity and self.capacity:
            new_capacity = max(new_capacity, 2 * self.capacity)  # amortise growth
        shape = (new_slots, self.kv_heads, new_capacity, self.head_dim)
        old = list(zip(self.keys, self.values, strict=True))
        self.keys = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(self.layers)]
        self.values = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(self.layers)]
        for layer, (k, v) in enumerate(old):
            self.keys[layer][: k.shape[0], :, : k.shape[2]] = k
            self.values[layer][: v.shape[0], :, : v.shape[2]] = v
        self.slots, self.capacity = new_slots, new_capacity

    def move(self, src: int, dst: int, length: int) -> None:
        """Copy slot `src`'s first `length` positions into slot `dst` (packing rows after a finish)."""
        for k, v in zip(self.keys, self.values, strict=True):
            k[dst, :, :length] = k[src, :, :length]
            v[dst, :, :length] = v[src, :, :length]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))
