"""A stop asked for by a signal (USR2: SLURM's warning before a time limit or a preemption).

Pure standard library, so a job can install it before importing anything heavy.
"""

from __future__ import annotations

import signal
from types import FrameType

DEFAULT_STOP_SIGNALS: tuple[signal.Signals, ...] = (signal.SIGUSR2,)


class StopRequest:
    """Records a stop signal from the moment :meth:`install` runs (call it first thing in a job, so that a
    signal arriving during start-up is kept, not lost or handled by someone else)."""

    def __init__(self) -> None:
        self.reason: str | None = None
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
        self.request(signal.Signals(signum).name)

    def request(self, reason: str) -> None:
        """Ask for a stop after the current step (the first reason wins)."""
        if self.reason is None:
            self.reason = reason
