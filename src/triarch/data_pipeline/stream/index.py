"""Where each training sequence of one dataset lies: pure arithmetic over the manifest's token counts.

For one dataset (one split of a prepared folder, N tokens), sequence length T, seed s and dataset number d
(its place in the blend):

- **Epoch stream.** Epoch e reads the shards in ``shard_order(e)`` — ``default_rng([s, d, e, 0])``'s
  permutation, or file order without shuffling — concatenated into one stream of N tokens.
- **Windows.** The stream is cut into W = (N - 1) // T windows of T + 1 tokens with stride T: window w is
  stream tokens [w·T, w·T + T + 1). Inputs (its first T tokens) and labels (its last T) each tile the
  stream once; stream tokens [W·T, N) are never an input (1 to T tokens, "the tail"). The next epoch
  starts at the first window of its own stream: no window joins two epochs.
- **Bounded shuffle.** The epoch's windows are shuffled within consecutive blocks of B: the k-th sequence
  of the epoch is window ``b·B + default_rng([s, d, e, 1, b]).permutation(size_b)[k - b·B]`` with
  b = k // B (the last block may be shorter); without shuffling it is window k. Random access is O(1);
  a block spans about B·T consecutive tokens, so reads stay local.
- **Epochs.** The dataset's n-th sequence is sequence n % W of epoch n // W.

Nothing here reads data or depends on the number of ranks or workers.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from itertools import pairwise
from typing import TypeVar

import numpy as np

_SHARD_ORDER_STREAM = 0
_BLOCK_STREAM = 1
_CACHED_EPOCHS = 2
_CACHED_BLOCKS = 16

_V = TypeVar("_V")


def _remember(cache: OrderedDict, key: object, make: Callable[[], _V], limit: int) -> _V:
    """``cache[key]``, computing it with ``make`` and evicting the least recently used beyond ``limit``."""
    value = cache.get(key)
    if value is None:
        value = cache[key] = make()
        if len(cache) > limit:
            cache.popitem(last=False)
    else:
        cache.move_to_end(key)
    return value


def runs(*keys: np.ndarray) -> list[tuple[tuple[int, ...], slice]]:
    """Maximal runs of equal key tuples, for keys sorted lexicographically (a single run: O(1))."""
    count = len(keys[0])
    if not count:
        return []
    if all(k[0] == k[-1] for k in keys):
        return [(tuple(int(k[0]) for k in keys), slice(0, count))]
    changes = np.flatnonzero(np.any([np.diff(k) != 0 for k in keys], axis=0)) + 1
    bounds = [0, *changes.tolist(), count]
    return [(tuple(int(k[a]) for k in keys), slice(a, b)) for a, b in pairwise(bounds)]


class EpochLayout:
    """Sequence ``n`` of one dataset -> (epoch, window) and the epoch's shard order (module docstring)."""

    def __init__(self, shard_tokens: np.ndarray, seq_len: int, seed: int, dataset: int, *, shuffle: bool,
                 shuffle_block: int) -> None:
        self.shard_tokens = np.asarray(shard_tokens, dtype=np.int64)
        self.seq_len = seq_len
        self.seed = seed
        self.dataset = dataset
        self.shuffle = shuffle
        self.shuffle_block = shuffle_block
        self.total_tokens = int(self.shard_tokens.sum())
        self.windows = max(0, (self.total_tokens - 1) // seq_len)
        self._epochs: OrderedDict[int, tuple[list[int], list[int]]] = OrderedDict()
        self._blocks: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()

    def stream(self, epoch: int) -> tuple[list[int], list[int]]:
        """Epoch ``epoch``'s shard order and the stream offsets where those shards start (plus the total)."""
        def make() -> tuple[list[int], list[int]]:
            count = len(self.shard_tokens)
            if self.shuffle:
                rng = np.random.default_rng([self.seed, self.dataset, epoch, _SHARD_ORDER_STREAM])
                order = rng.permutation(count)
            else:
                order = np.arange(count)
            starts = np.zeros(count + 1, dtype=np.int64)
            np.cumsum(self.shard_tokens[order], out=starts[1:])
            return order.tolist(), starts.tolist()

        return _remember(self._epochs, epoch, make, _CACHED_EPOCHS)

    def shard_order(self, epoch: int) -> np.ndarray:
        """Shard indices (manifest order) in the order epoch ``epoch`` reads them."""
        return np.array(self.stream(epoch)[0])

    def block_windows(self, block: int) -> tuple[int, int]:
        """Windows ``[first, stop)`` of shuffle block ``block`` (the same in every epoch)."""
        first = block * self.shuffle_block
        return first, min(first + self.shuffle_block, self.windows)

    def _permutation(self, epoch: int, block: int) -> np.ndarray:
        first, stop = self.block_windows(block)

        def make() -> np.ndarray:
            rng = np.random.default_rng([self.seed, self.dataset, epoch, _BLOCK_STREAM, block])
            return rng.permutation(stop - first)

        return _remember(self._blocks, (epoch, block), make, _CACHED_BLOCKS)

    def block_order(self, epoch: int, block: int) -> np.ndarray:
        """The windows of ``block`` relative to its first, in the order epoch ``epoch`` reads them."""
        if self.shuffle and self.shuffle_block > 1:
            return self._permutation(epoch, block)
        first, stop = self.block_windows(block)
        return np.arange(stop - first, dtype=np.int64)

    def locate_runs(self, sequences: np.ndarray) -> list[tuple[int, int, slice, np.ndarray]]:
        """The dataset's ``sequences`` (ascending int64) as runs in one (epoch, shuffle block):
        ``(epoch, block, slice of sequences, their windows)``."""
        epochs, positions = np.divmod(sequences, self.windows)
        blocks = positions // self.shuffle_block
        located = []
        for (epoch, block), part in runs(epochs, blocks):
            windows = positions[part]
            if self.shuffle and self.shuffle_block > 1:
                first = block * self.shuffle_block
                windows = first + self._permutation(epoch, block)[windows - first]
            located.append((epoch, block, part, windows))
        return located

    def locate_range(self, start: int, count: int) -> list[tuple[int, int, slice, np.ndarray]]:
        """``locate_runs`` of sequences ``[start, start + count)``; a range inside one block (the usual
        case for a step) is a slice of the block's permutation, without per-sequence arithmetic."""
        epoch, first_position = divmod(start, self.windows)
        last_epoch, last_position = divmod(start + count - 1, self.windows)
        block = first_position // self.shuffle_block
        if count < 1 or last_epoch != epoch or last_position // self.shuffle_block != block:
            return self.locate_runs(np.arange(start, start + count, dtype=np.int64))
        if not self.shuffle or self.shuffle_block <= 1:
            windows = np.arange(first_position, last_position + 1, dtype=np.int64)
        else:
            first = block * self.shuffle_block
            windows = first + self._permutation(epoch, block)[first_position - first:last_position + 1 - first]
        return [(epoch, block, slice(0, count), windows)]

    def window(self, epoch: int, position: int) -> int:
        """The window that is sequence ``position`` (0 <= position < windows) of epoch ``epoch``."""
        if not self.shuffle or self.shuffle_block <= 1:
            return position
        block, offset = divmod(position, self.shuffle_block)
        return block * self.shuffle_block + int(self._permutation(epoch, block)[offset])

    def locate(self, sequence: int) -> tuple[int, int]:
        """(epoch, window) of the dataset's ``sequence``-th sequence, counted across epochs."""
        epoch, position = divmod(sequence, self.windows)
        return epoch, self.window(epoch, position)
