"""Step-boundary control in one process: a stop signal becomes an agreed stop, and collectives move from
the start-up timeout to the tighter one after the first step."""

from __future__ import annotations

import os
import signal
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

from triarch.launcher.stop_signal import StopRequest
from triarch.training.run_control import RunControl


@pytest.fixture()
def world_of_one():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1, timeout=timedelta(seconds=1800))
    yield dist.group.WORLD._get_backend(torch.device("cpu"))
    dist.destroy_process_group()


def test_usr2_stops_after_the_step_and_the_timeout_tightens(world_of_one) -> None:
    stop = StopRequest().install()
    try:
        control = RunControl(torch.device("cpu"), stop=stop, collective_timeout_s=30).start()
        assert world_of_one.options._timeout == timedelta(seconds=1800)
        assert control.should_stop(1) is False
        assert world_of_one.options._timeout == timedelta(seconds=30)
        os.kill(os.getpid(), signal.SIGUSR2)
        assert control.should_stop(2) is True and control.stop_reason == "SIGUSR2"
        control.close()
    finally:
        stop.uninstall()
    assert signal.getsignal(signal.SIGUSR2) is signal.SIG_DFL
