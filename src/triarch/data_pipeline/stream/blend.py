"""Weighted blending with exact proportions: a fixed, smooth interleave repeated every block of M sequences.

Within each block of M global sequences dataset d gets ``c_d`` sequences, the largest-remainder
apportionment of M by the weights (so the counts sum to M and each is within 1 of M·w_d), and every block
uses the same slot pattern. The pattern spreads each dataset evenly: the j-th sequence of dataset d sits
at key (j + 1/2) / c_d, and slots follow the keys in order (ties by dataset number). Global sequence g is
therefore dataset ``pattern[g % M]``'s sequence ``(g // M)·c_d + rank[g % M]``: O(1), no state, and over
any run the share of dataset d differs from w_d by less than 1/M plus one partial block.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from triarch.data_pipeline.errors import DataError


def largest_remainder(weights: Sequence[float], total: int) -> np.ndarray:
    """Integer counts summing to ``total`` in proportion to ``weights`` (ties go to the lower index)."""
    w = np.asarray(weights, dtype=np.float64)
    quotas = total * w / w.sum()
    counts = np.floor(quotas).astype(np.int64)
    remainders = quotas - counts
    leftover = total - int(counts.sum())
    order = sorted(range(len(w)), key=lambda i: (-remainders[i], i))
    counts[order[:leftover]] += 1
    return counts


class BlendSchedule:
    """Global sequence index -> (dataset, that dataset's own sequence index); see the module docstring."""

    def __init__(self, weights: Sequence[float], block: int) -> None:
        if not weights or any(not np.isfinite(w) or w <= 0 for w in weights):
            raise DataError(f"blend weights {list(weights)} must be positive and finite")
        if block < len(weights):
            raise DataError(f"blend_block ({block}) must be at least the number of datasets ({len(weights)})")
        self.block = block
        self.counts = largest_remainder(weights, block)
        if (self.counts == 0).any():
            smallest = int(np.argmin(self.counts))
            raise DataError(f"dataset {smallest} (weight {weights[smallest]}) gets no sequence in a blend block "
                            f"of {block}; raise blend_block or its weight")
        datasets = np.repeat(np.arange(len(weights)), self.counts)
        ranks = np.concatenate([np.arange(c) for c in self.counts])
        keys = (ranks + 0.5) / self.counts[datasets]
        order = np.lexsort((datasets, keys))
        self.pattern = datasets[order]
        self.rank = ranks[order]

    def locate(self, sequence: int) -> tuple[int, int]:
        """(dataset, sequence index within that dataset) of global sequence ``sequence``."""
        block, slot = divmod(sequence, self.block)
        dataset = int(self.pattern[slot])
        return dataset, block * int(self.counts[dataset]) + int(self.rank[slot])

    def locate_many(self, sequences: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``locate`` over an int64 array: (datasets, sequence indices within them)."""
        blocks, slots = np.divmod(sequences, self.block)
        datasets = self.pattern[slots]
        return datasets, blocks * self.counts[datasets] + self.rank[slots]
