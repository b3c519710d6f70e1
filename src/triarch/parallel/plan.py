"""Measure a layout without hardware: build every pipeline stage on the meta device under a fake
process group and count the parameters each rank would hold (a 70B config in about a second)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from triarch.config import TriarchConfig, validate_for_world
from triarch.parallel.topology import Topology


@dataclass(frozen=True)
class StagePlan:
    """Parameters held by one rank of a pipeline stage (all ranks of a stage hold the same amount)."""

    pp_rank: int
    rank: int
    local_parameters: int


def plan_layout(cfg: TriarchConfig, world_size: int) -> list[StagePlan]:
    """Per pipeline stage, the parameter elements on its first rank (no memory is allocated)."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from triarch.engine.build import build_engine

    if dist.is_initialized():
        raise RuntimeError("plan_layout needs a process without a process group")
    cfg = validate_for_world(cfg, world_size)
    p = cfg.parallel
    ranks_per_stage = world_size // p.pp
    plans = []
    for stage in range(p.pp):
        rank = stage * ranks_per_stage
        dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)
        try:
            topo = Topology.build(torch.device("cpu"), pp=p.pp, dp_replicate=p.dp_replicate, dp_shard=p.dp_shard, tp=p.tp)
            engine = build_engine(cfg, topo, materialize_weights=False)
            plans.append(StagePlan(stage, rank, engine.local_parameter_count()))
        finally:
            dist.destroy_process_group()
    return plans
