"""The true global gradient norm across TP, PP and DP shards, and clipping by it.

Per step this is a handful of foreach kernels, not several ops per parameter: gradients are grouped by
how many ranks of a pipeline stage hold each of their elements (a fraction fixed by the parameter's
placements), each group's local shards go through one ``_foreach_norm``, and the weighted sum of squares
stays on the device until the caller's (fused) all-reduce.
"""

from __future__ import annotations

import math
from collections import defaultdict

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, Shard

from triarch.parallel.topology import Topology


def holders_fraction(param: torch.Tensor, topo: Topology) -> float:
    """1 / (number of ranks within a pipeline stage that hold each element of ``param``'s gradient)."""
    stage_ranks = topo.world_size // topo.pp
    if not isinstance(param, DTensor):
        return 1.0 / stage_ranks
    sharded = 1
    for size, placement in zip(param.device_mesh.shape, param.placements):
        if isinstance(placement, Shard) or type(placement).__name__ == "_StridedShard":
            sharded *= size
    return sharded / stage_ranks


def unique_parameters(modules: list[nn.Module]) -> list[nn.Parameter]:
    """Every parameter of ``modules`` once (tied weights once), in module order."""
    seen: set[int] = set()
    out = []
    for module in modules:
        for p in module.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                out.append(p)
    return out


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of ``t`` (itself when not a DTensor); shares storage, so in-place ops reach ``t``."""
    return t.to_local() if isinstance(t, DTensor) else t


@torch.no_grad()
def settle_partial_grads(modules: list[nn.Module]) -> None:
    """Bring each DTensor gradient to its parameter's layout.

    Sequence-parallel norm weights leave pending sums (Partial) and the vocab-parallel embedding may get a
    replicated gradient; both are redistributed so norms, clipping and the optimizer see final values.
    """
    for p in unique_parameters(modules):
        g = p.grad
        if isinstance(g, DTensor) and tuple(g.placements) != tuple(p.placements):
            p.grad = g.redistribute(g.device_mesh, p.placements)


class GradNormer:
    """Computes this rank's share of the squared global gradient norm with foreach kernels.

    The grouping by holder fraction is computed once (placements do not change during training); the sum
    over all ranks of :meth:`local_square_sum` is the squared norm of the whole model's gradient.
    """

    def __init__(self, modules: list[nn.Module], topo: Topology) -> None:
        groups: dict[float, list[nn.Parameter]] = defaultdict(list)
        for p in unique_parameters(modules):
            groups[holders_fraction(p, topo)].append(p)
        self.groups = dict(groups)
        self.device = topo.device

    @torch.no_grad()
    def local_square_sum(self) -> torch.Tensor:
        """float64 scalar on the device: sum over this rank's gradient shards of (fraction x squared norm)."""
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        for fraction, params in self.groups.items():
            grads = [local_tensor(p.grad) for p in params if p.grad is not None]
            grads = [g for g in grads if g.numel()]
            if not grads:
                continue
            norms = torch._foreach_norm(grads, 2, dtype=torch.float64)
            total += torch.stack(norms).square().sum() * fraction
        return total

    def grads(self) -> list[torch.Tensor]:
        """Local shards of every existing gradient."""
        return [local_tensor(p.grad) for params in self.groups.values() for p in params if p.grad is not None]


def clip_factor(norm: float, max_norm: float) -> float:
    """Factor that scales the gradient to a global norm of at most ``max_norm`` (1 when no clipping)."""
    if max_norm <= 0 or norm <= max_norm or not math.isfinite(norm):
        return 1.0
    return max_norm / (norm + 1e-6)


@torch.no_grad()
def scale_gradients(grads: list[torch.Tensor], factor: float) -> None:
    """Multiply every gradient shard by ``factor`` in one foreach kernel (no-op for 1)."""
    if factor != 1.0 and grads:
        torch._foreach_mul_(grads, factor)


@torch.no_grad()
def global_grad_norm(modules: list[nn.Module], topo: Topology) -> float:
    """L2 norm of all gradients of the whole model, identical on every rank (one world all-reduce)."""
    total = GradNormer(modules, topo).local_square_sum()
    dist.all_reduce(total)
    return math.sqrt(float(total))


@torch.no_grad()
def clip_gradients(modules: list[nn.Module], norm: float, max_norm: float) -> float:
    """Scale every gradient so the global norm is at most ``max_norm``; returns the factor used."""
    factor = clip_factor(norm, max_norm)
    scale_gradients([local_tensor(p.grad) for p in unique_parameters(modules) if p.grad is not None], factor)
    return factor
