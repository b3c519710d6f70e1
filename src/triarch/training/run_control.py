"""Step-boundary coordination of one rank: stop requests from signals, agreed by every rank, and progress
beats for the hang watchdog.

A stop signal (``SIGUSR2`` by default: SLURM sends it before a time limit or on preemption) only sets a
flag. At the next step boundary the flags of all ranks are combined with one small all-reduce, so every
rank stops after the same step, saves the same checkpoint and exits together.
"""

from __future__ import annotations

import logging
from datetime import timedelta

import torch
import torch.distributed as dist

from triarch.launcher.stop_signal import StopRequest
from triarch.launcher.watchdog import HangWatchdog

log = logging.getLogger("triarch.train")


class RunControl:
    """Owned by the rank's entry point and passed to the step loop."""

    def __init__(self, device: torch.device, *, stop: StopRequest | None = None,
                 watchdog: HangWatchdog | None = None, collective_timeout_s: float | None = None) -> None:
        self.device = device
        self.collective_timeout_s = collective_timeout_s
        self.stop = stop or StopRequest()
        self.watchdog = watchdog
        self.stop_reason: str | None = None

    def start(self) -> "RunControl":
        """Start the watchdog (signals are routed by the :class:`StopRequest`'s owner)."""
        if self.watchdog is not None:
            self.watchdog.start()
        return self

    def close(self) -> None:
        if self.watchdog is not None:
            self.watchdog.stop()

    def request_stop(self, reason: str) -> None:
        """Ask every rank to stop after the current step."""
        self.stop.request(reason)

    def progress(self, step: int | None = None) -> None:
        """A beat for the watchdog (call it between long phases too: evaluation, checkpoint saves)."""
        if self.watchdog is not None:
            self.watchdog.progress(step)

    def should_stop(self, step: int) -> bool:
        """Called by every rank after ``step``: True on all ranks when any rank was asked to stop."""
        self.progress(step)
        if self.collective_timeout_s is not None and dist.is_initialized():
            # start-up (compilation, loading) is over: collectives now fail after the tighter limit
            dist.distributed_c10d._set_pg_timeout(timedelta(seconds=self.collective_timeout_s), None)
            self.collective_timeout_s = None
        flag = torch.tensor([1 if self.stop.reason else 0], dtype=torch.int32, device=self.device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if int(flag.item()) and self.stop_reason is None:
            self.stop_reason = self.stop.reason or "a stop request on another rank"
            log.info("stopping after step %d: %s", step, self.stop_reason)
        return self.stop_reason is not None
