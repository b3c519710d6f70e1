"""Checks that the shards a training stream reads are the bytes the manifest describes, cheap enough for
multi-TB corpora.

- **Sizes at start** (``check_sizes``): one listing per split folder (local or fsspec) compares every
  shard file's size with the manifest; a missing or truncated shard stops the run before its first step.
- **Ids per batch**: every batch's largest id is compared with the manifest's ``max_token_id`` (one
  vectorized max over a batch already in memory; ``token_stream.TokenStream``); an id above it names the shard
  and record it came from.
- **Hashes in the background** (``ShardHasher``): the first time the stream reads a shard, a background
  thread hashes the whole file and compares with the manifest's sha256; a mismatch is reported at the next
  step boundary. Local shards are always hashed (a sequential read the page cache shares with training);
  remote (fsspec) shards are read by ranged requests, and hashing them would fetch every byte once more,
  so by default they are hashed only up to ``REMOTE_HASH_BYTES`` each (``verify="all"`` hashes every
  remote shard whatever its size, ``"off"`` hashes nothing). ``triarch data verify`` checks everything.
"""

from __future__ import annotations

import logging
import queue
import threading
import weakref
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

from fsspec import AbstractFileSystem

from triarch.data_pipeline.errors import DataError
from triarch.data_pipeline.fileio import fs_file_sha256

log = logging.getLogger(__name__)

VerifyMode = Literal["local", "all", "off"]
VERIFY_MODES = ("local", "all", "off")
REMOTE_HASH_BYTES = 64 << 20  # with verify="local", remote shards up to this size are hashed too
HASH_CHUNK_BYTES = 1 << 20  # the background reader holds one chunk: small against the stream's working set


def advice(url: str) -> str:
    """What to run next, appended to every integrity error."""
    return f"the shard is damaged; check every shard with: triarch data verify {url}"


def check_sizes(fs: AbstractFileSystem, root: str, url: str, entries: Iterable[dict[str, Any]]) -> None:
    """Compare each shard file's size with its manifest entry (one listing per folder); raise a one-line
    DataError naming the first missing or wrong-sized shard."""
    listed: dict[str, dict[str, int]] = {}
    for entry in entries:
        expected = entry.get("bytes")
        if expected is None:  # format 1 recorded no sizes
            continue
        folder, _, name = entry["file"].rpartition("/")
        if folder not in listed:
            try:
                items = fs.ls(f"{root}/{folder}" if folder else root, detail=True)
            except FileNotFoundError:
                items = []
            except OSError as exc:
                raise DataError(f"cannot list {url}/{folder}: {exc}") from exc
            listed[folder] = {item["name"].rstrip("/").rsplit("/", 1)[-1]: int(item.get("size") or 0)
                              for item in items}
        size = listed[folder].get(name)
        if size is None:
            raise DataError(f"{url}/{entry['file']} is missing (listed in the manifest); {advice(url)}")
        if size != expected:
            raise DataError(f"{url}/{entry['file']} is {size} bytes, the manifest says {expected} "
                            f"(truncated or replaced); {advice(url)}")


@dataclass(frozen=True)
class HashJob:
    """One shard to hash: where it is and what the manifest says."""

    fs: AbstractFileSystem
    path: str
    where: str  # the shard's URL, for messages
    url: str  # its prepared folder's URL
    sha256: str
    size: int | None


def wants_hash(mode: VerifyMode, local: bool, size: int | None) -> bool:
    """Whether a shard is hashed in the background under ``mode`` (see the module docstring)."""
    if mode == "off":
        return False
    return local or mode == "all" or (size is not None and size <= REMOTE_HASH_BYTES)


def _stop(closing: threading.Event, jobs: queue.Queue, thread: threading.Thread | None) -> None:
    """End a hasher's thread: no new hash starts, the one running stops within a chunk."""
    if closing.is_set():
        return
    closing.set()
    if thread is not None:
        jobs.put(None)
        thread.join()


class ShardHasher:
    """Hashes submitted shards on one daemon thread; ``error`` is the first mismatch found (or None).

    ``close`` ends the thread; it also ends when the hasher is collected or at interpreter exit, since a
    daemon thread still inside a read at shutdown can abort the process ("terminate called without an
    active exception").
    """

    def __init__(self) -> None:
        self._jobs: queue.Queue[HashJob | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._closing = threading.Event()
        self.error: str | None = None
        self.hashed = 0

    def submit(self, job: HashJob) -> None:
        """Hash ``job`` in the background (the caller submits each shard once); ignored once closed."""
        if self._closing.is_set():
            return
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="shard-hash", daemon=True)
            self._thread.start()
            # also stopped when this hasher is collected or the interpreter exits (atexit runs first)
            weakref.finalize(self, _stop, self._closing, self._jobs, self._thread)
        self._jobs.put(job)

    def wait(self) -> str | None:
        """Block until every submitted shard is hashed; the first error, if any."""
        self._jobs.join()
        return self.error

    def close(self) -> None:
        """Abandon the queued hashes, stop within one read chunk, and join the thread."""
        _stop(self._closing, self._jobs, self._thread)

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            try:
                problem = None if self._closing.is_set() else self._check(job)
                if problem is not None and self.error is None:
                    self.error = problem
                self.hashed += 1
            finally:
                self._jobs.task_done()
        self._jobs.task_done()

    def _check(self, job: HashJob) -> str | None:
        try:
            actual = fs_file_sha256(job.fs, job.path, self._closing, HASH_CHUNK_BYTES)
        except OSError as exc:
            return f"cannot read {job.where} to check its sha256: {exc}"
        if actual is None:  # closed meanwhile
            return None
        if actual != job.sha256:
            return f"{job.where} has sha256 {actual}, the manifest says {job.sha256}; {advice(job.url)}"
        return None
