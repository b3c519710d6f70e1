"""Start N ranks on this machine as child processes and supervise them.

- Rendezvous: ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE`` and ``MASTER_ADDR``/``MASTER_PORT``
  (loopback, a free port), what torch.distributed's ``env://`` initialisation reads.
- Ranks die with the launcher (``launcher.parent_watch``, armed by the rank's entry point) and inherit the
  run directory's lock (``keep_fds``): the lock is held while any rank lives, even if the launcher was
  killed.
- Signals to the launcher: the first INT, TERM, HUP or USR2 becomes a stop request to every rank (USR2:
  each stops after the same step and saves); a second INT, TERM or HUP kills the ranks and the launcher
  exits with 128 + the signal number.
- A rank that fails ends the launch: the others get ``FAILURE_GRACE_S`` to end by themselves (errors the
  ranks agree on end them all together), then they are killed, and :class:`LaunchError` names the first
  failing rank.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from types import FrameType

from triarch.launcher.parent_watch import LAUNCHER_PID_ENV
from triarch.launcher.stop_signal import INTERRUPTS

FAILURE_GRACE_S = 10.0
POLL_S = 0.1


class LaunchError(RuntimeError):
    """One or more local ranks ended with a non-zero code. ``agreed`` when every rank ended with the same
    code (an error they agreed on and each reported, or a stop): ``exit_code`` is that code."""

    def __init__(self, message: str, exit_code: int, agreed: bool) -> None:
        super().__init__(message)
        self.exit_code = exit_code
        self.agreed = agreed


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_environment(rank: int, nproc: int, port: int) -> dict[str, str]:
    """The variables one local rank starts with."""
    return {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(nproc),
            "LOCAL_WORLD_SIZE": str(nproc), "GROUP_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
            LAUNCHER_PID_ENV: str(os.getpid())}


class _Signals:
    """The launcher's signal handlers while ranks run (main thread only)."""

    HANDLED = (*INTERRUPTS, signal.SIGUSR2)

    def __init__(self, ranks: list[subprocess.Popen]) -> None:
        self.ranks = ranks
        self.interrupts = 0
        self.fatal: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "_Signals":
        if threading.current_thread() is not threading.main_thread():
            return self
        for sig in self.HANDLED:
            self._previous[sig] = signal.signal(sig, self._on_signal)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if signum in INTERRUPTS:
            self.interrupts += 1
            if self.interrupts > 1:
                self.fatal = signum
                _kill_all(self.ranks, signal.SIGKILL)
                return
            # the ranks hear SIGUSR2 (an interrupt they also got from the terminal must not count twice there),
            # so the launcher names what it was sent (os.write: no buffered stream inside a signal handler)
            os.write(2, f"{signal.Signals(signum).name}: asking every rank to stop after the same step and save "
                        f"(send it again to exit at once)\n".encode())
        _kill_all(self.ranks, signal.SIGUSR2)  # a stop request: each rank stops after the same step and saves


def _kill_all(ranks: list[subprocess.Popen], sig: int) -> None:
    for proc in ranks:
        if proc.poll() is None:
            try:
                proc.send_signal(sig)
            except ProcessLookupError:
                pass


def _supervise(ranks: list[subprocess.Popen], signals: _Signals) -> list[int]:
    """Wait for every rank; after the first failure, give the rest a grace period, then kill them."""
    failed_at: float | None = None
    while True:
        codes = [p.poll() for p in ranks]
        if all(c is not None for c in codes):
            return [int(c) for c in codes]  # type: ignore[arg-type]
        if failed_at is None and any(c not in (None, 0) for c in codes):
            failed_at = time.monotonic()
        if failed_at is not None and time.monotonic() - failed_at > FAILURE_GRACE_S:
            _kill_all(ranks, signal.SIGKILL)
        time.sleep(POLL_S)


def launch_local(nproc: int, python_args: Sequence[str], *, keep_fds: Sequence[int] = ()) -> None:
    """Run ``python -u *python_args`` as ``nproc`` ranks and wait for them. Raises :class:`LaunchError` when
    any rank ended non-zero; exits with 128 + signal after a second interrupt. An exception raised while
    waiting (a test's timeout, say) kills the ranks before it propagates."""
    port = free_port()
    ranks: list[subprocess.Popen] = []
    signals = _Signals(ranks)
    with signals:
        try:
            for rank in range(nproc):
                ranks.append(subprocess.Popen([sys.executable, "-u", *python_args],
                                              env=rank_environment(rank, nproc, port), pass_fds=tuple(keep_fds)))
            codes = _supervise(ranks, signals)
        except BaseException:  # the caller gave up (a timeout, an exception in a signal handler): no orphan ranks
            _kill_all(ranks, signal.SIGKILL)
            for proc in ranks:
                proc.wait()
            raise
    if signals.fatal is not None:
        sys.exit(128 + signals.fatal)
    if not any(codes):
        return
    rank, code = next((r, c) for r, c in enumerate(codes) if c != 0)
    raise LaunchError(f"rank {rank} failed with exit code {_describe(code)}", code if code > 0 else 1,
                      agreed=len(set(codes)) == 1)


def _describe(code: int) -> str:
    if code < 0:
        return f"{-code} (killed by {signal.Signals(-code).name})"
    return str(code)
