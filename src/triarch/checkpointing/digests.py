"""Each rank hashes the files it wrote, in the thread that wrote them, so the commit only gathers digests.

:class:`DigestingWriter` is DCP's ``FileSystemWriter`` with a file system that notes every file DCP opens
for writing (and where a rename moves it, as for ``.metadata``); after its data files and after the
coordinator's ``.metadata`` are written, the writer records their size and sha256. The names are what DCP
actually wrote, not a guess at its naming scheme.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.filesystem import FileSystem
from torch.distributed.checkpoint.metadata import Metadata
from torch.distributed.checkpoint.planner import SavePlan, SavePlanner
from torch.distributed.checkpoint.storage import WriteResult
from torch.futures import Future

from triarch.data_pipeline.fileio import file_sha256

FileRecord = dict[str, Any]  # {"bytes": int, "sha256": str}, one entry of a commit's "files" map


def file_record(path: Path) -> FileRecord:
    """Size and sha256 of one file, as the commit file stores it."""
    return {"bytes": path.stat().st_size, "sha256": file_sha256(path)}


class _RecordingFileSystem(FileSystem):
    """DCP's local file system, noting each file opened for writing and following renames of them."""

    def __init__(self) -> None:
        super().__init__()
        self._lock = threading.Lock()  # DCP may write from several threads (thread_count > 1)
        self._written: list[Path] = []

    @contextmanager
    def create_stream(self, path: str | os.PathLike, mode: str) -> Iterator[IO[bytes]]:
        if "w" in mode or "a" in mode:
            with self._lock:
                self._written.append(Path(path))
        with super().create_stream(path, mode) as stream:
            yield stream

    def rename(self, path: str | os.PathLike, new_path: str | os.PathLike) -> None:
        super().rename(path, new_path)
        with self._lock:
            self._written = [Path(new_path) if p == Path(path) else p for p in self._written]

    def written(self) -> list[Path]:
        """Every file written so far, under its final name."""
        with self._lock:
            return list(self._written)


class DigestingWriter(FileSystemWriter):
    """A ``FileSystemWriter`` that hashes the files this rank wrote, right after writing them.

    ``digests`` maps each file's path relative to the checkpoint folder to its :func:`file_record`; read it
    once the save (or the async save's future) has completed.
    """

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.fs = _RecordingFileSystem()
        self.digests: dict[str, FileRecord] = {}

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        written = super().write_data(plan, planner)
        written.wait()  # the local writer finishes before returning; wait in case a subclass does not
        self._hash_new_files()
        return written

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        super().finish(metadata, results)  # the coordinator writes .metadata (temp name, then rename)
        self._hash_new_files()

    def _hash_new_files(self) -> None:
        root = Path(self.path)
        for path in self.fs.written():
            name = path.relative_to(root).as_posix()
            if name not in self.digests:
                self.digests[name] = file_record(path)
