"""Start N ranks on this machine through torch's elastic agent (rendezvous on loopback, free port)."""

from __future__ import annotations

import socket
import sys
import uuid

from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.launcher.api import LaunchConfig, elastic_launch


class LaunchError(RuntimeError):
    """One or more local ranks failed; the message names the first failing rank, ``exitcode`` is its code."""

    def __init__(self, message: str, exitcode: int) -> None:
        super().__init__(message)
        self.exitcode = exitcode


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_local(nproc: int, python_args: list[str], *, max_restarts: int = 0) -> None:
    """Run ``python -u *python_args`` as ``nproc`` ranks with RANK/WORLD_SIZE/MASTER_* set."""
    config = LaunchConfig(
        min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=f"triarch-{uuid.uuid4().hex[:8]}",
        rdzv_backend="c10d", rdzv_endpoint=f"127.0.0.1:{free_port()}", max_restarts=max_restarts,
        monitor_interval=0.2, start_method="spawn",
    )
    try:
        elastic_launch(config, entrypoint=sys.executable)("-u", *python_args)
    except ChildFailedError as err:
        rank, failure = err.get_first_failure()
        raise LaunchError(f"rank {rank} failed with exit code {failure.exitcode}", failure.exitcode) from None
