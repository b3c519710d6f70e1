"""Thin wrappers over SLURM's command-line tools that turn their failures into one-line errors."""

from __future__ import annotations

import re
import shutil
import subprocess


class SlurmError(RuntimeError):
    """A SLURM command failed or is missing; the message is one line."""


def run_slurm(args: list[str], *, timeout_s: float = 60) -> str:
    """Run a SLURM tool and return its stdout; its stderr's last line becomes the error otherwise."""
    if shutil.which(args[0]) is None:
        raise SlurmError(f"'{args[0]}' not found: this machine has no SLURM client tools on PATH")
    try:
        done = subprocess.run(args, capture_output=True, text=True, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired:
        raise SlurmError(f"'{' '.join(args)}' did not answer within {timeout_s:.0f} s") from None
    if done.returncode != 0:
        lines = [ln.strip() for ln in (done.stderr or done.stdout).splitlines() if ln.strip()]
        raise SlurmError(f"{args[0]} failed: {lines[-1] if lines else f'exit code {done.returncode}'}")
    return done.stdout


def expand_hostnames(nodelist: str) -> list[str]:
    """``n[1-2],gpu7`` -> ``['n1', 'n2', 'gpu7']`` (through ``scontrol show hostnames``)."""
    return run_slurm(["scontrol", "show", "hostnames", nodelist]).split()


def node_address(node: str) -> str:
    """The address other nodes reach ``node`` at (its NodeAddr; the name itself when unset)."""
    text = run_slurm(["scontrol", "show", "node", "-o", node])
    match = re.search(r"\bNodeAddr=(\S+)", text)
    return match.group(1) if match else node


def job_fields(job_id: str) -> dict[str, str] | None:
    """``scontrol show job -o`` as key/value pairs, or None when the controller forgot the job."""
    try:
        text = run_slurm(["scontrol", "show", "job", "-o", job_id])
    except SlurmError as err:
        if "Invalid job id" in str(err):
            return None
        raise
    line = text.splitlines()[0] if text.strip() else ""
    return dict(re.findall(r"(\w+(?::\w+)?)=(\S*)", line)) if line else None


def parse_duration_s(text: str) -> float | None:
    """SLURM's ``[D-]HH:MM:SS`` / ``MM:SS`` / ``MM`` as seconds; None for UNLIMITED or unparsable."""
    text = text.strip()
    match = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text)
    if not match:
        return None
    days, a, b, c = match.groups()
    if "-" in text:  # D-HH[:MM[:SS]]
        parts = [int(a), int(b or 0), int(c or 0)]
    elif c is not None:  # HH:MM:SS
        parts = [int(a), int(b), int(c)]
    elif b is not None:  # MM:SS
        parts = [0, int(a), int(b)]
    else:  # MM
        parts = [0, int(a), 0]
    return int(days or 0) * 86400 + parts[0] * 3600 + parts[1] * 60 + parts[2]


def time_left_s(job_id: str) -> float | None:
    """Seconds until the job's time limit (None when unlimited or unknown)."""
    try:
        return parse_duration_s(run_slurm(["squeue", "-h", "-j", job_id, "-o", "%L"]))
    except SlurmError:
        return None


def requeue(job_id: str) -> None:
    """Put a running job back in the queue (SLURM ends its processes; it restarts with the same id)."""
    run_slurm(["scontrol", "requeue", job_id])


def cancel(job_id: str) -> None:
    run_slurm(["scancel", job_id])
