"""What each SLURM task runs (submitit pickles a :class:`TrainJob` and calls it on every task)."""

from __future__ import annotations

import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

from triarch.launcher import exit_codes
from triarch.launcher.stop_signal import StopRequest
from triarch.slurm.environment import SlurmTask, rendezvous_env, resolve_master
from triarch.slurm.requeue import RequeuePolicy, requeue_after_stop

EXIT_STOPPED = exit_codes.STOPPED


@dataclass(frozen=True)
class TrainJob:
    """Train (or resume) the run in ``run_dir`` as one rank of the job."""

    run_dir: str
    policy: RequeuePolicy
    config: str | None = None  # this submission's attempt config (RUN_DIR/attempts/NNNN.yaml)

    def __call__(self) -> int:
        stop = StopRequest().install()  # first: USR2 may come at any moment, even during start-up
        task = SlurmTask.from_environ()
        os.environ.update(rendezvous_env(task, resolve_master(task.nodelist)))
        # the requeue SLURM answers with SIGTERM must not interrupt rank 0 between saving and requeuing
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        from triarch.launcher.parent_watch import die_with_parent
        from triarch.launcher.rank_main import execute_rank
        from triarch.launcher.run_lock import RunDirBusy, hold_shared

        run_dir = Path(self.run_dir)
        die_with_parent()  # a dead step daemon takes this task with it
        try:
            hold_shared(run_dir)  # a local `triarch train` on this run directory is refused while the job lives
        except RunDirBusy as err:
            print(f"error: {err}", file=sys.stderr, flush=True)
            sys.exit(exit_codes.CONFIG)
        print(f"triarch: job {task.job_id} attempt {task.restart_count}, rank {task.rank} of {task.world_size} "
              f"on node {task.node_index} of {task.num_nodes} ({task.nodelist}), master "
              f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}", flush=True)
        outcome = execute_rank(run_dir, stop, config=Path(self.config) if self.config else None)
        if outcome.stop_reason and task.rank == 0:
            step = _last_committed_step(run_dir)
            if not requeue_after_stop(run_dir, task.job_id, task.restart_count, step, outcome.stop_reason,
                                      self.policy):
                sys.exit(EXIT_STOPPED)  # saved but not requeued: the job must not look finished
        if outcome.code:
            sys.exit(outcome.code)  # SystemExit passes submitit's handler: the task ends with this code
        return outcome.code


def _last_committed_step(run_dir: Path) -> int:
    from triarch.checkpointing.manager import list_steps

    committed = [s.step for s in list_steps(run_dir / "checkpoints") if s.committed]
    return committed[-1] if committed else 0
