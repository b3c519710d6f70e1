"""A stop asked for by a signal: USR2 (SLURM's warning before a time limit or a preemption) and, in a local
run, Ctrl-C (INT), TERM and HUP.

The first signal only records the request: every rank then stops at the same step boundary and saves. A
second *interrupting* signal (INT, TERM or HUP; USR2 never counts) means the user will not wait: the
process exits at once with 128 + the signal number.

Pure standard library, so a job can install it before importing anything heavy.
"""

from __future__ import annotations

import os
import signal
import sys
from types import FrameType

DEFAULT_STOP_SIGNALS: tuple[signal.Signals, ...] = (signal.SIGUSR2,)
INTERRUPTS: tuple[signal.Signals, ...] = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
LOCAL_STOP_SIGNALS: tuple[signal.Signals, ...] = (signal.SIGUSR2, *INTERRUPTS)


class StopRequest:
    """Records a stop signal from the moment :meth:`install` runs (call it first thing in a job, so that a
    signal arriving during start-up is kept, not lost or handled by someone else)."""

    def __init__(self) -> None:
        self.reason: str | None = None
        self.interrupts = 0
        self._previous: dict[signal.Signals, object] = {}

    def install(self, signals: tuple[signal.Signals, ...] = DEFAULT_STOP_SIGNALS) -> "StopRequest":
        """Route ``signals`` here (main thread only)."""
        for sig in signals:
            self._previous.setdefault(sig, signal.signal(sig, self._on_signal))
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
        self._previous.clear()

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        sig = signal.Signals(signum)
        if sig in INTERRUPTS:
            self.interrupts += 1
            if self.interrupts > 1:  # asked twice: leave now (committed checkpoints are safe either way)
                print(f"{sig.name} again: exiting at once", file=sys.stderr, flush=True)
                os._exit(128 + signum)
        self.request(sig.name)

    def request(self, reason: str) -> None:
        """Ask for a stop after the current step (the first reason wins)."""
        if self.reason is None:
            self.reason = reason
