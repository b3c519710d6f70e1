"""The commit protocol: a step folder counts only once its commit file exists.

Rank 0 writes ``COMMITTED.json`` last (temp file + fsync + rename), after every rank finished writing.
It holds the integrity manifest: every other file's size and sha256, verified before a load.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from triarch.data_pipeline.fileio import file_sha256, fsync_dir

COMMIT_FILE = "COMMITTED.json"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the folder or file and the reason."""


def integrity_manifest(step_dir: Path) -> dict[str, dict[str, Any]]:
    """Size and sha256 of every file under ``step_dir`` except the commit file."""
    files = {}
    for path in sorted(p for p in step_dir.rglob("*") if p.is_file() and p.name != COMMIT_FILE):
        files[str(path.relative_to(step_dir))] = {"bytes": path.stat().st_size, "sha256": file_sha256(path)}
    return files


def write_commit(step_dir: Path, info: dict[str, Any]) -> None:
    """Write the commit file atomically: temp file, fsync, rename, fsync of the folder."""
    record = {**info, "files": integrity_manifest(step_dir)}
    tmp = step_dir / f".{COMMIT_FILE}.tmp"
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
    return record if isinstance(record, dict) and "files" in record else None


def verify(step_dir: Path, *, hashes: bool = True) -> None:
    """Raise CheckpointError naming the first file that is missing, resized or altered."""
    record = read_commit(step_dir)
    if record is None:
        raise CheckpointError(f"{step_dir} has no commit file")
    for name, expected in record["files"].items():
        path = step_dir / name
        if not path.is_file():
            raise CheckpointError(f"{path} is missing")
        size = path.stat().st_size
        if size != expected["bytes"]:
            raise CheckpointError(f"{path} has {size} bytes, the commit says {expected['bytes']}")
        if hashes and file_sha256(path) != expected["sha256"]:
            raise CheckpointError(f"{path} does not match its sha256 in the commit file")
