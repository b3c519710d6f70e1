"""Process-group setup for one rank, from the environment torch's launchers (or SLURM glue) provide."""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist


def pick_device(requested: str) -> torch.device:
    """``auto`` means the local CUDA device when there is one, else the CPU."""
    use_cuda = requested == "cuda" or (requested == "auto" and torch.cuda.is_available())
    if use_cuda:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def init_distributed(device: torch.device, timeout_s: float = 600.0) -> None:
    """Join the default process group (NCCL on CUDA, gloo on CPU); a lone process gets a world of one."""
    if dist.is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    kwargs = {"device_id": device} if device.type == "cuda" else {}
    if "RANK" in os.environ and "MASTER_PORT" in os.environ:  # started by a launcher
        dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s), **kwargs)
        return
    # a lone process: a private in-memory store, and nothing written to os.environ that child processes
    # (which may start their own group) would inherit
    store = dist.HashStore()
    dist.init_process_group(backend=backend, store=store, rank=0, world_size=1,
                            timeout=timedelta(seconds=timeout_s), **kwargs)


def shutdown_distributed(*, sync: bool = False) -> None:
    """Destroy the default process group if one exists; ``sync`` first waits for every rank (success path),
    so no rank tears down its connections while another still talks to it."""
    if dist.is_initialized():
        if sync:
            dist.barrier()
        dist.destroy_process_group()
