"""The run's requeue history (``RUN_DIR/slurm/requeues.json``): preemptions, time-outs and failures.

Preemptions requeue without limit, time-outs up to ``--max-timeouts``, failures up to ``--max-retries``;
the counts live in the run directory so they survive requeues and resubmissions. Updates hold an
exclusive lock, so two tasks racing to record the same event cannot lose one.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

KINDS = ("preemption", "timeout", "failure")


def ledger_path(run_dir: Path) -> Path:
    return Path(run_dir) / "slurm" / "requeues.json"


def read_ledger(run_dir: Path) -> dict[str, Any]:
    """The history so far (empty counts for a new run)."""
    try:
        data = json.loads(ledger_path(run_dir).read_text())
    except (OSError, ValueError):
        data = {}
    data.setdefault("counts", {})
    data.setdefault("events", [])
    for kind in KINDS:
        data["counts"].setdefault(kind, 0)
    return data


@contextmanager
def locked_ledger(run_dir: Path) -> Iterator[dict[str, Any]]:
    """Read, let the caller change, and atomically write back the ledger under a lock."""
    path = ledger_path(run_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        data = read_ledger(run_dir)
        yield data
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(data, indent=1))
        os.replace(tmp, path)


def attempt_key(job_id: str, restart_count: int) -> str:
    """Names one attempt of a job (SLURM keeps the job id across requeues)."""
    return f"{job_id}.{restart_count}"


def note(data: dict[str, Any], kind: str, attempt: str, detail: str) -> None:
    """Add an event for ``attempt`` without counting it (e.g. ``stopped``: saved, not requeued)."""
    data["events"].append({"kind": kind, "attempt": attempt, "time": time.time(), "detail": detail})


def record(data: dict[str, Any], kind: str, attempt: str, detail: str) -> None:
    """Count one requeue of ``kind`` for ``attempt`` (called inside :func:`locked_ledger`)."""
    data["counts"][kind] += 1
    note(data, kind, attempt, detail)


def attempt_event(data: dict[str, Any], attempt: str) -> dict[str, Any] | None:
    """What already happened to ``attempt`` (requeued, or stopped without a requeue), if anything."""
    return next((e for e in reversed(data["events"]) if e["attempt"] == attempt), None)
