"""The local launcher leaves no rank behind when its caller gives up while waiting (a test's timeout, an
exception raised by a signal handler): the ranks are killed before the exception propagates."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from triarch.launcher.local import launch_local

SLEEPER = """import os, sys, time
open(os.path.join(sys.argv[1], os.environ["RANK"]), "w").write(str(os.getpid()))
time.sleep(120)
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_an_exception_while_waiting_kills_every_rank(tmp_path: Path) -> None:
    script, pids = tmp_path / "sleeper.py", tmp_path / "pids"
    script.write_text(SLEEPER)
    pids.mkdir()

    def give_up(signum, frame) -> None:
        raise TimeoutError("the caller gave up")

    previous = signal.signal(signal.SIGALRM, give_up)
    signal.alarm(4)
    try:
        with pytest.raises(TimeoutError):
            launch_local(2, [str(script), str(pids)])
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    started = sorted(pids.iterdir())
    assert [p.name for p in started] == ["0", "1"]
    assert not [p.name for p in started if _alive(int(p.read_text()))]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGUSR2])
def test_a_rank_interrupted_while_starting_exits_130_without_a_traceback(tmp_path: Path, sig: int) -> None:
    """Ctrl-C, or the launcher's stop request (SIGUSR2), while a rank still imports torch: exit 130 quietly, so
    the launcher reports one line ("interrupted before training started") instead of one traceback per rank."""
    rank = subprocess.Popen([sys.executable, "-m", "triarch.launcher.rank_entry", str(tmp_path), "nope.yaml"],
                            stderr=subprocess.PIPE, text=True)
    time.sleep(0.3)  # inside the imports (torch alone takes longer)
    rank.send_signal(sig)
    _, err = rank.communicate(timeout=60)
    assert rank.returncode == 130, err
    assert "Traceback" not in err, err
