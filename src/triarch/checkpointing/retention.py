"""Retention off the critical path: keep the last ``keep`` committed steps plus every ``keep_every``-th.

A doomed step is first renamed to ``.deleting-step_<N>`` (one atomic rename, so no listing ever sees it
half deleted), then removed. Rank 0 runs this in one background thread, one request after another; a
crash mid-delete leaves only a hidden ``.deleting-*`` folder, removed by the next pass.
"""

from __future__ import annotations

import logging
import shutil
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from triarch.checkpointing.steps import StepInfo, list_steps
from triarch.data_pipeline.fileio import fsync_dir

log = logging.getLogger("triarch.checkpoint")

TRASH_PREFIX = ".deleting-"


def doomed_steps(ckpt_dir: Path, keep: int, keep_every: int, protect: int | None = None) -> list[StepInfo]:
    """Committed steps older than the newest ``keep``, except every ``keep_every``-th and ``protect``."""
    committed = [s for s in list_steps(ckpt_dir) if s.committed]
    return [s for s in committed[:-keep]
            if not (keep_every and s.step % keep_every == 0) and s.step != protect]


def _remove(path: Path) -> None:
    try:
        shutil.rmtree(path)
    except OSError as err:
        log.warning("could not delete %s (%s); the next retention pass retries", path, err)


def delete_step(path: Path) -> None:
    """Hide a step folder with one rename (durable), then delete it."""
    trash = path.with_name(TRASH_PREFIX + path.name)
    try:
        path.rename(trash)
    except OSError as err:
        log.warning("could not delete %s (%s); keeping it", path, err)
        return
    fsync_dir(path.parent)
    _remove(trash)


def apply_retention(ckpt_dir: Path, keep: int, keep_every: int, protect: int | None = None) -> None:
    """Remove leftovers of interrupted deletions, then every doomed step."""
    for leftover in sorted(ckpt_dir.glob(TRASH_PREFIX + "*")):
        _remove(leftover)
    for info in doomed_steps(ckpt_dir, keep, keep_every, protect):
        delete_step(info.path)


class BackgroundRetention:
    """Applies retention in one background thread; requests run in order, each on what is then on disk."""

    def __init__(self, ckpt_dir: Path, keep: int, keep_every: int) -> None:
        self.dir, self.keep, self.keep_every = ckpt_dir, keep, keep_every
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="triarch-retention")
        self._last: Future | None = None

    def request(self, just_committed: int) -> None:
        """Queue one pass; ``just_committed`` is never deleted by it."""
        self._last = self._executor.submit(self._pass, just_committed)

    def _pass(self, just_committed: int) -> None:
        """One retention pass; a failure is a warning (the run goes on, the next pass retries)."""
        try:
            apply_retention(self.dir, self.keep, self.keep_every, just_committed)
        except OSError as err:
            log.warning("retention in %s failed (%s); the next pass retries", self.dir, err)

    def wait(self) -> None:
        """Block until every queued pass has finished."""
        if self._last is not None:
            self._last.result()
