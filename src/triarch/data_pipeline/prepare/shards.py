"""Write Arrow IPC token shards (the schema: ``shard_format``): one ``tokens: list<uint32>`` column, one row per
document.

A shard file holds several record batches of about ``batch_tokens`` tokens each (a batch closes at the first
document end at or past the budget), so a streaming reader can fetch and shuffle a shard batch by batch.
Files use the IPC *file* format so readers can memory-map them and view the tokens without copying.
A shard is serialized in memory, hashed, then written to a temporary name, fsynced and renamed, so a shard
path either holds a complete file or nothing.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from triarch.data_pipeline.errors import DataError
from triarch.data_pipeline.fileio import file_sha256, replace_atomically, temp_path
from triarch.data_pipeline.shard_format import SCHEMA, TOKEN_DTYPE, TOKENS_COLUMN

MAX_SHARD_TOKENS = 2**31 - 1  # list<> offsets are int32


@dataclass(frozen=True)
class ShardInfo:
    """What the manifest records about one shard file (``file`` is relative to the prepared folder)."""

    file: str
    documents: int
    tokens: int
    max_token_id: int
    bytes: int
    sha256: str
    batch_tokens: tuple[int, ...]

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        entry = asdict(self)
        entry["batch_tokens"] = list(self.batch_tokens)
        return entry

    @classmethod
    def from_json(cls, entry: dict[str, Any]) -> ShardInfo:
        """The inverse of ``to_json`` (raises KeyError / TypeError on a malformed entry)."""
        return cls(**{**entry, "batch_tokens": tuple(entry["batch_tokens"])})


@dataclass(frozen=True)
class ShardTokens:
    """Rows in memory: flat token values plus row offsets (len = rows + 1, first is 0). A row is a document,
    or the part of a long document in this shard; ``ends_open``: the last row's document goes on."""

    values: np.ndarray
    offsets: np.ndarray
    ends_open: bool = False

    @property
    def rows(self) -> int:
        """Number of rows."""
        return len(self.offsets) - 1

    @property
    def documents(self) -> int:
        """Number of documents that end in this shard."""
        return self.rows - self.ends_open


@dataclass(frozen=True)
class EncodedShard:
    """A shard serialized as Arrow IPC bytes, with what the manifest records about it."""

    data: pa.Buffer
    sha256: str
    documents: int
    tokens: int
    max_token_id: int
    batch_tokens: tuple[int, ...]

    def info(self, file: str) -> ShardInfo:
        """The manifest entry of this shard stored at ``file`` (relative to the prepared folder)."""
        return ShardInfo(file=file, documents=self.documents, tokens=self.tokens, max_token_id=self.max_token_id,
                         bytes=self.data.size, sha256=self.sha256, batch_tokens=self.batch_tokens)


def greedy_cuts(offsets: np.ndarray, budget: int) -> list[int]:
    """Document indices that close each group: a group closes at the first document end >= ``budget`` tokens.

    ``offsets`` are cumulative document starts (len = documents + 1). The last group may be smaller.
    """
    cuts: list[int] = []
    start, documents = 0, len(offsets) - 1
    while start < documents:
        end = int(np.searchsorted(offsets, offsets[start] + budget, side="left"))
        end = min(max(end, start + 1), documents)
        cuts.append(end)
        start = end
    return cuts


def _record_batch(values: np.ndarray, offsets: np.ndarray) -> pa.RecordBatch:
    """One record batch of the documents ``offsets`` delimits inside ``values``."""
    base = int(offsets[0])
    local = (offsets - base).astype(np.int32)
    lists = pa.ListArray.from_arrays(pa.array(local, pa.int32()),
                                     pa.array(values[base:int(offsets[-1])], pa.uint32()))
    return pa.RecordBatch.from_arrays([lists], schema=SCHEMA)


def encode_shard(shard: ShardTokens, batch_tokens: int) -> EncodedShard:
    """Serialize ``shard`` as an Arrow IPC file with record batches of about ``batch_tokens`` tokens."""
    tokens = int(shard.offsets[-1] - shard.offsets[0])
    if tokens > MAX_SHARD_TOKENS:
        raise DataError(f"shard of {tokens} tokens exceeds the {MAX_SHARD_TOKENS}-token limit")
    offsets = shard.offsets.astype(np.int64, copy=False)
    sink = pa.BufferOutputStream()
    counts: list[int] = []
    with pa.ipc.new_file(sink, SCHEMA) as writer:
        start = 0
        for end in greedy_cuts(offsets, batch_tokens):
            writer.write_batch(_record_batch(shard.values, offsets[start:end + 1]))
            counts.append(int(offsets[end] - offsets[start]))
            start = end
    data = sink.getvalue()
    values = shard.values[int(offsets[0]):int(offsets[-1])]
    return EncodedShard(data=data, sha256=hashlib.sha256(data).hexdigest(), documents=shard.documents,
                        tokens=tokens, max_token_id=int(values.max()) if len(values) else -1,
                        batch_tokens=tuple(counts))


def write_shard(path: Path, data: pa.Buffer | bytes) -> None:
    """Write serialized shard ``data`` to ``path`` (temp file + fsync + rename; the caller fsyncs the folder)."""
    tmp = temp_path(path)
    with open(tmp, "wb") as f:
        f.write(memoryview(data))
    replace_atomically(tmp, path, sync_dir=False)


def holds(path: Path, encoded: EncodedShard) -> bool:
    """Whether ``path`` already holds exactly ``encoded``'s bytes (size first, then sha256)."""
    try:
        if os.path.getsize(path) != encoded.data.size:
            return False
    except OSError:
        return False
    return file_sha256(path) == encoded.sha256


def _open_table(path: Path) -> pa.Table:
    """Memory-map a shard file and check its schema."""
    try:
        table = pa.ipc.open_file(pa.memory_map(str(path), "r")).read_all()
    except (OSError, pa.ArrowInvalid) as exc:
        raise DataError(f"cannot read shard {path}: {str(exc).splitlines()[0]}") from exc
    if table.schema != SCHEMA:
        raise DataError(f"shard {path} has schema {table.schema.to_string(show_schema_metadata=False)!r}, "
                        f"expected {TOKENS_COLUMN}: list<uint32>")
    return table


def _view(lists: pa.ListArray) -> ShardTokens:
    """Zero-copy numpy views of one record batch's documents."""
    offsets = lists.offsets.to_numpy(zero_copy_only=True)
    values = lists.values.to_numpy(zero_copy_only=True)[offsets[0]:offsets[-1]]
    return ShardTokens(values=values, offsets=offsets - offsets[0] if offsets[0] else offsets)


def map_shard_batches(path: Path) -> list[ShardTokens]:
    """Memory-map a shard and view each record batch's tokens without copying (DataError if unreadable)."""
    return [_view(chunk) for chunk in _open_table(path).column(TOKENS_COLUMN).chunks]


def map_shard(path: Path) -> ShardTokens:
    """All of a shard's documents as one array pair: a zero-copy view for a single record batch, else a copy."""
    batches = map_shard_batches(path)
    if not batches:
        return ShardTokens(values=np.empty(0, TOKEN_DTYPE), offsets=np.zeros(1, np.int64))
    if len(batches) == 1:
        return batches[0]
    starts = np.cumsum([0] + [int(b.offsets[-1]) for b in batches[:-1]])
    pieces = [b.offsets[1:].astype(np.int64) + start for b, start in zip(batches, starts, strict=True)]
    offsets = np.concatenate([np.zeros(1, np.int64), *pieces])
    return ShardTokens(values=np.concatenate([b.values for b in batches]), offsets=offsets)
