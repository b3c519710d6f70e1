"""One shuffle block's stretch of an epoch stream, filled lazily, read with one vectorized gather per step.

A shuffle block of B windows covers stream tokens [b·B·T, (b·B + n)·T + 1) (n ≤ B windows). Those tokens
live in a run of record-batch pieces (a record batch clipped to the block). The span keeps one buffer the
size of the block and copies a piece in only when a requested window first touches it, so a DP rank reads
only the record batches its own windows need, and memory is bounded by the block size (pages never
written are never resident). Windows are then rows of one fancy index: no Python loop per sequence.
"""

from __future__ import annotations

from bisect import bisect_right

import numpy as np

from triarch.data_pipeline.stream_source import TokenSource


class Span:
    """Tokens ``[start, stop)`` of the stream concatenating ``source``'s shards in ``order``; ``buffer`` (a
    retired span's, when large enough) is reused instead of allocating."""

    def __init__(self, source: TokenSource, order: list[int], order_starts: list[int], start: int, stop: int,
                 buffer: np.ndarray | None = None) -> None:
        self.source = source
        self.start = start
        fits = buffer is not None and len(buffer) >= stop - start
        self.buffer = buffer if fits else np.empty(stop - start, dtype=np.uint32)
        self.tokens = self.buffer[:stop - start]
        bounds, pieces = [0], []  # span-relative piece starts; (shard, batch, first token within the batch)
        position = bisect_right(order_starts, start) - 1
        while order_starts[position] < stop:
            shard, shard_start = order[position], order_starts[position]
            batch_starts = source.batch_starts(shard)
            for batch in range(len(batch_starts) - 1):
                lo = max(start, shard_start + batch_starts[batch])
                hi = min(stop, shard_start + batch_starts[batch + 1])
                if lo < hi:
                    pieces.append((shard, batch, lo - shard_start - batch_starts[batch]))
                    bounds.append(hi - start)
            position += 1
        self.bounds = np.array(bounds, dtype=np.int64)
        self.pieces = pieces
        self.filled = np.zeros(len(pieces), dtype=bool)
        self.unfilled = len(pieces)
        self._columns = np.arange(0)

    def _fill(self, piece: int) -> None:
        shard, batch, offset = self.pieces[piece]
        lo, hi = int(self.bounds[piece]), int(self.bounds[piece + 1])
        self.tokens[lo:hi] = self.source.read_batch(shard, batch)[offset:offset + hi - lo]
        self.filled[piece] = True
        self.unfilled -= 1

    def gather(self, starts: np.ndarray, length: int, out: np.ndarray) -> None:
        """``out[i] = tokens [starts[i], starts[i] + length)`` of the stream (absolute stream offsets)."""
        relative = starts - self.start
        if self.unfilled:
            self._fill_for(relative, length)
        if len(self._columns) != length:
            self._columns = np.arange(length)
        out[...] = self.tokens[relative[:, None] + self._columns]

    def _fill_for(self, relative: np.ndarray, length: int) -> None:
        """Copy in the pieces that windows at span offsets ``relative`` touch and that are still missing."""
        first = np.searchsorted(self.bounds, relative, side="right") - 1
        last = np.searchsorted(self.bounds, relative + (length - 1), side="right") - 1
        if (last - first).max(initial=0) <= 1:
            needed = np.unique(np.concatenate([first, last]))
        else:  # windows longer than a record batch
            needed = np.unique(np.concatenate([np.arange(f, l + 1) for f, l in zip(first, last)]))
        for piece in needed[~self.filled[needed]].tolist():
            self._fill(piece)
