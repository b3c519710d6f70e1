"""Where this task sits in a SLURM job, and the torch.distributed rendezvous derived from it.

The master is the first host of the job's node list; the port is derived from the job id and the restart
count, so every task of one attempt agrees without talking, and a requeued attempt does not collide with
sockets of the previous one still in TIME_WAIT. Ports stay below Linux's ephemeral range (32768 and up by
default), where outgoing connections of this or another job could already hold the port.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass

from triarch.slurm.commands import expand_hostnames, node_address

PORT_BASE = 20000
EPHEMERAL_PORT_START = 32768  # Linux's default net.ipv4.ip_local_port_range starts here
PORT_SPAN = 12000  # ports 20000-31999; coprime with the strides below, so they reach every port
JOB_STRIDE = 7
RESTART_STRIDE = 101


@dataclass(frozen=True)
class SlurmTask:
    """The SLURM facts one rank needs."""

    job_id: str
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    node_index: int
    num_nodes: int
    nodelist: str
    restart_count: int

    @classmethod
    def from_environ(cls, env: Mapping[str, str] | None = None) -> "SlurmTask":
        """Read the variables srun sets for each task (raises KeyError outside a SLURM step)."""
        env = os.environ if env is None else env
        world = int(env["SLURM_NTASKS"])
        nodes = int(env.get("SLURM_JOB_NUM_NODES") or env.get("SLURM_NNODES") or 1)
        return cls(job_id=env["SLURM_JOB_ID"], rank=int(env["SLURM_PROCID"]), world_size=world,
                   local_rank=int(env.get("SLURM_LOCALID", 0)), local_world_size=tasks_on_this_node(env, world, nodes),
                   node_index=int(env.get("SLURM_NODEID", 0)), num_nodes=nodes,
                   nodelist=env.get("SLURM_STEP_NODELIST") or env["SLURM_JOB_NODELIST"],
                   restart_count=int(env.get("SLURM_RESTART_COUNT", 0)))


def tasks_on_this_node(env: Mapping[str, str], world: int, nodes: int) -> int:
    """Tasks on this task's node, from SLURM_STEP_TASKS_PER_NODE (``2(x3),1``) and SLURM_NODEID."""
    spec = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE")
    if not spec:
        return max(1, world // max(1, nodes))
    counts: list[int] = []
    for part in spec.split(","):
        count, _, repeat = part.partition("(x")
        counts += [int(count)] * (int(repeat.rstrip(")")) if repeat else 1)
    node = int(env.get("SLURM_NODEID", 0))
    return counts[node] if node < len(counts) else counts[-1]


def master_port(job_id: str, restart_count: int) -> int:
    """A port every task computes alike; it moves on each requeue of the job."""
    digits = "".join(ch for ch in job_id if ch.isdigit()) or "0"
    return PORT_BASE + (int(digits) * JOB_STRIDE + restart_count * RESTART_STRIDE) % PORT_SPAN


def resolve_master(nodelist: str) -> str:
    """The address of the first node: its name when the name resolves, else SLURM's NodeAddr."""
    first = expand_hostnames(nodelist)[0]
    try:
        socket.getaddrinfo(first, None)
        return first
    except socket.gaierror:
        return node_address(first)


def rendezvous_env(task: SlurmTask, master_addr: str) -> dict[str, str]:
    """The environment torch.distributed's ``env://`` initialisation reads."""
    return {"MASTER_ADDR": master_addr, "MASTER_PORT": str(master_port(task.job_id, task.restart_count)),
            "RANK": str(task.rank), "WORLD_SIZE": str(task.world_size), "LOCAL_RANK": str(task.local_rank),
            "LOCAL_WORLD_SIZE": str(task.local_world_size), "GROUP_RANK": str(task.node_index)}
