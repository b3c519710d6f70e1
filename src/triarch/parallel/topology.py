"""The process layout: one DeviceMesh over (pp, dp_replicate, dp_shard, tp), tp innermost.

A :class:`Topology` is built once per rank after the process group exists and is passed explicitly to
everything that needs a group; nothing here is global. Besides the mesh (collectives on model tensors, on
the device) it carries ``host_group``: a gloo group over every rank for agreements about host values,
which an NCCL default group cannot run (``parallel.process_groups``).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from triarch.parallel.process_groups import host_group

MESH_DIMS = ("pp", "dp_replicate", "dp_shard", "tp")


@dataclass(frozen=True)
class Topology:
    """Sizes, this rank's coordinates and the device mesh of one run."""

    mesh: DeviceMesh
    dp_mesh: DeviceMesh
    device: torch.device
    pp: int
    dp_replicate: int
    dp_shard: int
    tp: int
    host_group: dist.ProcessGroup

    @classmethod
    def build(cls, device: torch.device, *, pp: int, dp_replicate: int, dp_shard: int, tp: int,
              host: dist.ProcessGroup | None = None) -> "Topology":
        """Create the mesh over the default process group (which must already exist); ``host`` is the host
        (gloo) group when the caller already made one."""
        world = dist.get_world_size()
        if pp * dp_replicate * dp_shard * tp != world:
            raise ValueError(f"layout pp{pp}*dpr{dp_replicate}*dps{dp_shard}*tp{tp} does not cover world {world}")
        mesh = init_device_mesh(device.type, (pp, dp_replicate, dp_shard, tp), mesh_dim_names=MESH_DIMS)
        dp_mesh = mesh["dp_replicate", "dp_shard"]._flatten("dp")
        return cls(mesh=mesh, dp_mesh=dp_mesh, device=device, pp=pp, dp_replicate=dp_replicate, dp_shard=dp_shard,
                   tp=tp, host_group=host if host is not None else host_group())

    @property
    def world_size(self) -> int:
        return self.pp * self.dp_replicate * self.dp_shard * self.tp

    @property
    def rank(self) -> int:
        return dist.get_rank()

    @property
    def dp(self) -> int:
        return self.dp_replicate * self.dp_shard

    def coord(self, dim: str) -> int:
        """This rank's index along one mesh dimension (the ``*_rank`` properties keep theirs: slicing the
        mesh builds a new DeviceMesh each time)."""
        return self.mesh[dim].get_local_rank()

    @cached_property
    def pp_rank(self) -> int:
        return self.coord("pp")

    @cached_property
    def tp_rank(self) -> int:
        return self.coord("tp")

    @cached_property
    def dp_rank(self) -> int:
        return self.coord("dp_replicate") * self.dp_shard + self.coord("dp_shard")

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1

    def describe(self) -> str:
        return f"pp{self.pp} x dp_replicate{self.dp_replicate} x dp_shard{self.dp_shard} x tp{self.tp}"
