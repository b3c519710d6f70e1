"""Cut one split's token stream into shards of a fixed token budget and write them, resumably.

Shard ``k`` of a split holds the documents that follow shard ``k - 1``'s, up to the first document end at
or past ``shard_tokens`` tokens, so its content depends only on the split's document order, never on
how the work was divided among tokenizer workers. A document longer than ``shard_tokens`` ("long") is
not kept whole: when it crosses a shard's budget the shard closes exactly at ``shard_tokens`` tokens and
the document goes on in the next shard, as a row of its own (only its last row ends with EOS). So every
shard holds at most ``shard_tokens`` tokens plus one short document, and memory stays bounded however
long a document is. A shard's ``documents`` counts the documents that end in it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from triarch.data_pipeline.fileio import fsync_dir, is_temp
from triarch.data_pipeline.prepare.journal import Journal, JournalEntry
from triarch.data_pipeline.prepare.shards import ShardInfo, ShardTokens, encode_shard, holds, write_shard

log = logging.getLogger(__name__)


def shard_name(index: int) -> str:
    """File name of the ``index``-th shard of a split."""
    return f"shard_{index:05d}.arrow"


class ShardCutter:
    """Accumulates tokenized documents (whole, or in pieces) and hands out complete shards (module docstring).

    ``carry``: tokens of an unfinished document already in earlier shards (a resumed run continues it);
    after each shard handed out, ``carry`` is that count for the shards so far.
    """

    def __init__(self, shard_tokens: int, carry: int = 0) -> None:
        self.shard_tokens = shard_tokens
        self.carry = carry
        self._values: list[np.ndarray] = []
        self._ends: list[np.ndarray] = []  # document ends, as positions from the buffer's start
        self._tokens = 0
        self._head = -carry  # where the document open at the buffer's start began (<= 0)

    def _last_end(self, ends: list[np.ndarray] | np.ndarray) -> int:
        """The last document end in ``ends`` (the buffer's, or a slice of it), else where the head began."""
        arrays = [ends] if isinstance(ends, np.ndarray) else ends
        for part in reversed(arrays):
            if len(part):
                return int(part[-1])
        return self._head

    @property
    def open_tokens(self) -> int:
        """Tokens added of a document not yet ended (including those in earlier shards)."""
        return self._tokens - self._last_end(self._ends)

    def add(self, values: np.ndarray, lengths: np.ndarray, closes: bool = True) -> Iterator[ShardTokens]:
        """Append documents (flat ``values``, per-document ``lengths``; with ``closes=False`` the last one is
        a piece of a document that goes on; the first may continue one); yield every shard now complete."""
        if not len(values):
            return
        ends = self._tokens + np.cumsum(lengths, dtype=np.int64)
        self._values.append(values)
        self._ends.append(ends if closes else ends[:-1])
        self._tokens = int(ends[-1])
        if self._tokens < self.shard_tokens:
            return
        values, ends = np.concatenate(self._values), np.concatenate(self._ends)
        start = 0
        while (cut := self._next_cut(start, ends)) is not None:
            yield self._shard(values, ends, start, cut)
            start = cut
        self._head = self._last_end(ends[ends <= start]) - start
        self._values, self._ends = [values[start:]], [ends[ends > start] - start]
        self._tokens -= start

    def _next_cut(self, start: int, ends: np.ndarray) -> int | None:
        """Where the shard that begins at ``start`` closes, or None while that is not yet known."""
        budget = self.shard_tokens
        target = start + budget
        if target > self._tokens:
            return None
        j = int(np.searchsorted(ends, target, side="left"))  # the first document end at or past the budget
        if j < len(ends):
            end = int(ends[j])
            begin = int(ends[j - 1]) if j else self._head
            return target if end - begin > budget and target < end else end
        begin = self._last_end(ends)
        return target if self._tokens - begin > budget else None  # the open document is long: cut it

    def _shard(self, values: np.ndarray, ends: np.ndarray, start: int, cut: int) -> ShardTokens:
        """Tokens ``[start, cut)`` of the buffer as a shard; sets ``carry``."""
        inside = ends[(ends > start) & (ends < cut)]
        offsets = np.concatenate([[start], inside, [cut]]).astype(np.int64) - start
        last_end = self._last_end(ends[ends <= cut])
        self.carry = cut - last_end
        return ShardTokens(values=values[start:cut], offsets=offsets, ends_open=last_end != cut)

    def flush(self) -> ShardTokens | None:
        """The last, smaller shard of whatever documents remain (None if none do)."""
        if self.open_tokens:
            raise ValueError(f"{self.open_tokens} tokens of an unfinished document remain")
        if not self._tokens:
            return None
        shard = self._shard(np.concatenate(self._values), np.concatenate(self._ends), 0, self._tokens)
        self._values, self._ends, self._tokens, self._head = [], [], 0, 0
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
        carry = resumed[-1].carry if resumed else 0
        self._skip = carry  # the resumed shards already hold this many tokens of the next document
        self._cutter = ShardCutter(shard_tokens, carry)

    def add(self, values: np.ndarray, lengths: np.ndarray, closes: bool = True) -> None:
        """Tokenized documents that follow everything added before (and everything resumed); ``closes``:
        see ``ShardCutter.add``. A document the resumed shards hold the start of comes whole (or its pieces
        do): its first ``carry`` tokens are dropped."""
        if self._skip:
            take = min(self._skip, int(lengths[0]))
            values, lengths = values[take:], np.concatenate([[lengths[0] - take], lengths[1:]]).astype(np.int64)
            self._skip -= take
            if not lengths[0]:
                return  # a piece wholly inside the resumed shards (it cannot end the document)
        for shard in self._cutter.add(values, lengths, closes):
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
        self.journal.record(JournalEntry(self.split, index, self.end_document, info, self._cutter.carry))
        self.shards.append(info)
