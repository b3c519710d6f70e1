"""Read the documents of one input file, counting bad ones by reason instead of failing.

``SourceReader(source, text_field)`` yields each document's text, or a ``BadDocument`` naming why a record
was skipped; once exhausted it knows the file's size and sha256 (hashed while reading, so a remote file is
fetched once, except Parquet and Arrow IPC *file* format, which need random access and are hashed in a
second sequential read). A file that cannot be read at all raises a one-line ``DataError`` naming it.

- ``.txt``: the whole file is one document.
- ``.jsonl``: one JSON object per line, the text in ``text_field``; blank lines are skipped.
- ``.parquet`` / ``.arrow``: one row per document, the text in column ``text_field`` (string or binary).
"""

from __future__ import annotations

import hashlib
import json
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from itertools import repeat
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import zstandard

from triarch.data_pipeline.errors import DataError
from triarch.data_pipeline.prepare.sources import SourceFile, open_source

INVALID_UTF8 = "invalid_utf8"
EMPTY_TEXT = "empty_text"
MISSING_FIELD = "missing_field"
NON_STRING_FIELD = "non_string_field"
INVALID_JSON = "invalid_json"
TRUNCATED_COMPRESSION = "truncated_compression"
CORRUPT_COMPRESSION = "corrupt_compression"
BAD_REASONS = (INVALID_UTF8, EMPTY_TEXT, MISSING_FIELD, NON_STRING_FIELD, INVALID_JSON, TRUNCATED_COMPRESSION,
               CORRUPT_COMPRESSION)

READ_BYTES = 1 << 20
COMPRESSED_READ_BYTES = 1 << 16  # compressed input per step; bounds the decompressed output of one step
GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
ROWS_PER_BATCH = 4096
_ARROW_FILE_MAGIC = b"ARROW1"


@dataclass(frozen=True)
class BadDocument:
    """A record that was skipped, and why (one of ``BAD_REASONS``)."""

    reason: str


BAD = {reason: BadDocument(reason) for reason in BAD_REASONS}


class _Damaged(Exception):
    """The compressed stream broke after some documents were read (the rest of the file is lost)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class _Unreadable(Exception):
    """The file is not what its name says (e.g. not gzip at all)."""


class HashingReader:
    """A read-only binary stream that hashes and counts every byte read through it."""

    def __init__(self, raw: Any) -> None:
        self._raw = raw
        self.digest = hashlib.sha256()
        self.bytes_read = 0
        self.closed = False

    def read(self, size: int = -1) -> bytes:
        data = self._raw.read(size)
        self.digest.update(data)
        self.bytes_read += len(data)
        return data

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def drain(self) -> None:
        """Read (and hash) whatever is left."""
        while self.read(READ_BYTES):
            pass


def document_bytes(text: str) -> bytes | BadDocument:
    """The UTF-8 bytes of an accepted document, or why it is rejected (blank, or lone surrogates)."""
    if not text or text.isspace():
        return BAD[EMPTY_TEXT]
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        return BAD[INVALID_UTF8]


# --- byte streams ---------------------------------------------------------------------------------------


def _gzip_decoder() -> Any:
    return zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)


def _decompressed_chunks(stream: HashingReader, new_decoder: Callable[[], Any], magic: bytes,
                         name: str) -> Iterator[bytes]:
    """Decode every member / frame of a compressed stream.

    A file that does not start with ``magic`` is unreadable; a decoding error later is a corrupt stream,
    and a member cut short by the end of the file a truncated one (both end the file's documents).
    """
    data = stream.read(COMPRESSED_READ_BYTES)
    if not data:
        return
    if not data.startswith(magic):
        raise _Unreadable(f"not a {name} file")
    decoder, fed = new_decoder(), False
    try:
        while data:
            while data:
                out = decoder.decompress(data)
                fed = True
                if out:
                    yield out
                if decoder.eof:  # next member / frame, if any, starts in the unused bytes
                    data, decoder, fed = decoder.unused_data, new_decoder(), False
                else:
                    data = b""
            data = stream.read(COMPRESSED_READ_BYTES)
    except (zlib.error, zstandard.ZstdError):
        raise _Damaged(CORRUPT_COMPRESSION) from None
    if fed:
        raise _Damaged(TRUNCATED_COMPRESSION)


def _chunks(stream: HashingReader, compression: str | None) -> Iterator[bytes]:
    """The file's (decompressed) bytes in chunks."""
    if compression == "gzip":
        yield from _decompressed_chunks(stream, _gzip_decoder, GZIP_MAGIC, "gzip")
    elif compression == "zstd":
        yield from _decompressed_chunks(stream, zstandard.ZstdDecompressor().decompressobj, ZSTD_MAGIC, "zstd")
    else:
        while chunk := stream.read(READ_BYTES):
            yield chunk


def _lines(chunks: Iterator[bytes]) -> Iterator[bytes]:
    """Lines (without ``\\n``) of a chunked byte stream; a partial line cut off by an error is dropped."""
    rest = b""
    for chunk in chunks:
        lines = chunk.split(b"\n")
        if rest:
            lines[0] = rest + lines[0]
        rest = lines.pop()
        yield from lines
    if rest:
        yield rest


# --- formats --------------------------------------------------------------------------------------------


def _decode(data: bytes) -> str | BadDocument:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return BAD[INVALID_UTF8]


def _txt_documents(stream: HashingReader, compression: str | None) -> Iterator[str | BadDocument]:
    try:
        data = b"".join(_chunks(stream, compression))
    except _Damaged as damage:
        yield BAD[damage.reason]
        return
    text = _decode(data)
    del data  # not held while the (possibly very long) document is tokenized
    yield text


def _json_document(line: bytes, field: str) -> str | BadDocument:
    text = _decode(line)
    if isinstance(text, BadDocument):
        return text
    try:
        record = json.loads(text.lstrip("\ufeff"))
    except (ValueError, RecursionError):
        return BAD[INVALID_JSON]
    if not isinstance(record, dict) or record.get(field) is None:
        return BAD[MISSING_FIELD]
    value = record[field]
    return value if isinstance(value, str) else BAD[NON_STRING_FIELD]


def _jsonl_documents(stream: HashingReader, compression: str | None, field: str) -> Iterator[str | BadDocument]:
    try:
        for line in _lines(_chunks(stream, compression)):
            if line and not line.isspace():
                yield _json_document(line, field)
    except _Damaged as damage:
        yield BAD[damage.reason]


def _binary_values(column: pa.Array) -> Iterator[str | BadDocument]:
    for value in column.to_pylist():
        yield BAD[MISSING_FIELD] if value is None else _decode(value)


def column_documents(column: pa.Array) -> Iterator[str | BadDocument]:
    """Documents of one text column chunk: strings (or UTF-8 binary); nulls and other types are bad."""
    kind = column.type
    if pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_string_view(kind):
        try:
            values = column.to_pylist()
        except UnicodeDecodeError:  # invalid UTF-8 stored in a string column: decode value by value
            target = pa.large_binary() if pa.types.is_large_string(kind) else pa.binary()
            yield from _binary_values(column.cast(target))
            return
        for value in values:
            yield BAD[MISSING_FIELD] if value is None else value
    elif pa.types.is_binary(kind) or pa.types.is_large_binary(kind) or pa.types.is_binary_view(kind):
        yield from _binary_values(column)
    else:
        for valid in column.is_valid().to_pylist():
            yield BAD[NON_STRING_FIELD] if valid else BAD[MISSING_FIELD]


def _batch_documents(batch: pa.RecordBatch, field: str) -> Iterator[str | BadDocument]:
    if field not in batch.schema.names:
        return repeat(BAD[MISSING_FIELD], batch.num_rows)
    return column_documents(batch.column(field))


def _parquet_documents(source: SourceFile, field: str) -> Iterator[str | BadDocument]:
    with open_source(source) as f:
        parquet = pq.ParquetFile(f)
        if field not in parquet.schema_arrow.names:
            yield from repeat(BAD[MISSING_FIELD], parquet.metadata.num_rows)
            return
        for batch in parquet.iter_batches(batch_size=ROWS_PER_BATCH, columns=[field]):
            yield from column_documents(batch.column(0))


def _arrow_documents(source: SourceFile, stream: HashingReader, field: str) -> Iterator[str | BadDocument]:
    """An Arrow IPC stream (what ``save_to_disk`` writes) read as it arrives, or an IPC file."""
    with open_source(source) as f:
        is_file_format = f.read(len(_ARROW_FILE_MAGIC)) == _ARROW_FILE_MAGIC
    if not is_file_format:
        for batch in pa.ipc.open_stream(stream):
            yield from _batch_documents(batch, field)
        return
    with open_source(source) as f:
        reader = pa.ipc.open_file(f)
        for i in range(reader.num_record_batches):
            yield from _batch_documents(reader.get_batch(i), field)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class SourceReader:
    """The documents of one file (see the module docstring); ``sha256`` and ``size`` are set once exhausted."""

    def __init__(self, source: SourceFile, text_field: str) -> None:
        self.source = source
        self.text_field = text_field
        self.sha256: str | None = None
        self.size = 0
        self._stream: HashingReader | None = None

    @property
    def bytes_read(self) -> int:
        """Bytes of the file consumed so far (for progress)."""
        return self._stream.bytes_read if self._stream is not None else 0

    def _documents(self, stream: HashingReader) -> Iterator[str | BadDocument]:
        source = self.source
        if source.format == "txt":
            return _txt_documents(stream, source.compression)
        if source.format == "jsonl":
            return _jsonl_documents(stream, source.compression, self.text_field)
        if source.format == "parquet":
            return _parquet_documents(source, self.text_field)
        return _arrow_documents(source, stream, self.text_field)

    def __iter__(self) -> Iterator[str | BadDocument]:
        try:
            with open_source(self.source) as raw:
                self._stream = stream = HashingReader(raw)
                yield from self._documents(stream)
                stream.drain()
        except DataError:
            raise
        except (OSError, pa.ArrowException, _Unreadable, zstandard.ZstdError, ValueError) as exc:
            raise DataError(f"cannot read '{self.source.url}': {_first_line(exc)}") from exc
        self.sha256 = stream.digest.hexdigest()
        self.size = stream.bytes_read
