"""A key/value cache for incremental decoding, keyed by layer.

Each attention layer writes the keys and values of the tokens of one forward into preallocated slots
``[length, length + seq)`` of its own buffers and attends to every slot written so far. The cache knows
nothing about parallelism: under tensor parallelism a layer's keys and values hold only that rank's KV
heads, so each rank keeps the cache of its own heads. ``length`` is advanced by the caller after each
forward (by fewer slots than it wrote when trailing slots are placeholders that the next forward overwrites).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


class KVCache:
    """Per-layer (batch, kv_heads, capacity, head_dim) key and value buffers, allocated on first write."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.length = 0
        self._buffers: dict[str, tuple[Tensor, Tensor]] = {}

    def write(self, layer: str, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store (batch, kv_heads, seq, head_dim) ``k``/``v`` at ``[length, length + seq)`` and return the
        keys and values of every slot up to the end of this write."""
        end = self.length + k.shape[2]
        if end > self.capacity:
            raise ValueError(f"KV cache holds {self.capacity} positions; this forward would reach {end}")
        if layer not in self._buffers:
            shape = (k.shape[0], k.shape[1], self.capacity, k.shape[3])
            self._buffers[layer] = (k.new_empty(shape), v.new_empty(shape))
        keys, values = self._buffers[layer]
        keys[:, :, self.length:end] = k
        values[:, :, self.length:end] = v
        return keys[:, :, :end], values[:, :, :end]

    def advance(self, n: int) -> None:
        """Mark ``n`` more slots as kept (the next forward writes after them)."""
        self.length += n


@dataclass(frozen=True)
class LayerCache:
    """One layer's view of a :class:`KVCache`."""

    cache: KVCache
    layer: str

    def write(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        return self.cache.write(self.layer, k, v)


@dataclass(frozen=True)
class DecodeInputs:
    """What an incremental forward needs besides the tokens: each token's ``position_ids`` (batch, seq),
    the ``mask`` (batch, 1, seq, cached + seq) bool of the keys each query may see (causal and without
    padding), the ``cache``, and ``keep``: the slice of positions whose output the head computes (``None``:
    all of them)."""

    position_ids: Tensor
    mask: Tensor
    cache: KVCache
    keep: slice | None = None


def decode_mask(valid: Tensor, start: int, seq: int) -> Tensor:
    """(batch, 1, seq, start + seq) bool for queries at slots ``[start, start + seq)``: a query sees the
    slots at or before its own that hold real tokens (``valid``: (batch, >= start + seq) bool), and always
    itself, so a padding query never has an empty row."""
    end = start + seq
    keys = torch.arange(end, device=valid.device)
    queries = torch.arange(start, end, device=valid.device)
    causal = keys[None, :] <= queries[:, None]
    own = keys[None, :] == queries[:, None]
    return ((causal[None] & valid[:, None, :end]) | own[None])[:, None]
