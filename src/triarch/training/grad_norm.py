"""The true global gradient norm across TP, PP and DP shards, and clipping by it."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, Shard

from triarch.parallel.topology import Topology


def _holders_fraction(grad: torch.Tensor, topo: Topology) -> float:
    """1 / (number of ranks within a pipeline stage that hold each element of ``grad``)."""
    stage_ranks = topo.world_size // topo.pp
    if not isinstance(grad, DTensor):
        return 1.0 / stage_ranks
    sharded = 1
    for size, placement in zip(grad.device_mesh.shape, grad.placements):
        if isinstance(placement, Shard) or type(placement).__name__ == "_StridedShard":
            sharded *= size
    return sharded / stage_ranks


@torch.no_grad()
def settle_partial_grads(modules: list[nn.Module]) -> None:
    """Bring each DTensor gradient to its parameter's layout.

    Sequence-parallel norm weights leave pending sums (Partial) and the vocab-parallel embedding may get a
    replicated gradient; both are redistributed so norms, clipping and the optimizer see final values.
    """
    for module in modules:
        for p in module.parameters():
            g = p.grad
            if isinstance(g, DTensor) and tuple(g.placements) != tuple(p.placements):
                p.grad = g.redistribute(g.device_mesh, p.placements)


@torch.no_grad()
def global_grad_norm(modules: list[nn.Module], topo: Topology) -> float:
    """L2 norm of all gradients of the whole model, identical on every rank (one world all-reduce)."""
    total = torch.zeros((), dtype=torch.float64, device=topo.device)
    seen: set[int] = set()
    for module in modules:
        for p in module.parameters():
            if p.grad is None or id(p) in seen:
                continue
            seen.add(id(p))
            local = p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad
            total += local.double().pow(2).sum() * _holders_fraction(p.grad, topo)
    dist.all_reduce(total)
    return math.sqrt(float(total))


@torch.no_grad()
def clip_gradients(modules: list[nn.Module], norm: float, max_norm: float) -> float:
    """Scale every gradient so the global norm is at most ``max_norm``; returns the factor used."""
    if max_norm <= 0 or norm <= max_norm or not math.isfinite(norm):
        return 1.0
    factor = max_norm / (norm + 1e-6)
    seen: set[int] = set()
    for module in modules:
        for p in module.parameters():
            if p.grad is not None and id(p) not in seen:
                seen.add(id(p))
                p.grad.mul_(factor)
    return factor
