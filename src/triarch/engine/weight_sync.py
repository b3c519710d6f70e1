"""Copy a model's weights between two engines of the same model, whatever each one's sharding.

The megatron engine generates its rollouts on a frozen native engine of the same layout (megatron-core has no
KV-cache sampler of ours): before each rollout the trainer's current weights are written into the rollout
engine under canonical names, as an RL framework syncs its trainer into its inference engine. Each tensor is
gathered to its full value over the source's mesh, and each rank keeps the part its target shard holds
(``parallel.init.local_indices``: TP shards and FSDP's strided shards alike). Cost per sync: one all-gather of
every weight over the source's TP group and a full-size temporary per tensor; fine for the models RL runs
here, and the place for a shard-to-shard redistribution when rollouts of large models need it.
"""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor

from triarch.parallel.init import local_indices


@torch.no_grad()
def copy_weights(source: dict[str, torch.Tensor], target: dict[str, torch.Tensor]) -> None:
    """Write every canonical tensor of ``source`` into ``target``'s tensor of that name, in place (collective
    over the source's meshes: call on every rank, with the same names)."""
    if source.keys() != target.keys():
        only_source, only_target = sorted(source.keys() - target.keys()), sorted(target.keys() - source.keys())
        raise RuntimeError(f"weight sync: names differ (only in the source: {only_source[:4]}, only in the target: "
                           f"{only_target[:4]})")
    for name in sorted(source):  # one order on every rank: each full_tensor() is a collective
        src, dst = source[name], target[name]
        if tuple(src.shape) != tuple(dst.shape):
            raise RuntimeError(f"weight sync: {name} is {tuple(src.shape)} in the source, {tuple(dst.shape)} in the "
                               f"target")
        full = src.full_tensor() if isinstance(src, DTensor) else src
        local = dst.to_local() if isinstance(dst, DTensor) else dst
        for dim, index in enumerate(local_indices(dst)):
            if index.numel() != full.shape[dim]:
                full = full.index_select(dim, index.to(full.device))
        local.copy_(full.to(device=local.device, dtype=local.dtype))
