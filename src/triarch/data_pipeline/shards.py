"""Arrow IPC token shards: one ``tokens: list<uint32>`` column, one row per document.

Files use the IPC *file* format so readers can memory-map them and view the tokens without copying.
Writes go to a temporary name, are fsynced, then renamed, so a shard path either holds a complete file
or nothing.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from triarch.data_pipeline.errors import DataError
from triarch.data_pipeline.fileio import file_sha256, replace_atomically, temp_path

TOKENS_COLUMN = "tokens"
TOKEN_DTYPE = np.uint32
SCHEMA = pa.schema([pa.field(TOKENS_COLUMN, pa.list_(pa.uint32()), nullable=False)])
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

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return asdict(self)


@dataclass(frozen=True)
class ShardTokens:
    """One shard's tokens in memory: flat values plus int32 document offsets (len = documents + 1)."""

    values: np.ndarray
    offsets: np.ndarray

    @property
    def documents(self) -> int:
        """Number of documents (rows)."""
        return len(self.offsets) - 1


def pack_documents(docs: list[np.ndarray]) -> ShardTokens:
    """Concatenate per-document token arrays into one flat array plus offsets."""
    lengths = np.fromiter((len(d) for d in docs), dtype=np.int64, count=len(docs))
    offsets = np.zeros(len(docs) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    if offsets[-1] > MAX_SHARD_TOKENS:
        raise DataError(f"shard of {offsets[-1]} tokens exceeds the {MAX_SHARD_TOKENS}-token limit")
    values = np.concatenate(docs).astype(TOKEN_DTYPE, copy=False) if docs else np.empty(0, TOKEN_DTYPE)
    return ShardTokens(values=values, offsets=offsets.astype(np.int32))


def write_shard(path: Path, shard: ShardTokens) -> None:
    """Write ``shard`` as an Arrow IPC file at ``path`` (temp file + fsync + rename)."""
    array = pa.ListArray.from_arrays(pa.array(shard.offsets, pa.int32()), pa.array(shard.values, pa.uint32()))
    table = pa.Table.from_arrays([array], schema=SCHEMA)
    tmp = temp_path(path)
    with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, SCHEMA) as writer:
        writer.write_table(table)
    replace_atomically(tmp, path)


def map_shard(path: Path) -> ShardTokens:
    """Memory-map a shard and view its tokens without copying (raises DataError if unreadable)."""
    try:
        table = pa.ipc.open_file(pa.memory_map(str(path), "r")).read_all()
    except (OSError, pa.ArrowInvalid) as exc:
        raise DataError(f"cannot read shard {path}: {str(exc).splitlines()[0]}") from exc
    if table.schema != SCHEMA:
        raise DataError(f"shard {path} has schema {table.schema.to_string(show_schema_metadata=False)!r}, "
                        f"expected {TOKENS_COLUMN}: list<uint32>")
    column = table.column(TOKENS_COLUMN)
    if column.num_chunks == 0:
        return ShardTokens(values=np.empty(0, TOKEN_DTYPE), offsets=np.zeros(1, np.int32))
    if column.num_chunks != 1:
        raise DataError(f"shard {path} has {column.num_chunks} record batches, expected 1")
    lists = column.chunk(0)
    offsets = lists.offsets.to_numpy(zero_copy_only=True)
    values = lists.values.to_numpy(zero_copy_only=True)[offsets[0]:offsets[-1]]
    return ShardTokens(values=values, offsets=offsets - offsets[0] if offsets[0] else offsets)


def shard_matches(path: Path, shard: ShardTokens) -> bool:
    """Whether ``path`` already holds exactly ``shard``'s documents and tokens."""
    if not path.is_file():
        return False
    try:
        existing = map_shard(path)
    except DataError:
        return False
    return np.array_equal(existing.offsets, shard.offsets) and np.array_equal(existing.values, shard.values)


def describe_shard(path: Path, root: Path, shard: ShardTokens) -> ShardInfo:
    """The manifest entry for a shard that has been written to ``path`` (hashes the file)."""
    return ShardInfo(
        file=path.relative_to(root).as_posix(),
        documents=shard.documents,
        tokens=int(len(shard.values)),
        max_token_id=int(shard.values.max()) if len(shard.values) else -1,
        bytes=path.stat().st_size,
        sha256=file_sha256(path),
    )
