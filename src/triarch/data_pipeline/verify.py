"""``triarch data verify DIR``: check every shard of a prepared folder (local or fsspec URL) against its
manifest: size, sha256, token count, and every token id <= the shard's ``max_token_id`` (< vocab size).

Reads each shard once (memory-mapped locally; one whole-object read remotely, so memory is one shard).
Problems are reported per shard, as they are found, one line each; a folder that cannot be verified at all
(no manifest, unreachable) is a DataError. Built only from the pieces both halves share (``manifest``,
``shard_format``, ``fileio``), so it runs without prepare's libraries or a training stream.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
from fsspec import AbstractFileSystem
from fsspec.implementations.local import LocalFileSystem

from triarch.data_pipeline.fileio import fs_file_sha256
from triarch.data_pipeline.manifest import MANIFEST_NAME, load_manifest, open_folder
from triarch.data_pipeline.shard_format import TOKENS_COLUMN


@dataclass
class VerifyReport:
    """What ``verify_folder`` found: shards checked, tokens in them, and one line per bad file."""

    url: str
    shards: int = 0
    tokens: int = 0
    bad_shards: int = 0
    bad: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """The closing line."""
        if self.bad:
            tokenizer = "; the tokenizer file is bad" if len(self.bad) > self.bad_shards else ""
            return f"{self.url}: {self.bad_shards} of {self.shards} shards bad{tokenizer}"
        return (f"{self.url}: all {self.shards} shards good ({self.tokens} tokens; sizes, sha256 and token ids "
                f"checked against the manifest)")


def _token_problems(data: pa.Buffer | pa.NativeFile, entry: Mapping[str, Any], vocab_size: int) -> list[str]:
    """Problems of a shard's tokens: unreadable, wrong count, or an id above its max_token_id."""
    try:
        reader = pa.ipc.open_file(data)
        bound = min(entry["max_token_id"], vocab_size - 1)
        rows = tokens = 0
        for index in range(reader.num_record_batches):
            column = reader.get_batch(index).column(TOKENS_COLUMN)
            offsets = column.offsets.to_numpy(zero_copy_only=False)
            values = column.values.to_numpy(zero_copy_only=False)[offsets[0]:offsets[-1]]
            offsets = offsets - offsets[0]
            above = np.flatnonzero(values > bound)
            if len(above):
                row = int(np.searchsorted(offsets, above[0], side="right")) - 1
                return [f"record {rows + row} (record batch {index}) holds token id {int(values[above[0]])}, above "
                        f"max_token_id {entry['max_token_id']}"]
            rows += len(column)
            tokens += len(values)
    except (pa.ArrowException, OSError, KeyError) as exc:
        return [f"unreadable as Arrow token shard: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"]
    if tokens != entry["tokens"]:
        return [f"holds {tokens} tokens, the manifest says {entry['tokens']}"]
    return []


def _shard_problems(fs: AbstractFileSystem, path: str, entry: Mapping[str, Any], size: int | None,
                    vocab_size: int) -> list[str]:
    """Everything wrong with one shard file (empty when it matches its manifest entry)."""
    if size is None:
        return ["missing"]
    problems = []
    if entry.get("bytes") is not None and size != entry["bytes"]:
        problems.append(f"{size} bytes, the manifest says {entry['bytes']}")
    try:
        if isinstance(fs, LocalFileSystem):
            actual = fs_file_sha256(fs, path)
            data: pa.Buffer | pa.NativeFile = pa.memory_map(path, "r")
        else:
            raw = fs.cat_file(path)
            actual, data = hashlib.sha256(raw).hexdigest(), pa.py_buffer(raw)
    except OSError as exc:
        return [*problems, f"cannot read: {exc}"]
    if actual != entry["sha256"]:
        problems.append(f"sha256 {actual}, the manifest says {entry['sha256']}")
    return problems + _token_problems(data, entry, vocab_size)


def _sizes(fs: AbstractFileSystem, folder: str) -> dict[str, int]:
    try:
        return {item["name"].rstrip("/").rsplit("/", 1)[-1]: int(item.get("size") or 0)
                for item in fs.ls(folder, detail=True)}
    except FileNotFoundError:
        return {}


def verify_folder(url: str, *, storage_options: Mapping[str, Any] | None = None,
                  report: Callable[[str], None] | None = None) -> VerifyReport:
    """Check every shard (and the tokenizer file) of the prepared folder at ``url``; ``report`` is called with
    each bad file's line as it is found. Raises a one-line DataError if the folder cannot be verified."""
    url = str(url).rstrip("/") or "/"
    fs, root = open_folder(url, storage_options)
    manifest = load_manifest(fs, root, f"{url}/{MANIFEST_NAME}", accept_v1=True)
    result = VerifyReport(url)
    vocab_size = manifest["tokenizer"]["vocab_size"]
    listings: dict[str, dict[str, int]] = {}

    def size_of(file: str) -> int | None:
        folder = file.rpartition("/")[0]
        if folder not in listings:
            listings[folder] = _sizes(fs, f"{root}/{folder}" if folder else root)
        return listings[folder].get(file.rpartition("/")[2])

    def bad(file: str, problems: list[str]) -> None:
        line = f"{url}/{file}: {'; '.join(problems)}"
        result.bad.append(line)
        if report is not None:
            report(line)

    tokenizer = manifest["tokenizer"]
    if "file" in tokenizer:
        size = size_of(tokenizer["file"])
        try:
            sha = fs_file_sha256(fs, f"{root}/{tokenizer['file']}") if size is not None else None
        except OSError as exc:
            sha = f"unreadable ({exc})"
        if sha != tokenizer["sha256"]:
            bad(tokenizer["file"], ["missing"] if sha is None else [f"sha256 {sha}, the manifest says "
                                                                     f"{tokenizer['sha256']}"])
    for split in manifest["splits"].values():
        for entry in split["shards"]:
            problems = _shard_problems(fs, f"{root}/{entry['file']}", entry, size_of(entry["file"]), vocab_size)
            if problems:
                bad(entry["file"], problems)
                result.bad_shards += 1
            result.shards += 1
            result.tokens += entry["tokens"]
    return result
