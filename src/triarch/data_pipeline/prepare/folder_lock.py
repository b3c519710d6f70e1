"""An exclusive lock on a folder being prepared, so two ``prepare`` runs never write the same shards.

An advisory ``fcntl`` lock on ``OUT/.prepare.lock`` (holding the owner's pid, for the error message): the
kernel releases it when the holder exits, even when killed, so a crashed run never leaves the folder
locked. The file itself stays (removing it could let two processes lock two different files).
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from triarch.data_pipeline.errors import DataError
from triarch.data_pipeline.prepare.out_folder import make_out_folder, unwritable

LOCK_NAME = ".prepare.lock"


@contextmanager
def prepare_lock(out_dir: Path) -> Iterator[None]:
    """Create ``out_dir`` and hold its lock; another live holder, or a folder that cannot be created or
    written, is a one-line DataError."""
    out_dir = Path(out_dir)
    make_out_folder(out_dir)
    try:
        fd = os.open(out_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise unwritable(out_dir, exc) from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise DataError(f"{out_dir} is being prepared by another process (pid {holder}); wait for it to "
                            f"finish or choose another output folder") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        os.close(fd)
