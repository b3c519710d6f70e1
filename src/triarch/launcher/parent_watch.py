"""Ranks die with whatever started them (the local launcher, or SLURM's step daemon).

A rank whose launcher was killed (``kill -9``, the OOM killer, a dead ``slurmstepd``) must not train on
to the end under PID 1, holding the run directory, its lock and a GPU. The kernel is asked to SIGKILL the
process when its parent dies (Linux ``PR_SET_PDEATHSIG``); a daemon thread also polls the parent id as a
fallback for other systems.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import threading

LAUNCHER_PID_ENV = "TRIARCH_LAUNCHER_PID"
PR_SET_PDEATHSIG = 1
POLL_S = 1.0


def _arm_parent_death_signal() -> bool:
    """Ask the kernel for SIGKILL when the parent exits; False where that is not available."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _watch(parent: int) -> None:
    stop = threading.Event()
    while not stop.wait(POLL_S):
        if os.getppid() != parent:
            os.kill(os.getpid(), signal.SIGKILL)


def die_with_parent() -> None:
    """Make this process end when its parent does. Under the local launcher (which names itself in
    ``TRIARCH_LAUNCHER_PID``), a parent that already died before this call ends the process at once. The
    variable is removed, so this rank's own children (data workers) do not inherit it."""
    expected = os.environ.pop(LAUNCHER_PID_ENV, None)
    parent = os.getppid()
    _arm_parent_death_signal()
    if expected is not None and int(expected) != parent:  # the launcher died before we armed the signal
        os.kill(os.getpid(), signal.SIGKILL)
    threading.Thread(target=_watch, args=(parent,), name="triarch-parent-watch", daemon=True).start()
