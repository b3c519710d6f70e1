"""Helpers for the tests that drive the real local SLURM cluster (scripts/local_slurm.sh)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "local_slurm.sh"
STATE_DIR = Path(os.environ.get("TRIARCH_SLURM_DIR", "/var/tmp/triarch-slurm"))
SLURM_CONF = STATE_DIR / "slurm.conf"
ACTIVE = {"PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED", "SUSPENDED", "STOPPED", "SIGNALING"}


def start_cluster() -> None:
    """Start (or find running) the two-node cluster; fails loudly when it cannot."""
    done = subprocess.run(["bash", str(SCRIPT), "start"], capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        raise RuntimeError(f"local SLURM cluster did not start:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")


def slurm_env(home: Path) -> dict[str, str]:
    return {**os.environ, "SLURM_CONF": str(SLURM_CONF), "TRIARCH_HOME": str(home)}


def slurm(*args: str) -> str:
    done = subprocess.run(list(args), capture_output=True, text=True, timeout=60,
                          env={**os.environ, "SLURM_CONF": str(SLURM_CONF)})
    return done.stdout


def job_state(job_id: str) -> str:
    text = slurm("scontrol", "show", "job", "-o", job_id)
    for item in text.split():
        if item.startswith("JobState="):
            return item.split("=", 1)[1]
    return "FINISHED"


def wait_for_end(job_id: str, timeout_s: float) -> str:
    """Poll until the job leaves the active states; returns its final state."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        state = job_state(job_id)
        if state not in ACTIVE:
            return state
        time.sleep(1)
    slurm("scancel", job_id)
    raise AssertionError(f"job {job_id} still {job_state(job_id)} after {timeout_s} s")


def wait_for_step(run_dir: Path, step: int, timeout_s: float = 120) -> None:
    """Until metrics.jsonl holds ``step``."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if step in losses(run_dir):
            return
        time.sleep(0.2)
    raise AssertionError(f"{run_dir} never reached step {step}")


def losses(run_dir: Path) -> dict[int, float]:
    """Step -> loss; a step logged twice (re-run after a failure) keeps its last value."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return {}
    out = {}
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue  # a line being written
        if "loss" in row:
            out[row["step"]] = row["loss"]
    return out


def logged_steps(run_dir: Path) -> list[int]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in rows if "loss" in r]


def rank_pid(run_dir: Path, rank: int) -> int:
    return json.loads((run_dir / "heartbeats" / f"rank_{rank:05d}.json").read_text())["pid"]


def triarch(home: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "triarch.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=slurm_env(home), cwd=ROOT)


def submitted_job_id(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, result.stderr[-3000:]
    first = result.stdout.splitlines()[0]
    assert first.startswith("submitted job "), result.stdout
    return first.split()[2]
