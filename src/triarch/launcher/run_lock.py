"""An exclusive lock on a run directory, so two runs never write the same checkpoints and metrics.

The lock is an ``flock`` on ``RUN_DIR/.triarch.lock``. The local launcher hands its descriptor to every
rank it starts (the same open file, so the same lock): the run directory stays locked while any process of
the run lives, even if the launcher itself was killed. SLURM tasks, started elsewhere, each take a shared
lock (:func:`hold_shared`), which an exclusive request (a local ``triarch train``) cannot get past.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

LOCK_NAME = ".triarch.lock"


class RunDirBusy(RuntimeError):
    """Another live process holds the run directory."""


def _open(run_dir: Path) -> int:
    return os.open(Path(run_dir) / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o600)


def _busy(run_dir: Path, fd: int) -> RunDirBusy:
    holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
    return RunDirBusy(f"run directory {run_dir} is in use by another triarch run (started by pid {holder}; "
                      "its ranks may still be running)")


def lock_holder(run_dir: Path) -> str | None:
    """The pid (as text) of a live process holding ``run_dir``'s lock (exclusively, or shared by SLURM
    tasks), or None; creates and changes nothing."""
    try:
        fd = os.open(Path(run_dir) / LOCK_NAME, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


@contextmanager
def run_dir_lock(run_dir: Path) -> Iterator[int]:
    """Hold the exclusive lock on ``run_dir`` and yield its descriptor (pass it to the ranks to share the
    lock with them); released when every process holding the descriptor has ended, even if killed."""
    fd = _open(run_dir)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise _busy(run_dir, fd) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield fd
    finally:
        os.close(fd)


def hold_shared(run_dir: Path) -> int:
    """Take a shared lock for this process's lifetime (one task of a SLURM job; the tasks of one job share
    it, a local run is refused while any of them lives); returns the descriptor, never closed."""
    fd = _open(run_dir)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        err = _busy(run_dir, fd)
        os.close(fd)
        raise err from None
    return fd
