"""The batch script's teardown: ``python -m triarch.slurm.after_job EXIT_CODE MAX_RETRIES RUN_DIR...``.

Runs on the job's first node after srun returned. A failed attempt is requeued while retries remain (the
run resumes from its newest committed checkpoint); the script exits with the code the job should end with.
For a job array, the run directory of this element is picked by ``SLURM_ARRAY_TASK_ID``.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

from triarch.slurm.requeue import RequeuePolicy, requeue_after_failure


def main(argv: list[str]) -> int:
    exit_code, max_retries, run_dirs = int(argv[0]), int(argv[1]), argv[2:]
    if exit_code == 0:
        return 0
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the requeue below ends this job's processes
    index = int(os.environ.get("SLURM_ARRAY_TASK_ID") or 0)
    run_dir = Path(run_dirs[index if index < len(run_dirs) else 0])
    job_id = os.environ.get("SLURM_JOB_ID", "")
    restart = int(os.environ.get("SLURM_RESTART_COUNT", 0))
    requeued = requeue_after_failure(run_dir, job_id, restart, exit_code, RequeuePolicy(max_retries=max_retries))
    return 0 if requeued else exit_code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
