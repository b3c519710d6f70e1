"""The commit protocol: a step folder counts only once its commit file exists.

Rank 0 writes ``COMMITTED.json`` last (temp file + fsync + rename), after every rank finished writing.
It holds the integrity manifest: every other file's size and sha256, verified before a load. Each rank
hashes the files it wrote (:mod:`triarch.checkpointing.digests`) and rank 0 only merges the digests, so
``hashed_by_rank`` records how many bytes each rank hashed.
"""

from __future__ import annotations

import heapq
import json
import logging
import os
from pathlib import Path
from typing import Any

from triarch.checkpointing.digests import FileRecord, file_record
from triarch.checkpointing.errors import CheckpointError  # noqa: F401 (its historical home; re-exported)
from triarch.data_pipeline.fileio import file_sha256, fsync_dir

log = logging.getLogger("triarch.checkpoint")

COMMIT_FILE = "COMMITTED.json"
_COMMIT_TMP = f".{COMMIT_FILE}.tmp"


def step_files(step_dir: Path) -> list[str]:
    """Every file under ``step_dir`` but the commit file (and its temp name), relative, sorted."""
    names = (p.relative_to(step_dir).as_posix() for p in step_dir.rglob("*") if p.is_file())
    return sorted(n for n in names if n not in (COMMIT_FILE, _COMMIT_TMP))


def integrity_manifest(step_dir: Path) -> dict[str, FileRecord]:
    """Size and sha256 of every file under ``step_dir`` except the commit file, hashed here."""
    return {name: file_record(step_dir / name) for name in step_files(step_dir)}


def merge_digests(step_dir: Path,
                  per_rank: list[dict[str, FileRecord]]) -> tuple[dict[str, FileRecord], dict[str, int]]:
    """The ``files`` map of a step from each rank's digests, and the bytes each rank hashed.

    A file on disk that no rank reported is hashed here (and counted for rank 0) with a warning, so the
    manifest always covers the folder; a reported file that is not on disk is an error.
    """
    files: dict[str, FileRecord] = {}
    hashed = {str(rank): sum(r["bytes"] for r in digests.values()) for rank, digests in enumerate(per_rank)}
    for digests in per_rank:
        files.update(digests)
    on_disk = step_files(step_dir)
    missing = sorted(set(files) - set(on_disk))
    if missing:
        raise CheckpointError(f"{step_dir / missing[0]} was written but is not on disk")
    for name in on_disk:
        if name not in files:
            log.warning("%s was not reported by the rank that wrote it; hashing it on rank 0", step_dir / name)
            files[name] = file_record(step_dir / name)
            hashed["0"] += files[name]["bytes"]
    return dict(sorted(files.items())), hashed


def write_commit(step_dir: Path, info: dict[str, Any], files: dict[str, FileRecord] | None = None) -> None:
    """Write the commit file atomically: temp file, fsync, rename, fsync of the folder.

    ``files`` is the integrity manifest; without it every file is hashed here (offline writers).
    """
    record = {**info, "files": integrity_manifest(step_dir) if files is None else files}
    tmp = step_dir / _COMMIT_TMP
    with open(tmp, "w") as f:
        json.dump(record, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(step_dir / COMMIT_FILE)
    fsync_dir(step_dir)


def read_commit(step_dir: Path) -> dict[str, Any] | None:
    """The commit record, or None when the step is not committed (missing or unreadable commit file)."""
    path = step_dir / COMMIT_FILE
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and _well_formed(record.get("files")) else None


def _well_formed(files: Any) -> bool:
    """A commit's file list: {name: {"bytes": int, "sha256": str}} (anything else is a damaged commit file)."""
    return isinstance(files, dict) and all(
        isinstance(name, str) and isinstance(entry, dict) and isinstance(entry.get("bytes"), int)
        and isinstance(entry.get("sha256"), str) for name, entry in files.items())


def share_of(files: dict[str, FileRecord], rank: int, world: int) -> dict[str, FileRecord]:
    """The files ``rank`` of ``world`` checks when all verify a step together: largest first, each to the
    rank with the fewest bytes so far (the same answer on every rank)."""
    loads = [(0, r) for r in range(world)]  # a heap of (bytes so far, rank)
    mine = {}
    for name, record in sorted(files.items(), key=lambda item: (-item[1]["bytes"], item[0])):
        load, owner = heapq.heappop(loads)
        heapq.heappush(loads, (load + record["bytes"], owner))
        if owner == rank:
            mine[name] = record
    return mine


def verify_files(step_dir: Path, files: dict[str, FileRecord], *, hashes: bool = True) -> None:
    """Raise CheckpointError naming the first of ``files`` that is missing, resized or altered."""
    for name, expected in files.items():
        path = step_dir / name
        if not path.is_file():
            raise CheckpointError(f"{path} is missing")
        size = path.stat().st_size
        if size != expected["bytes"]:
            raise CheckpointError(f"{path} has {size} bytes, the commit says {expected['bytes']}")
        if hashes and file_sha256(path) != expected["sha256"]:
            raise CheckpointError(f"{path} does not match its sha256 in the commit file")


def verify(step_dir: Path, *, hashes: bool = True) -> None:
    """Check every file of a committed step (one process); raise CheckpointError naming the first bad one."""
    record = read_commit(step_dir)
    if record is None:
        raise CheckpointError(f"{step_dir} has no commit file")
    verify_files(step_dir, record["files"], hashes=hashes)
