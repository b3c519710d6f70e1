"""Grouped-query attention with fewer KV heads than tensor-parallel ranks.

When ``tp`` is a multiple of ``n_kv_heads``, each KV head serves ``tp / n_kv_heads`` ranks. The K and V
projections then stay whole (replicated) on every TP rank and each rank computes only the one KV head its
query heads use. Their weight gradients (and the input gradient) are partial per rank, so both pass
through an identity whose backward sums over the TP group.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate


class _SumGradOverGroup(torch.autograd.Function):
    """Identity forward; all-reduce (sum) of the gradient over ``group`` in backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class ReplicatedKVProjection(nn.Module):
    """A K or V projection kept whole on each TP rank; the forward returns only this rank's KV head."""

    def __init__(self, linear: nn.Linear, tp_mesh: DeviceMesh, n_kv_heads: int, head_dim: int) -> None:
        super().__init__()
        tp = tp_mesh.size()
        self.group = tp_mesh.get_group()
        self.head = tp_mesh.get_local_rank() // (tp // n_kv_heads)
        self.head_dim = head_dim
        self.weight = nn.Parameter(DTensor.from_local(linear.weight.data, tp_mesh, [Replicate()], run_check=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight.to_local() if isinstance(self.weight, DTensor) else self.weight
        rows = slice(self.head * self.head_dim, (self.head + 1) * self.head_dim)
        weight = _SumGradOverGroup.apply(weight, self.group)
        return F.linear(_SumGradOverGroup.apply(x, self.group), weight[rows])


def replicate_kv_projections(attention: nn.Module, tp_mesh: DeviceMesh, n_kv_heads: int, head_dim: int) -> None:
    """Swap ``attention.wk`` / ``attention.wv`` for replicated per-rank-head projections (in place)."""
    attention.wk = ReplicatedKVProjection(attention.wk, tp_mesh, n_kv_heads, head_dim)
    attention.wv = ReplicatedKVProjection(attention.wv, tp_mesh, n_kv_heads, head_dim)
