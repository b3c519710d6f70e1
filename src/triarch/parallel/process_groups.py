"""Process groups beside the device mesh: a host (gloo) group for control-plane agreement, and collective
timeouts applied to every group, not only the default one.

On GPU clusters the default group is NCCL, which has a backend for CUDA tensors only: any collective on a
CPU tensor there fails with "No backend type associated with device type cpu". Every agreement between
ranks that is about host values (a save failed, a background write finished, a stop was requested, the
peak memory of the window) therefore runs on :func:`host_group`, and collectives on model tensors stay on
the device groups.
"""

from __future__ import annotations

from datetime import timedelta

import torch
import torch.distributed as dist

_HOST_BACKENDS = ("gloo", "fake")


def default_group_handles_cpu() -> bool:
    """True when the default process group can run collectives on CPU tensors (gloo, or the fake test PG)."""
    return dist.get_backend() in _HOST_BACKENDS


def host_group() -> dist.ProcessGroup:
    """A group over every rank that runs collectives on CPU tensors: the default group when it is gloo,
    else a new gloo group (collective: every rank calls this at the same point)."""
    if default_group_handles_cpu():
        return dist.group.WORLD
    return dist.new_group(backend="gloo")


def all_groups() -> list[dist.ProcessGroup]:
    """Every process group this rank belongs to (the default group, mesh dimensions, private groups)."""
    return [pg for pg in dist.distributed_c10d._world.pg_map if isinstance(pg, dist.ProcessGroup)]


def set_timeout_everywhere(seconds: float) -> None:
    """Give every process group of this rank the collective timeout ``seconds`` (the default group's own
    timeout never reaches mesh subgroups, which otherwise keep the backend's default)."""
    timeout = timedelta(seconds=seconds)
    for group in all_groups():
        dist.distributed_c10d._set_pg_timeout(timeout, group)


def group_timeout(group: dist.ProcessGroup, device: torch.device | str = "cpu") -> timedelta:
    """The timeout collectives of ``group`` on ``device`` currently use."""
    return group._get_backend(torch.device(device)).options._timeout
