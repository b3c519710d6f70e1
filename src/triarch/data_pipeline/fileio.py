"""Small file helpers shared by the writers and readers: atomic replace and content hashing.

Kept free of third-party imports (checkpointing uses it too); ``fs_file_sha256`` takes an fsspec
filesystem that the caller already has.
"""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fsspec import AbstractFileSystem

_HASH_CHUNK_BYTES = 1 << 22


def temp_path(path: Path) -> Path:
    """A sibling temporary name for ``path``, unique per process; ``is_temp`` recognises it."""
    return path.with_name(f"{path.name}.tmp-{os.getpid()}")


def is_temp(path: Path) -> bool:
    """Whether ``path`` is a leftover from ``temp_path`` (an interrupted write)."""
    return ".tmp-" in path.name


def fsync_dir(path: Path) -> None:
    """Make renames inside directory ``path`` durable (skipped where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_atomically(tmp: Path, path: Path, *, sync_dir: bool = True) -> None:
    """fsync the finished ``tmp`` file, rename it onto ``path``, fsync the directory.

    ``sync_dir=False`` leaves the directory fsync to the caller (one for many files).
    """
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    if sync_dir:
        fsync_dir(path.parent)


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def fs_file_sha256(fs: AbstractFileSystem, path: str, cancel: threading.Event | None = None,
                   chunk_bytes: int = _HASH_CHUNK_BYTES) -> str | None:
    """Hex sha256 of a file read sequentially through ``fs``, ``chunk_bytes`` at a time (None if ``cancel``
    was set meanwhile)."""
    digest = hashlib.sha256()
    with fs.open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            if cancel is not None and cancel.is_set():
                return None
            digest.update(chunk)
    return digest.hexdigest()
