"""Cut one split's token stream into shards of a fixed token budget and write them, resumably.

Shard ``k`` of a split holds the documents that follow shard ``k - 1``'s, up to the first document end at
or past ``shard_tokens`` tokens, so its content depends only on the split's document order, never on
how the work was divided among tokenizer workers.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from triarch.data_pipeline.fileio import fsync_dir, is_temp
from triarch.data_pipeline.journal import Journal, JournalEntry
from triarch.data_pipeline.shards import ShardInfo, ShardTokens, encode_shard, holds, write_shard

log = logging.getLogger(__name__)


def shard_name(index: int) -> str:
    """File name of the ``index``-th shard of a split."""
    return f"shard_{index:05d}.arrow"


class ShardCutter:
    """Accumulates tokenized documents and hands out complete shards of about ``shard_tokens`` tokens."""

    def __init__(self, shard_tokens: int) -> None:
        self.shard_tokens = shard_tokens
        self._values: list[np.ndarray] = []
        self._lengths: list[np.ndarray] = []
        self._tokens = 0

    def add(self, values: np.ndarray, lengths: np.ndarray) -> Iterator[ShardTokens]:
        """Append documents (flat ``values``, per-document ``lengths``); yield every shard now complete."""
        self._values.append(values)
        self._lengths.append(lengths)
        self._tokens += len(values)
        if self._tokens < self.shard_tokens:
            return
        values, lengths = np.concatenate(self._values), np.concatenate(self._lengths)
        offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        start = 0
        while offsets[-1] - offsets[start] >= self.shard_tokens:
            end = int(np.searchsorted(offsets, offsets[start] + self.shard_tokens, side="left"))
            yield ShardTokens(values=values[offsets[start]:offsets[end]],
                              offsets=offsets[start:end + 1] - offsets[start])
            start = end
        self._values, self._lengths = [values[offsets[start]:]], [lengths[start:]]
        self._tokens = int(offsets[-1] - offsets[start])

    def flush(self) -> ShardTokens | None:
        """The last, smaller shard of whatever documents remain (None if none do)."""
        lengths = np.concatenate(self._lengths) if self._lengths else np.empty(0, np.int64)
        if not len(lengths):
            return None
        offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        shard = ShardTokens(values=np.concatenate(self._values), offsets=offsets)
        self._values, self._lengths, self._tokens = [], [], 0
        return shard


class SplitWriter:
    """Writes one split's shards under ``root/split``, resuming after the shards the journal vouches for."""

    def __init__(self, root: Path, split: str, shard_tokens: int, batch_tokens: int, journal: Journal) -> None:
        self.root = root
        self.split = split
        self.dir = root / split
        self.dir.mkdir(parents=True, exist_ok=True)
        for path in self.dir.iterdir():
            if is_temp(path):
                path.unlink()
        self.batch_tokens = batch_tokens
        self.journal = journal
        resumed = journal.resumable(split)
        self.shards: list[ShardInfo] = [entry.shard for entry in resumed]
        self.resumed_documents = resumed[-1].end_document if resumed else 0
        self.end_document = self.resumed_documents
        self.written = 0
        self._cutter = ShardCutter(shard_tokens)

    def add(self, values: np.ndarray, lengths: np.ndarray) -> None:
        """Tokenized documents that follow everything added before (and everything resumed)."""
        for shard in self._cutter.add(values, lengths):
            self._emit(shard)

    def finish(self) -> list[ShardInfo]:
        """Write the last shard, delete leftovers of earlier attempts, return every shard's entry."""
        last = self._cutter.flush()
        if last is not None:
            self._emit(last)
        keep = {shard_name(i) for i in range(len(self.shards))}
        for path in self.dir.iterdir():
            if is_temp(path) or (path.suffix == ".arrow" and path.name not in keep):
                path.unlink()
        fsync_dir(self.dir)  # every rename is durable before the manifest says the folder is complete
        return self.shards

    def _emit(self, shard: ShardTokens) -> None:
        """Write (or keep, if an identical file is there) the next shard and journal it."""
        index = len(self.shards)
        path = self.dir / shard_name(index)
        encoded = encode_shard(shard, self.batch_tokens)
        if holds(path, encoded):
            log.debug("keeping identical %s", path)
        else:
            write_shard(path, encoded.data)
            self.written += 1
        info = encoded.info(path.relative_to(self.root).as_posix())
        self.end_document += shard.documents
        self.journal.record(JournalEntry(self.split, index, self.end_document, info))
        self.shards.append(info)
