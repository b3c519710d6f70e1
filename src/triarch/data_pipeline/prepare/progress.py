"""Progress of a preparation: a rich progress bar on a terminal, a periodic log line otherwise."""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

LOG_INTERVAL_S = 10.0
REFRESH_PER_S = 4
BAR_WIDTH = 24


@dataclass
class Counters:
    """What a preparation has done so far (documents and bytes are those tokenized in this run)."""

    documents: int = 0
    tokens: int = 0
    text_bytes: int = 0
    resumed_documents: int = 0
    bad_documents: int = 0
    started: float = field(default_factory=time.perf_counter)

    def elapsed(self) -> float:
        return max(time.perf_counter() - self.started, 1e-9)

    def tokens_per_s(self) -> float:
        return self.tokens / self.elapsed()

    def mb_per_s(self) -> float:
        """Megabytes (1e6) of UTF-8 text tokenized per second."""
        return self.text_bytes / 1e6 / self.elapsed()

    def summary(self) -> str:
        resumed = f", {self.resumed_documents:,} resumed" if self.resumed_documents else ""
        bad = f", {self.bad_documents:,} bad" if self.bad_documents else ""
        return (f"{self.documents:,} docs{resumed}{bad}, {self.tokens:,} tokens, "
                f"{self.tokens_per_s():,.0f} tokens/s, {self.mb_per_s():.2f} MB/s")


class Progress:
    """Shows ``Counters`` plus the fraction done of ``total`` (input bytes, or documents) while preparing.

    ``enabled``: True forces the display, False shows nothing, None picks rich on a terminal (stderr) and a
    log line every ``LOG_INTERVAL_S`` seconds otherwise.
    """

    def __init__(self, counters: Counters, total: int | None, unit: str, enabled: bool | None = None) -> None:
        self.counters = counters
        self.total = total
        self.unit = unit
        self._done = 0
        self._last_log = time.perf_counter()
        self._rich = None
        self._task = None
        self._log = enabled is not False
        if enabled is not False and sys.stderr.isatty():
            self._start_rich()

    def _start_rich(self) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, TextColumn, TimeElapsedColumn
        from rich.progress import Progress as RichProgress

        self._rich = RichProgress(TextColumn("prepare"), BarColumn(bar_width=BAR_WIDTH),
                                  TextColumn("{task.percentage:>3.0f}%"), TextColumn("{task.fields[stats]}"),
                                  TimeElapsedColumn(),
                                  console=Console(stderr=True), refresh_per_second=REFRESH_PER_S)
        self._task = self._rich.add_task("prepare", total=self.total, stats="")
        self._rich.start()
        self._log = False

    def update(self, done: int) -> None:
        """Record ``done`` of ``total`` and refresh the display if it is due."""
        self._done = done
        if self._rich is not None:
            self._rich.update(self._task, completed=done, stats=self.counters.summary())
        elif self._log and time.perf_counter() - self._last_log >= LOG_INTERVAL_S:
            self._last_log = time.perf_counter()
            log.info("prepare: %s%s", self.counters.summary(), self._fraction())

    def _fraction(self) -> str:
        if not self.total:
            return ""
        return f", {100.0 * min(self._done / self.total, 1.0):.0f}% of {self.total:,} {self.unit}"

    def close(self) -> None:
        """Stop the display (the caller logs the final summary)."""
        if self._rich is not None:
            self._rich.update(self._task, completed=self._done, stats=self.counters.summary())
            self._rich.stop()
            self._rich = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
