"""One shuffle block of an epoch stream in one buffer, its windows read as rows of a strided view.

A shuffle block of n windows (first window f, sequence length T) covers stream tokens [f·T, (f + n)·T + 1).
Those tokens live in a run of record-batch pieces (a record batch clipped to the block). The span keeps one
buffer the size of the block. From a local (memory-mapped) source it copies every piece in at once, a
plain memcpy per piece; from a remote source it copies a piece in only when a requested window first
touches it, so a DP rank fetches only the record batches its own windows need (pages never written are
never resident). Window w is row w - f of a zero-copy ``(n, T + 1)`` view with stride T, so a step's rows
are one fancy index along the first axis: no Python loop and no index arithmetic per sequence.
"""

from __future__ import annotations

from bisect import bisect_right

import numpy as np

from triarch.data_pipeline.stream.source import TokenSource


class Span:
    """Windows ``[first, first + count)`` (``seq_len + 1`` tokens each, stride ``seq_len``) of the stream that
    concatenates ``source``'s shards in ``order``; ``buffer`` (a retired span's, when large enough) is reused
    instead of allocating."""

    def __init__(self, source: TokenSource, order: list[int], order_starts: list[int], first: int, count: int,
                 seq_len: int, buffer: np.ndarray | None = None) -> None:
        start, stop = first * seq_len, (first + count) * seq_len + 1
        self.source = source
        self.seq_len = seq_len
        fits = buffer is not None and len(buffer) >= stop - start
        self.buffer = buffer if fits else np.empty(stop - start, dtype=np.uint32)
        self.tokens = self.buffer[:stop - start]
        item = self.tokens.itemsize
        self.windows = np.lib.stride_tricks.as_strided(self.tokens, shape=(count, seq_len + 1),
                                                       strides=(seq_len * item, item), writeable=False)
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
        if source.local:  # a memcpy per piece from the page cache: cheaper than tracking what is needed
            for piece in range(len(pieces)):
                self._fill(piece)

    def _fill(self, piece: int) -> None:
        shard, batch, offset = self.pieces[piece]
        lo, hi = int(self.bounds[piece]), int(self.bounds[piece + 1])
        self.tokens[lo:hi] = self.source.read_batch(shard, batch)[offset:offset + hi - lo]
        self.filled[piece] = True
        self.unfilled -= 1

    def rows(self, windows: np.ndarray) -> np.ndarray:
        """Rows of block-relative ``windows`` (int64 array) as a new ``(len(windows), seq_len + 1)`` uint32 array."""
        if self.unfilled:
            self._fill_for(windows * self.seq_len, self.seq_len + 1)
        return self.windows[windows]

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
