"""Hang detection: every rank writes a heartbeat file; a watchdog thread ends the job when progress stops.

Each rank's background thread rewrites ``FOLDER/rank_<r>.json`` every ``interval_s`` with the time of its
last beat (proof the process is alive) and of the main loop's last progress (proof it is not stuck). When
this rank's main loop has made no progress for the limit, the thread dumps every Python stack of the
process to stderr; the lowest live rank then prints one report line naming the stuck rank — the one whose
beats stopped (a stopped or frozen process), else the one furthest behind — and every live rank exits
with :data:`EXIT_HANG`. Collective calls release the GIL, so the thread runs while the main thread waits.
"""

from __future__ import annotations

import faulthandler
import json
import logging
import os
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TextIO

from triarch.launcher import exit_codes

EXIT_HANG = exit_codes.HANG
REPORT_NAME = "hang_report.txt"

log = logging.getLogger("triarch.watchdog")


@dataclass
class Beat:
    """What one rank's heartbeat file holds."""

    rank: int
    host: str
    pid: int
    step: int
    progress_at: float
    beat_at: float
    started_at: float
    dumped_at: float = 0.0
    reported_at: float = 0.0


def print_main_thread_stack(stream: TextIO) -> None:
    """The main thread's stack first: it runs the training loop, and faulthandler lists at most 100
    threads, so a process with many helper threads could otherwise hide it."""
    frame = sys._current_frames().get(threading.main_thread().ident or -1)
    if frame is not None:
        stream.write("Main thread (most recent call last):\n" + "".join(traceback.format_stack(frame)))
        stream.flush()


def beat_path(folder: Path, rank: int) -> Path:
    return folder / f"rank_{rank:05d}.json"


def read_beat(folder: Path, rank: int) -> Beat | None:
    """The last heartbeat ``rank`` wrote, or None when it has none (or it is being replaced)."""
    try:
        return Beat(**json.loads(beat_path(folder, rank).read_text()))
    except (OSError, ValueError, TypeError):
        return None


def describe_hang(beats: dict[int, Beat | None], world: int, now: float, stale_after_s: float,
                  stalled_s: float) -> str:
    """The one-line report: which rank is stuck, in which step, and why we think so.

    Ranks finish steps in lockstep, so the step in flight is the newest finished step any rank reported
    plus one (a frozen rank's own file may predate its last steps: beats are periodic).
    """
    known = [b for b in beats.values() if b is not None]
    in_flight = max((b.step for b in known), default=0) + 1
    missing = [r for r in range(world) if beats.get(r) is None]
    silent = sorted((b for b in known if now - b.beat_at > stale_after_s), key=lambda b: b.beat_at)
    tail = f"no rank progressed for {stalled_s:.0f} s; stacks of the live ranks are in their logs"
    if silent:
        who = ", ".join(f"rank {b.rank} (host {b.host}, pid {b.pid}, no heartbeat for {now - b.beat_at:.0f} s)"
                        for b in silent)
        return f"hang: {who} stopped responding during step {in_flight}; {tail}"
    if missing:
        return f"hang: rank {', '.join(map(str, missing))} never wrote a heartbeat; {tail}"
    behind = min(known, key=lambda b: (b.step, b.progress_at))
    return (f"hang: every rank is alive but stuck; rank {behind.rank} (host {behind.host}) is furthest behind, "
            f"in step {behind.step + 1}; {tail}")


class HangWatchdog:
    """Heartbeat writer plus stall detector for one rank (see the module docstring)."""

    def __init__(self, folder: Path, rank: int, world: int, *, timeout_s: float, startup_timeout_s: float,
                 interval_s: float, exit_fn: Callable[[int], None] = os._exit) -> None:
        self.folder, self.rank, self.world = Path(folder), rank, world
        self.timeout_s, self.startup_timeout_s, self.interval_s = timeout_s, startup_timeout_s, interval_s
        self._exit = exit_fn
        now = time.time()
        self._beat = Beat(rank, socket.gethostname(), os.getpid(), step=0, progress_at=now, beat_at=now,
                          started_at=now)
        self._first_step_done = False
        self._write_failed = False
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="triarch-watchdog", daemon=True)

    # -- main thread ---------------------------------------------------------------------------

    def start(self) -> "HangWatchdog":
        self.folder.mkdir(parents=True, exist_ok=True)
        self._write()
        self._thread.start()
        return self

    def progress(self, step: int | None = None) -> None:
        """The main loop moved on (a step finished, or a long phase advanced)."""
        with self._lock:
            self._beat.progress_at = time.time()
            if step is not None:
                self._beat.step = step
                self._first_step_done = True

    def stop(self) -> None:
        """End the thread and leave a last beat with the final step."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=2 * self.interval_s + 1)
        self._write(quiet=True)

    # -- watchdog thread -----------------------------------------------------------------------

    @property
    def stale_after_s(self) -> float:
        """A rank whose beats are older than this is not running (stopped, frozen or dead)."""
        return 3 * self.interval_s + 2

    def _write(self, *, quiet: bool = False) -> None:
        with self._lock:
            self._beat.beat_at = time.time()
            payload = json.dumps(asdict(self._beat))
        path = beat_path(self.folder, self.rank)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        try:
            tmp.write_text(payload)
            os.replace(tmp, path)
        except OSError as err:  # a full or flaky shared disk must not kill training; say so once
            tmp.unlink(missing_ok=True)
            if not (quiet or self._write_failed):
                log.warning("rank %d: cannot write heartbeat %s: %s", self.rank, path, err)
            self._write_failed = True

    def _limit(self) -> float:
        """Stall length that trips the watchdog: three beats short of the limit, so that dumping, waiting
        for the other ranks' dumps (at most two beats) and exiting finish within the limit."""
        limit = self.timeout_s if self._first_step_done else self.startup_timeout_s
        return max(self.interval_s, limit - 3 * self.interval_s)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._write()
            stalled = time.time() - self._beat.progress_at
            if stalled > self._limit():
                self._on_hang(stalled)
                return

    def _others(self) -> dict[int, Beat | None]:
        return {r: read_beat(self.folder, r) for r in range(self.world)}

    def _on_hang(self, stalled: float) -> None:
        print(f"triarch watchdog: rank {self.rank} made no progress for {stalled:.0f} s (step "
              f"{self._beat.step}); Python stacks of this process:", file=sys.stderr, flush=True)
        print_main_thread_stack(sys.stderr)
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        sys.stderr.flush()
        with self._lock:
            self._beat.dumped_at = time.time()
        self._write()
        now = time.time()
        beats = self._others()
        live = [r for r, b in beats.items() if b is not None and now - b.beat_at <= self.stale_after_s]
        grace = 2 * self.interval_s
        if live and min(live) == self.rank:
            self._wait_for(lambda: all(self._dumped(r) for r in live), grace)
            report = describe_hang(self._others(), self.world, time.time(), self.stale_after_s, stalled)
            print(report, file=sys.stderr, flush=True)
            try:
                (self.folder / REPORT_NAME).write_text(report + "\n")
            except OSError:
                pass
            with self._lock:
                self._beat.reported_at = time.time()
            self._write()
        else:
            reporter = min(live) if live else self.rank
            self._wait_for(lambda: self._reported(reporter), 2 * grace + 1)
        self._exit(EXIT_HANG)

    def _dumped(self, rank: int) -> bool:
        beat = read_beat(self.folder, rank)
        return beat is not None and beat.dumped_at >= self._beat.started_at

    def _reported(self, rank: int) -> bool:
        beat = read_beat(self.folder, rank)
        return beat is not None and beat.reported_at >= self._beat.started_at

    def _wait_for(self, condition: Callable[[], bool], limit_s: float) -> None:
        deadline = time.time() + limit_s
        while time.time() < deadline and not condition():
            time.sleep(min(0.2, self.interval_s))
            self._write()
