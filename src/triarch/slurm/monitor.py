"""``triarch status``, ``triarch logs`` and ``triarch cancel``: a job's state, its rank logs, its end."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import TextIO

from triarch.slurm.commands import SlurmError, cancel, job_fields
from triarch.slurm.ledger import read_ledger
from triarch.slurm.registry import ACTIVE_STATES, JobRecord, all_records, find_record


def last_metrics(run_dir: Path) -> dict | None:
    """The newest line of the run's metrics.jsonl (None when training has not logged yet)."""
    path = run_dir / "metrics.jsonl"
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            f.seek(max(0, f.tell() - 8192))
            lines = [ln for ln in f.read().decode(errors="replace").splitlines() if ln.strip()]
        return json.loads(lines[-1]) if lines else None
    except (OSError, ValueError):
        return None


def describe(record: JobRecord) -> str:
    """One line: job, state, nodes, elapsed, training progress, requeues, run directory."""
    try:
        fields = job_fields(record.job_id)
    except SlurmError as err:
        fields, state = None, f"UNKNOWN ({err})"
    else:
        state = fields.get("JobState", "UNKNOWN") if fields else "FINISHED"
    parts = [f"job {record.job_id}", state]
    if fields:
        if fields.get("NodeList") and fields["NodeList"] != "(null)":
            parts.append(f"nodes {fields['NodeList']}")
        parts.append(f"elapsed {fields.get('RunTime', '?')}")
        if fields.get("Reason") and fields["Reason"] != "None":
            parts.append(f"reason {fields['Reason']}")
        if fields.get("Restarts", "0") != "0":
            parts.append(f"restarts {fields['Restarts']}")
    run_dir = Path(record.run_dir)
    metrics = last_metrics(run_dir)
    if metrics and "step" in metrics:
        loss = metrics.get("loss")
        parts.append(f"step {metrics['step']}" + (f" loss {loss:.4f}" if isinstance(loss, float) else ""))
    counts = read_ledger(run_dir)["counts"]
    if any(counts.values()):
        parts.append("requeues " + " ".join(f"{k}={v}" for k, v in counts.items() if v))
    parts.append(f"run {run_dir}" + (f" [{record.label}]" if record.label else ""))
    return ", ".join(parts)


def status(job_id: str | None, out: TextIO = sys.stdout) -> int:
    """Print one job, or every registered job still queued or running plus the last five others."""
    if job_id is not None:
        print(describe(find_record(job_id)), file=out)
        return 0
    records = all_records()
    if not records:
        print("no jobs submitted with triarch submit", file=out)
        return 0
    lines = [describe(r) for r in records]
    active = [ln for ln in lines if ln.split(", ")[1] in ACTIVE_STATES]
    done = [ln for ln in lines if ln not in active][-5:]
    for line in done + active:
        print(line, file=out)
    return 0


def logs(job_id: str, rank: int, follow: bool, stream: str = "out", out: TextIO = sys.stdout,
         poll_s: float = 1.0) -> int:
    """Print (and with ``follow``, keep printing until the job ends) one rank's log."""
    record = find_record(job_id)
    if not 0 <= rank < record.tasks:
        raise SlurmError(f"--rank {rank} is out of range: job {job_id} has ranks 0..{record.tasks - 1}")
    path = record.log_path(rank, stream)
    while not path.exists():
        if not follow:
            raise SlurmError(f"job {job_id} has no log for rank {rank} yet ({path}); it may still be queued")
        time.sleep(poll_s)
    with open(path, errors="replace") as f:
        while True:
            chunk = f.read()
            if chunk:
                out.write(chunk)
                out.flush()
            if not follow:
                return 0
            fields = job_fields(record.job_id)
            if fields is None or fields.get("JobState") not in ACTIVE_STATES:
                out.write(f.read())
                return 0
            time.sleep(poll_s)


def cancel_job(job_id: str, out: TextIO = sys.stdout) -> int:
    """scancel the job (its committed checkpoints stay; submitting again resumes)."""
    record = find_record(job_id)
    cancel(record.job_id)
    print(f"cancelled job {record.job_id}; run directory {record.run_dir} keeps its committed checkpoints",
          file=out)
    return 0
