"""A token stream's integrity checks on this rank (``shard_check`` says what each check costs).

``watch`` hands every shard a step's windows come from to the background hasher the first time; ``check_ids``
bounds a batch's ids by the manifests' ``max_token_id`` and names the shard and record of the first one above
it; ``error`` / ``wait`` report a hash mismatch. Only the rank's main process checks (loader workers only
read), and nothing here reads tokens.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections import OrderedDict
from collections.abc import Callable, Sequence

import numpy as np

from triarch.data_pipeline.errors import DataError
from triarch.data_pipeline.stream.index import EpochLayout
from triarch.data_pipeline.stream.shard_check import ShardHasher, VerifyMode, advice, wants_hash
from triarch.data_pipeline.stream.source import TokenSource

_RECENT_BLOCKS = 8

Origin = Callable[[int], tuple[int, int, int]]  # global sequence -> (dataset, epoch, window)


class StreamGuard:
    """Integrity checks of one stream over ``sources`` (read through ``layouts``); ``mode``: see
    ``shard_check``."""

    def __init__(self, sources: Sequence[TokenSource], layouts: Sequence[EpochLayout], seq_len: int,
                 mode: VerifyMode) -> None:
        self.sources, self.layouts, self.seq_len, self.mode = sources, layouts, seq_len, mode
        self.max_token_id = max(source.max_token_id for source in sources)
        self._hasher = ShardHasher()
        self._queued = [np.zeros(len(source.shard_tokens), dtype=bool) for source in sources]
        self._recent: OrderedDict[tuple[int, int, int], None] = OrderedDict()

    def watch_block(self, dataset: int, epoch: int, block: int) -> None:
        """Queue the shards of one shuffle block for hashing (each shard once)."""
        key = (dataset, epoch, block)
        if self.mode == "off" or key in self._recent:
            return
        self._recent[key] = None
        if len(self._recent) > _RECENT_BLOCKS:
            self._recent.popitem(last=False)
        layout, source, queued = self.layouts[dataset], self.sources[dataset], self._queued[dataset]
        first, stop = layout.block_windows(block)
        order, starts = layout.stream(epoch)
        lo, hi = first * self.seq_len, stop * self.seq_len + 1
        for position in range(bisect_right(starts, lo) - 1, min(bisect_left(starts, hi), len(order))):
            shard = order[position]
            if not queued[shard]:
                queued[shard] = True
                job = source.hash_job(shard)
                if wants_hash(self.mode, source.local, job.size):
                    self._hasher.submit(job)

    def check_ids(self, rows: np.ndarray, first: int, origin: Origin) -> None:
        """Raise a one-line DataError if ``rows`` (global sequences ``first, first + 1, ...``) hold an id above
        the manifests' ``max_token_id``, naming the shard and record of the first such id."""
        if not rows.size or int(rows.max()) <= self.max_token_id:
            return
        row, column = divmod(int(np.argmax(rows > self.max_token_id)), rows.shape[1])
        dataset, epoch, window = origin(first + row)
        order, starts = self.layouts[dataset].stream(epoch)
        position = window * self.seq_len + column
        index = bisect_right(starts, position) - 1
        shard, offset = order[index], position - starts[index]
        source = self.sources[dataset]
        batch, record = source.locate(shard, offset)
        raise DataError(f"{source.shard_url(shard)} record {record} (record batch {batch}, token {offset} of the "
                        f"shard) holds token id {int(rows[row, column])}, above the manifest's max_token_id "
                        f"{self.max_token_id}; {advice(source.url)}")

    def error(self) -> str | None:
        """The first hash mismatch found so far (None if none)."""
        return self._hasher.error

    def wait(self) -> str | None:
        """Finish hashing every shard queued so far; the first mismatch (None if none)."""
        return self._hasher.wait()

    def close(self) -> None:
        """Stop hashing and end the background thread (see ``ShardHasher.close``)."""
        self._hasher.close()
        self.mode = "off"
