"""Data parallelism through FSDP2: sharded (dp_shard), hybrid (dp_replicate x dp_shard) or replicated.

One code path covers all three (and bf16 at dp = 1, see ``apply_data_parallel``): ``fully_shard`` over a 1-D mesh shards, over a 2-D
(dp_replicate, dp_shard) mesh it shards within a group and all-reduces across groups (HSDP), and with
dp_shard = 1 that is plain replication with DDP's gradient all-reduce.
"""

from __future__ import annotations

import torch
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

from triarch.models.llama import Llama
from triarch.parallel.topology import Topology


def apply_data_parallel(model: Llama, topo: Topology, *, param_dtype: torch.dtype | None, reshard_after_forward: bool,
                        offload: bool = False) -> None:
    """Wrap each block, then the chunk root, with FSDP2 on the data-parallel mesh (in place).

    With a low-precision ``param_dtype`` the model is wrapped even when dp = 1 (a mesh of one rank), so
    every layout computes with the same scheme: fp32 master weights, low-precision parameters and
    activations in forward and backward (also the residual stream and pipeline messages), fp32 gradient
    reduction. Without it dp = 1 needs no wrapping.

    ``offload``: FSDP2's CPU offload policy (sharded parameters, gradients and optimizer state in host memory,
    pinned on CUDA); the model must then be materialized on the CPU (``parallel.init.materialize``). It wraps
    at dp = 1 too.
    """
    if topo.dp == 1 and param_dtype is None and not offload:
        return
    if topo.dp_replicate > 1:
        mesh = topo.mesh["dp_replicate", "dp_shard"]
    else:
        mesh = topo.mesh["dp_shard"]
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    where = CPUOffloadPolicy(pin_memory=topo.device.type == "cuda") if offload else OffloadPolicy()
    for block in model.layers.values():
        fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward,
                    offload_policy=where)
    fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward, offload_policy=where)
