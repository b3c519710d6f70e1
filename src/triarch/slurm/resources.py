"""CPUs, memory, GPU visibility and threads of each task of a submitted job.

GPU jobs default to the whole node shared among its ranks: ``--cpus-per-task`` = CPUs per node / ranks per
node, ``--mem=0`` (all of each node's memory: pinned staging buffers and data workers live there), and the
thread count of each rank set to its CPUs. The CPUs per node come from ``sinfo`` (the smallest over the
partition's nodes) when SLURM answers at submission; when they are unknown (``--dry-run`` away from the
cluster) the job asks for whole nodes (``--exclusive``) and the batch script divides ``SLURM_CPUS_ON_NODE``
among the ranks. An explicit ``--cpus-per-task`` or ``--mem`` always wins.

Every task sees every GPU of its node (``srun --gpu-bind=none``) and takes ``cuda:LOCAL_RANK``: NCCL's
intra-node peer-to-peer paths (NVLink, CUDA IPC) need the peers' GPUs visible to each process; with one
GPU per task (and cgroup-constrained devices) NCCL falls back to copies through host memory.

CPU jobs get what was asked, as before (``--tasks-per-node`` tasks, threads from SLURM's allocation).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from triarch.slurm.commands import SlurmError, run_slurm

WHOLE_NODE_MEMORY = "0"  # SLURM's --mem=0: all the memory of each node
SINFO_TIMEOUT_S = 15.0


@dataclass(frozen=True)
class TaskResources:
    """What the job script says about resources: sbatch parameters, srun arguments and setup lines."""

    sbatch: dict[str, Any] = field(default_factory=dict)
    srun_args: list[str] = field(default_factory=list)
    setup: list[str] = field(default_factory=list)


def task_resources(gpus_per_node: int, ranks_per_node: int, *, cpus_per_node: int | None,
                   cpus_per_task: int | None, mem: str | None, exclusive: bool) -> TaskResources:
    """The resources of each task; see the module docstring for the GPU defaults."""
    if not gpus_per_node:
        sbatch = {key: value for key, value in (("cpus_per_task", cpus_per_task), ("mem", mem)) if value is not None}
        srun = [f"--cpus-per-task={cpus_per_task}"] if cpus_per_task else []  # srun >= 22.05 does not inherit it
        return TaskResources({**sbatch, **({"exclusive": True} if exclusive else {})}, srun)
    memory = WHOLE_NODE_MEMORY if mem is None else mem
    cpus = cpus_per_task or (max(1, cpus_per_node // ranks_per_node) if cpus_per_node else None)
    if cpus:
        return TaskResources({"cpus_per_task": cpus, "mem": memory, **({"exclusive": True} if exclusive else {})},
                             ["--gpu-bind=none", f"--cpus-per-task={cpus}"],
                             [f"export OMP_NUM_THREADS={cpus}"])
    return TaskResources(
        {"mem": memory, "exclusive": True}, ["--gpu-bind=none"],
        [f"# CPUs per node unknown at submission: whole nodes, their CPUs shared by the {ranks_per_node} ranks",
         f"export SRUN_CPUS_PER_TASK=$(( SLURM_CPUS_ON_NODE / {ranks_per_node} ))",
         "export OMP_NUM_THREADS=$SRUN_CPUS_PER_TASK"])


def smallest_cpus_per_node(sinfo_text: str, partition: str | None) -> int | None:
    """The fewest CPUs of a node of ``partition`` (the default one, marked ``*``, when None) in the output of
    ``sinfo -h -N -o "%P %c"``; None when no line matches."""
    counts = []
    for line in sinfo_text.splitlines():
        parts = line.split()
        if len(parts) != 2 or not parts[1].rstrip("+").isdigit():
            continue
        name, cpus = parts[0], int(parts[1].rstrip("+"))
        if (name.rstrip("*") == partition) if partition else name.endswith("*"):
            counts.append(cpus)
    return min(counts) if counts else None


def partition_cpus_per_node(partition: str | None) -> int | None:
    """CPUs per node of ``partition`` as SLURM reports them (the smallest over its nodes); None when SLURM
    does not answer or knows no such partition."""
    try:
        text = run_slurm(["sinfo", "-h", "-N", "-o", "%P %c"], timeout_s=SINFO_TIMEOUT_S)
    except SlurmError:
        return None
    return smallest_cpus_per_node(text, partition)
