"""Which run directory and log folder each submitted job uses, so ``status``/``logs``/``cancel`` need only
the job id (SLURM forgets finished jobs). One JSON line per job in ``$TRIARCH_HOME/jobs.jsonl``
(default ``~/.triarch``)."""

from __future__ import annotations

import fcntl
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from triarch.slurm.commands import SlurmError, job_fields

ACTIVE_STATES = {"PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED",
                 "RESIZING", "SUSPENDED", "STOPPED", "SIGNALING"}


@dataclass(frozen=True)
class JobRecord:
    """One submitted job (one element of an array for sweeps: ``1234_0``)."""

    job_id: str
    run_dir: str
    log_dir: str
    tasks: int
    label: str = ""
    submitted_at: float = field(default_factory=time.time)

    def log_path(self, rank: int, stream: str = "out") -> Path:
        """submitit's per-task log file."""
        return Path(self.log_dir) / f"{self.job_id}_{rank}_log.{stream}"


def registry_path() -> Path:
    home = os.environ.get("TRIARCH_HOME") or Path.home() / ".triarch"
    return Path(home) / "jobs.jsonl"


def register(record: JobRecord) -> None:
    path = registry_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        f.write(json.dumps(asdict(record)) + "\n")


def all_records() -> list[JobRecord]:
    """Every registered job, oldest first (unreadable lines are skipped)."""
    try:
        lines = registry_path().read_text().splitlines()
    except OSError:
        return []
    records = []
    for line in lines:
        try:
            records.append(JobRecord(**json.loads(line)))
        except (ValueError, TypeError):
            continue
    return records


def find_record(job_id: str) -> JobRecord:
    """The newest record of ``job_id``; a one-line error when this machine never submitted it."""
    for record in reversed(all_records()):
        if record.job_id == job_id:
            return record
    raise SlurmError(f"job {job_id} was not submitted with triarch submit from this account "
                     f"(no entry in {registry_path()})")


def job_state(job_id: str) -> str:
    """SLURM's state of the job, or ``FINISHED`` when the controller no longer knows it."""
    fields = job_fields(job_id)
    return fields.get("JobState", "UNKNOWN") if fields else "FINISHED"


def active_job_for(run_dir: Path) -> str | None:
    """The id of a queued or running job that writes ``run_dir``, if any."""
    target = str(Path(run_dir).resolve())
    for record in reversed(all_records()):
        if record.run_dir == target:
            try:
                if job_state(record.job_id) in ACTIVE_STATES:
                    return record.job_id
            except SlurmError:
                return None
    return None
