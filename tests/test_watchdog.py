"""The hang watchdog in one process: a rank whose heartbeat stopped is named, stacks are dumped, and the
watchdog exits within the limit; progress keeps it quiet."""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

from triarch.launcher.watchdog import EXIT_HANG, REPORT_NAME, Beat, HangWatchdog, beat_path, describe_hang


def frozen_peer(folder: Path, rank: int, step: int, age_s: float) -> None:
    """A heartbeat file as a SIGSTOP-ed rank leaves it: written ``age_s`` ago, then nothing."""
    then = time.time() - age_s
    folder.mkdir(parents=True, exist_ok=True)
    beat = Beat(rank, "n2", 4321, step=step, progress_at=then, beat_at=then, started_at=then - 5)
    beat_path(folder, rank).write_text(json.dumps(asdict(beat)))


def test_stalled_rank_names_the_frozen_peer_and_exits_within_the_limit(tmp_path: Path, capfd) -> None:
    exits: list[int] = []
    frozen_peer(tmp_path, 1, step=3, age_s=10)
    dog = HangWatchdog(tmp_path, 0, 2, timeout_s=1.5, startup_timeout_s=1.5, interval_s=0.1, exit_fn=exits.append)
    dog.start()
    dog.progress(4)
    started = time.time()
    dog._thread.join(timeout=10)
    took = time.time() - started
    assert exits == [EXIT_HANG] and took <= 1.5 + 0.5, took
    err = capfd.readouterr().err
    assert "Python stacks of this process" in err
    main_stack = err.split("Main thread (most recent call last):")[1]
    assert "test_watchdog.py" in main_stack.split("Current thread")[0]  # the main thread comes first, whole
    report = (tmp_path / REPORT_NAME).read_text().strip()
    assert report in err
    assert report.startswith("hang: rank 1 (host n2, pid 4321") and "stopped responding during step 5" in report


def test_progress_keeps_the_watchdog_quiet(tmp_path: Path) -> None:
    exits: list[int] = []
    dog = HangWatchdog(tmp_path, 0, 1, timeout_s=0.8, startup_timeout_s=0.8, interval_s=0.05, exit_fn=exits.append)
    dog.start()
    for step in range(1, 30):
        time.sleep(0.05)
        dog.progress(step)
    dog.stop()
    assert exits == []
    assert json.loads(beat_path(tmp_path, 0).read_text())["step"] == 29


def test_report_when_every_rank_is_alive_names_the_one_behind() -> None:
    now = time.time()
    beats = {0: Beat(0, "a", 1, 8, now - 30, now, now - 100), 1: Beat(1, "b", 2, 7, now - 40, now, now - 100)}
    text = describe_hang(beats, 2, now, stale_after_s=5, stalled_s=30)
    assert "every rank is alive" in text and "rank 1 (host b) is furthest behind, in step 8" in text
    assert "rank 2 never wrote a heartbeat" in describe_hang(beats, 3, now, stale_after_s=5, stalled_s=30)
