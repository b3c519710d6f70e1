"""Step-boundary coordination of one rank: stop requests from signals, agreed by every rank, collective
timeouts, and progress beats for the hang watchdog.

A stop signal (``SIGUSR2`` by default: SLURM sends it before a time limit or on preemption) only sets a
flag. At the next step boundary the flags of all ranks are combined, so every rank stops after the same
step, saves the same checkpoint and exits together. The training step agrees the flag inside its own
fused all-reduce (``Engine.train_step(stop_requested=...)``); without that, :meth:`should_stop`
agrees it with one small all-reduce on the host (gloo) group.
"""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist

from triarch.launcher.stop_signal import StopRequest
from triarch.launcher.watchdog import HangWatchdog
from triarch.parallel.process_groups import set_timeout_everywhere

log = logging.getLogger("triarch.train")


class RunControl:
    """Owned by the rank's entry point and passed to the step loop.

    ``startup_timeout_s`` applies to every process group once they all exist (:meth:`groups_ready`);
    ``collective_timeout_s`` replaces it on every group after the first step.
    """

    def __init__(self, device: torch.device, *, stop: StopRequest | None = None,
                 watchdog: HangWatchdog | None = None, collective_timeout_s: float | None = None,
                 startup_timeout_s: float | None = None, host_group: dist.ProcessGroup | None = None) -> None:
        self.device = device
        self.collective_timeout_s = collective_timeout_s
        self.startup_timeout_s = startup_timeout_s
        self.host_group = host_group
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

    @property
    def stop_requested(self) -> bool:
        """This rank's own flag (not yet agreed with the others)."""
        return self.stop.reason is not None

    def progress(self, step: int | None = None) -> None:
        """A beat for the watchdog (call it between long phases too: evaluation, checkpoint saves)."""
        if self.watchdog is not None:
            self.watchdog.progress(step)

    def groups_ready(self) -> None:
        """Every process group of the run exists (mesh, checkpoint writer): give them all the start-up
        timeout (subgroups otherwise keep the backend's default, 10 minutes on NCCL)."""
        if self.startup_timeout_s is not None and dist.is_initialized():
            set_timeout_everywhere(self.startup_timeout_s)

    def should_stop(self, step: int, agreed: bool | None = None) -> bool:
        """Called by every rank after ``step``: True on all ranks when any rank was asked to stop.

        ``agreed`` is the flag already combined over all ranks (by the training step's all-reduce);
        without it the flags are combined here.
        """
        self.progress(step)
        if self.collective_timeout_s is not None and dist.is_initialized():
            # start-up (compilation, loading) is over: collectives on every group now fail sooner
            set_timeout_everywhere(self.collective_timeout_s)
            self.collective_timeout_s = None
        if agreed is None:
            agreed = self._agree(self.stop_requested)
        if agreed and self.stop_reason is None:
            self.stop_reason = self.stop.reason or "a stop request on another rank"
            log.info("stopping after step %d: %s", step, self.stop_reason)
        return self.stop_reason is not None

    def _agree(self, flag: bool) -> bool:
        value = torch.tensor([int(flag)], dtype=torch.int32)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(value, op=dist.ReduceOp.MAX, group=self.host_group)
        return bool(value.item())
