"""Standard-normal tensors drawn in fixed tiles, so that any box of a tensor costs about its own size.

A tensor of a given full shape is cut into tiles that depend only on that shape: 64 x 256 over the last
two dimensions (1 along any leading one), 16384 elements for a vector. Tile ``t`` of tensor ``name`` is
``torch.randn`` from a generator seeded by a stable hash of (seed, name, t). Any box of the full tensor
is then drawn from the tiles it touches, with the same values whichever box contains it.
"""

from __future__ import annotations

import hashlib
import itertools
import math
from collections.abc import Sequence

import torch

TILE_MATRIX = (64, 256)
TILE_VECTOR = 16384
_SEED_BITS = 63  # torch.Generator.manual_seed accepts any non-negative 63-bit value

Box = Sequence[tuple[int, int]]  # per dimension: [start, stop) in the full tensor


def tile_edges(ndim: int) -> tuple[int, ...]:
    """Tile size along each dimension of a tensor with ``ndim`` dimensions."""
    if ndim == 0:
        return ()
    if ndim == 1:
        return (TILE_VECTOR,)
    return (1,) * (ndim - 2) + TILE_MATRIX


def tile_seed(seed: int, name: str, tile: tuple[int, ...]) -> int:
    """Generator seed of one tile: a stable hash of (seed, name, tile index), the same in every process."""
    key = f"{seed}|{name}|{','.join(map(str, tile))}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") >> (64 - _SEED_BITS)


def tile_ranges(full_shape: Sequence[int], box: Box) -> list[range]:
    """Per dimension, the indices of the tiles that intersect ``box``."""
    return [range(start // e, math.ceil(stop / e)) if stop > start else range(0)
            for (start, stop), e in zip(box, tile_edges(len(full_shape)))]


def draw_tile(name: str, full_shape: Sequence[int], tile: tuple[int, ...], *, seed: int,
              generator: torch.Generator) -> torch.Tensor:
    """The values of one tile (edge tiles are cut to the full shape)."""
    shape = [min(e, n - t * e) for t, e, n in zip(tile, tile_edges(len(full_shape)), full_shape)]
    generator.manual_seed(tile_seed(seed, name, tile))
    return torch.randn(shape, generator=generator)


def standard_normal_box(name: str, full_shape: Sequence[int], box: Box, *, seed: int) -> tuple[torch.Tensor, int]:
    """Values of ``full[box]`` of tensor ``name``, and how many elements were drawn to get them."""
    if len(box) != len(full_shape):
        raise ValueError(f"box {list(box)} does not have one range per dimension of {tuple(full_shape)}")
    out = torch.empty([stop - start for start, stop in box])
    generator = torch.Generator()
    edges = tile_edges(len(full_shape))
    drawn = 0
    for tile in itertools.product(*tile_ranges(full_shape, box)):
        value = draw_tile(name, full_shape, tile, seed=seed, generator=generator)
        drawn += value.numel()
        src, dst = [], []
        for (start, stop), t, e, n in zip(box, tile, edges, value.shape):
            lo, hi = max(start, t * e), min(stop, t * e + n)
            src.append(slice(lo - t * e, hi - t * e))
            dst.append(slice(lo - start, hi - start))
        out[tuple(dst)] = value[tuple(src)]
    return out, drawn


def full_standard_normal(name: str, full_shape: Sequence[int], *, seed: int) -> torch.Tensor:
    """The whole tensor ``name``, built from the same tiles."""
    return standard_normal_box(name, full_shape, [(0, n) for n in full_shape], seed=seed)[0]
