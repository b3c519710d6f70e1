"""How many CPU threads one rank's torch may use: the node's cores shared among its local ranks."""

from __future__ import annotations

import os

import torch


def cores_for_this_rank() -> int:
    """CPU cores this rank may use: SLURM's allocation when under SLURM, else the process's affinity,
    shared among the ranks of this node."""
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if os.environ.get("SLURM_CPUS_PER_TASK"):
        return int(os.environ["SLURM_CPUS_PER_TASK"])
    if os.environ.get("SLURM_CPUS_ON_NODE"):
        return max(1, int(os.environ["SLURM_CPUS_ON_NODE"]) // local_world)
    return max(1, len(os.sched_getaffinity(0)) // local_world)


def configure_threads() -> None:
    """Share the CPU cores among the local ranks instead of oversubscribing them, on CPU and GPU ranks alike
    (a GPU rank's CPU work: data loading, pinned staging copies, the optimizer's host-side bits).
    OMP_NUM_THREADS, when set (a GPU job's batch script sets it from the allocation), wins.

    Oversubscribed ranks (each with torch's default of every core) lose time to OpenMP threads spinning at
    barriers while the other ranks' threads want the same cores (``benchmarks/rank_threads.py``)."""
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(cores_for_this_rank())
