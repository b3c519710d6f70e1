"""Lazy token reads from one split of a prepared folder, local or on any fsspec filesystem (s3://, gs://, ...).

Only the manifest (and one listing per split folder, to check every shard's size: ``shard_check``) is read up
front. Tokens are read one Arrow record batch at a time
(``pa.ipc.open_file(f).get_batch(i)``). A local shard is memory-mapped (``pa.memory_map``): a batch's tokens
are a zero-copy view of the page cache, nothing is cached, and only a couple of shards stay mapped (their
touched pages count as resident while mapped). A remote shard is read through an fsspec file handle and
its batches are kept in a small LRU cache bounded in bytes. Either way memory stays flat however large the
dataset is.

A shard may hold any number of record batches. Their token counts come from the manifest entry's
``batch_tokens`` list (format 2, checked by ``manifest.load_manifest``, the one reader); a format-1 folder, prepared
before that list existed, is still read: its counts come from the file the first time a shard is opened
(a single-batch shard needs no read at all: its count is the shard's).

Everything opened (filesystem, file handles, cache) belongs to one process: after a fork (DataLoader
workers) it is dropped and reopened lazily, and pickling carries only the description.
"""

from __future__ import annotations

import hashlib
import os
from bisect import bisect_right
from collections import OrderedDict
from collections.abc import Mapping
from itertools import accumulate
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
from fsspec.implementations.local import LocalFileSystem

from triarch.data_pipeline.errors import DataError
from triarch.data_pipeline.manifest import MANIFEST_NAME, load_manifest
from triarch.data_pipeline.shard_format import TOKENS_COLUMN, has_token_column
from triarch.data_pipeline.stream.shard_check import HashJob, check_sizes

DEFAULT_CACHE_BYTES = 16 << 20
MAX_OPEN_SHARDS = 8
MAX_MAPPED_SHARDS = 2  # a block's fill walks its shards in order: each is mapped once per block
REMOTE_READ_BLOCK_BYTES = 1 << 20  # one ranged GET covers a typical record batch and its header


def data_fingerprint(shard_entries: list[dict[str, Any]]) -> str:
    """sha256 over the shards' own sha256s, in manifest order: names the exact tokens of a split."""
    return hashlib.sha256("".join(e["sha256"] for e in shard_entries).encode()).hexdigest()


class TokenSource:
    """One split of one prepared folder: shard token counts, and reads of any token range of any shard."""

    def __init__(self, url: str | Path, split: str, *, storage_options: Mapping[str, Any] | None = None,
                 cache_bytes: int = DEFAULT_CACHE_BYTES) -> None:
        self.url = str(url).rstrip("/") if str(url) != "/" else "/"
        self.split = split
        self.storage_options = dict(storage_options or {})
        self.cache_bytes = cache_bytes
        self._pid = -1
        manifest = self._read_manifest()
        self.local: bool = self._local  # memory-mapped, uncached reads (see the module docstring)
        if split not in manifest["splits"]:
            raise DataError(f"unknown split {split!r} in {self._where(MANIFEST_NAME)} "
                            f"(available: {', '.join(sorted(manifest['splits']))})")
        tokenizer = manifest["tokenizer"]
        self.vocab_size: int = tokenizer["vocab_size"]
        self.eos_id: int = tokenizer["eos_id"]
        self.tokenizer_sha256: str = tokenizer["sha256"]
        self._entries: list[dict[str, Any]] = manifest["splits"][split]["shards"]
        for entry in self._entries:
            if entry["max_token_id"] >= self.vocab_size:
                raise DataError(f"{self._where(entry['file'])} holds token id {entry['max_token_id']} "
                                f">= vocab_size {self.vocab_size}")
        self.max_token_id = max((e["max_token_id"] for e in self._entries), default=-1)
        self.shard_tokens = np.array([e["tokens"] for e in self._entries], dtype=np.int64)
        self.total_tokens = int(self.shard_tokens.sum())
        self.data_sha256 = data_fingerprint(self._entries)
        self._shard_sizes: list[int] = self.shard_tokens.tolist()
        self._batch_starts: list[list[int] | None] = [self._starts_from_manifest(e) for e in self._entries]
        check_sizes(self._fs, self._root, self.url, self._entries)

    # --- integrity (see shard_check) -----------------------------------------------------------------

    def shard_url(self, shard: int) -> str:
        """Where ``shard`` lives (for messages)."""
        return self._where(self._entries[shard]["file"])

    def hash_job(self, shard: int) -> HashJob:
        """What the background hasher needs to check ``shard`` against the manifest."""
        self._ensure_open()
        entry = self._entries[shard]
        return HashJob(fs=self._fs, path=f"{self._root}/{entry['file']}", where=self.shard_url(shard), url=self.url,
                       sha256=entry["sha256"], size=entry.get("bytes"))

    def locate(self, shard: int, offset: int) -> tuple[int, int]:
        """(record batch, row) of ``shard`` that holds its token ``offset`` (a row is a document, or a long
        document's part in this shard)."""
        starts = self.batch_starts(shard)
        batch = bisect_right(starts, offset) - 1
        column = self._reader(shard).get_batch(batch).column(TOKENS_COLUMN)
        offsets = column.offsets.to_numpy(zero_copy_only=False)
        rows_before = sum(self._reader(shard).get_batch(i).num_rows for i in range(batch))
        row = int(np.searchsorted(offsets - offsets[0], offset - starts[batch], side="right")) - 1
        return batch, rows_before + row

    # --- process-local state -------------------------------------------------------------------------

    def _ensure_open(self) -> None:
        """(Re)create the filesystem and empty caches in a new process (first use, or after a fork)."""
        if self._pid == os.getpid():
            return
        self._fs, self._root = fsspec.core.url_to_fs(self.url, **self.storage_options)
        self._local = isinstance(self._fs, LocalFileSystem)
        self._files: OrderedDict[int, tuple[Any, pa.ipc.RecordBatchFileReader]] = OrderedDict()
        self._cache: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()
        self._cached_bytes = 0
        self._pid = os.getpid()

    def __getstate__(self) -> dict[str, Any]:
        state = {k: v for k, v in self.__dict__.items() if k not in ("_fs", "_root", "_files", "_cache")}
        state["_pid"] = -1
        return state

    def _where(self, relative: str) -> str:
        return f"{self.url}/{relative}"

    def _read_manifest(self) -> dict[str, Any]:
        self._ensure_open()
        return load_manifest(self._fs, self._root, self._where(MANIFEST_NAME), accept_v1=True)

    # --- record batches ------------------------------------------------------------------------------

    def _starts_from_manifest(self, entry: dict[str, Any]) -> list[int] | None:
        counts = entry.get("batch_tokens")
        if counts is None:
            return None
        if not isinstance(counts, list) or sum(counts) != entry["tokens"]:
            raise DataError(f"{self._where(MANIFEST_NAME)}: batch_tokens of {entry['file']} do not sum to "
                            f"its {entry['tokens']} tokens")
        return [0, *accumulate(counts)]

    def _reader(self, shard: int) -> pa.ipc.RecordBatchFileReader:
        """The open IPC reader of ``shard`` (a few stay open, least recently used closed first)."""
        self._ensure_open()
        if shard in self._files:
            self._files.move_to_end(shard)
            return self._files[shard][1]
        file = self._entries[shard]["file"]
        try:
            if self._local:
                handle = pa.memory_map(f"{self._root}/{file}", "r")
            else:
                handle = self._fs.open(f"{self._root}/{file}", "rb", cache_type="readahead",
                                       block_size=REMOTE_READ_BLOCK_BYTES)
            reader = pa.ipc.open_file(handle)
        except (OSError, pa.ArrowInvalid) as exc:
            raise DataError(f"cannot read shard {self._where(file)}: {str(exc).splitlines()[0]}") from exc
        if not has_token_column(reader.schema):
            raise DataError(f"shard {self._where(file)} has schema "
                            f"{reader.schema.to_string(show_schema_metadata=False)!r}, expected "
                            f"{TOKENS_COLUMN}: list<uint32>")
        self._files[shard] = (handle, reader)
        if len(self._files) > (MAX_MAPPED_SHARDS if self._local else MAX_OPEN_SHARDS):
            old_handle, _ = self._files.popitem(last=False)[1]
            old_handle.close()
        return reader

    def batch_starts(self, shard: int) -> list[int]:
        """Token offsets of ``shard``'s record batches within the shard (length batches + 1)."""
        starts = self._batch_starts[shard]
        if starts is None:
            reader = self._reader(shard)
            if reader.num_record_batches == 1:
                counts = [self._shard_sizes[shard]]
            else:  # no batch_tokens in the manifest: count each batch once (zero-copy for local files)
                counts = [len(self._values(reader.get_batch(i), shard, i)) for i in range(reader.num_record_batches)]
            starts = [0, *accumulate(counts)]
            if starts[-1] != self._shard_sizes[shard]:
                raise DataError(f"{self._where(self._entries[shard]['file'])} holds {starts[-1]} tokens, "
                                f"manifest says {self._shard_sizes[shard]}")
            self._batch_starts[shard] = starts
        return starts

    def _values(self, batch: pa.RecordBatch, shard: int, index: int) -> np.ndarray:
        """The batch's tokens as a zero-copy uint32 view (plain buffers: no pyarrow.compute import)."""
        column = batch.column(TOKENS_COLUMN)
        values = column.values
        if column.null_count or values.null_count:
            raise DataError(f"{self._where(self._entries[shard]['file'])} batch {index} has null tokens")
        if len(column) == 0:
            return np.empty(0, dtype=np.uint32)
        flat = np.frombuffer(values.buffers()[1], dtype=np.uint32, count=values.offset + len(values))
        return flat[values.offset:][column.offsets[0].as_py():column.offsets[-1].as_py()]

    def read_batch(self, shard: int, index: int) -> np.ndarray:
        """Tokens of record batch ``index`` of ``shard`` as a uint32 view (cached; do not modify)."""
        if self._pid != os.getpid():
            self._ensure_open()
        return self._batch(shard, index)

    def _batch(self, shard: int, index: int) -> np.ndarray:
        """Tokens of record batch ``index`` of ``shard`` (uint32), from the cache or read now."""
        key = (shard, index)
        values = self._cache.get(key)
        if values is not None:
            self._cache.move_to_end(key)
            return values
        starts = self.batch_starts(shard)
        try:
            values = self._values(self._reader(shard).get_batch(index), shard, index)
        except (OSError, pa.ArrowInvalid) as exc:
            where = self._where(self._entries[shard]["file"])
            raise DataError(f"cannot read batch {index} of {where}: {str(exc).splitlines()[0]}") from exc
        if len(values) != starts[index + 1] - starts[index]:
            raise DataError(f"{self._where(self._entries[shard]['file'])} batch {index} holds {len(values)} "
                            f"tokens, expected {starts[index + 1] - starts[index]}")
        if self._local:  # a view of the mapped file: caching it would only keep the mapping resident
            return values
        self._cache[key] = values
        self._cached_bytes += values.nbytes
        while self._cached_bytes > self.cache_bytes and len(self._cache) > 1:
            self._cached_bytes -= self._cache.popitem(last=False)[1].nbytes
        return values

    # --- token ranges --------------------------------------------------------------------------------

    def _copy_shard_range(self, shard: int, start: int, out: np.ndarray) -> None:
        """Fill ``out`` with tokens ``[start, start + len(out))`` of ``shard`` (which must hold them)."""
        starts = self.batch_starts(shard)
        index = bisect_right(starts, start) - 1
        done = 0
        while done < len(out):
            values = self._batch(shard, index)
            offset = start + done - starts[index]
            piece = values[offset:offset + len(out) - done]
            out[done:done + len(piece)] = piece
            done += len(piece)
            index += 1

    def copy_stream_range(self, order: list[int], order_starts: list[int], start: int, out: np.ndarray) -> None:
        """Fill ``out`` from the stream that concatenates shards ``order`` (prefix sums ``order_starts``).

        The common case, a range inside one record batch, is one lookup and one copy (this is the hot loop).
        """
        if self._pid != os.getpid():
            self._ensure_open()
        position = bisect_right(order_starts, start) - 1
        shard = order[position]
        offset = start - order_starts[position]
        starts = self._batch_starts[shard] or self.batch_starts(shard)
        index = bisect_right(starts, offset) - 1
        if offset + len(out) <= starts[index + 1]:
            local = offset - starts[index]
            out[:] = self._batch(shard, index)[local:local + len(out)]
            return
        done = 0
        while done < len(out):
            shard = order[position]
            offset = start + done - order_starts[position]
            take = min(len(out) - done, self._shard_sizes[shard] - offset)
            if take > 0:
                self._copy_shard_range(shard, offset, out[done:done + take])
                done += take
            position += 1

    def cache_info(self) -> dict[str, int]:
        """Cached record batches and their bytes in this process (for tests and benchmarks)."""
        self._ensure_open()
        return {"batches": len(self._cache), "bytes": self._cached_bytes, "open_shards": len(self._files)}
