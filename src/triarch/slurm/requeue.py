"""Deciding whether a job attempt goes back in the queue, and doing it.

* A stop signal (USR2) that the ranks answered with a committed checkpoint: rank 0 requeues. It counts as
  a time-out when the job is within ``signal_delay_s`` (plus a margin) of its time limit, else as a
  preemption. Preemptions requeue without limit, time-outs up to ``max_timeouts``.
* A failed attempt (a rank crashed, a node died, the watchdog found a hang): the batch script's teardown
  requeues it while ``max_retries`` allows; the run resumes from its newest committed checkpoint.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from triarch.slurm.commands import SlurmError, requeue, time_left_s
from triarch.slurm.ledger import attempt_event, attempt_key, locked_ledger, note, record

TIMEOUT_MARGIN_S = 60


@dataclass(frozen=True)
class RequeuePolicy:
    """Limits carried by the submitted job."""

    max_retries: int = 0
    max_timeouts: int = 3
    signal_delay_s: int = 120


def classify_stop(time_left: float | None, signal_delay_s: int) -> str:
    """``timeout`` when the time limit is near, else ``preemption``."""
    if time_left is not None and time_left <= signal_delay_s + TIMEOUT_MARGIN_S:
        return "timeout"
    return "preemption"


def _say(message: str) -> None:
    print(f"triarch: {message}", file=sys.stderr, flush=True)


def requeue_after_stop(run_dir: Path, job_id: str, restart_count: int, step: int, reason: str,
                       policy: RequeuePolicy) -> bool:
    """Rank 0, after every rank saved: requeue unless the time-out budget is spent. True if requeued."""
    kind = classify_stop(time_left_s(job_id), policy.signal_delay_s)
    attempt = attempt_key(job_id, restart_count)
    with locked_ledger(run_dir) as ledger:
        event = attempt_event(ledger, attempt)
        if event is not None:
            return event["kind"] in ("preemption", "timeout")
        if kind == "timeout" and ledger["counts"]["timeout"] >= policy.max_timeouts:
            note(ledger, "stopped", attempt, f"time limit after step {step}; --max-timeouts used up")
            _say(f"job {job_id} reached its time limit {ledger['counts']['timeout'] + 1} times "
                 f"(--max-timeouts {policy.max_timeouts}); saved step {step} and not requeued; "
                 f"submit again with the same --run-dir to continue")
            return False
        record(ledger, kind, attempt, f"{reason} after step {step}")
    try:
        requeue(job_id)
    except SlurmError as err:
        with locked_ledger(run_dir) as ledger:
            note(ledger, "stopped", attempt, f"requeue failed: {err}")
        _say(f"saved step {step} but could not requeue job {job_id}: {err}")
        return False
    _say(f"{kind} ({reason}): saved step {step}, requeued job {job_id}")
    return True


def requeue_after_failure(run_dir: Path, job_id: str, restart_count: int, exit_code: int,
                          policy: RequeuePolicy) -> bool:
    """The batch script, after srun ended with ``exit_code`` != 0: requeue while retries remain."""
    attempt = attempt_key(job_id, restart_count)
    with locked_ledger(run_dir) as ledger:
        event = attempt_event(ledger, attempt)
        if event is not None:  # a stop signal already requeued this attempt, or ended it on purpose
            return event["kind"] in ("preemption", "timeout")
        used = ledger["counts"]["failure"]
        if used >= policy.max_retries:
            _say(f"job {job_id} failed (exit code {exit_code}); no retries left ({used} of --max-retries "
                 f"{policy.max_retries} used)")
            return False
        record(ledger, "failure", attempt, f"exit code {exit_code}")
    try:
        requeue(job_id)
    except SlurmError as err:
        _say(f"job {job_id} failed (exit code {exit_code}) and could not be requeued: {err}")
        return False
    _say(f"job {job_id} failed (exit code {exit_code}); retry {used + 1} of {policy.max_retries}: requeued, "
         "it resumes from the newest committed checkpoint")
    return True
