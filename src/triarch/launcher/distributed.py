"""Process-group setup for one rank, from the environment torch's launchers (or SLURM glue) provide."""

from __future__ import annotations

import os
import sys
from datetime import timedelta

import torch
import torch.distributed as dist

from triarch.config import ConfigError
from triarch.launcher.cpu_threads import configure_threads


def pick_device(requested: str) -> torch.device:
    """``auto`` means this rank's CUDA device when there is one, else the CPU; see :func:`cuda_index`."""
    use_cuda = requested == "cuda" or (requested == "auto" and torch.cuda.is_available())
    if not use_cuda:
        return torch.device("cpu")
    visible = torch.cuda.device_count()
    if visible == 0:
        raise ConfigError(f"train.device is {requested} but this process sees no CUDA device")
    local_rank = _env_int("LOCAL_RANK")
    local_world = _env_int("LOCAL_WORLD_SIZE") or _env_int("WORLD_SIZE") or 1
    index = cuda_index(local_rank, visible, local_world)
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


def cuda_index(local_rank: int | None, visible: int, local_world: int) -> int:
    """The CUDA device index of a rank, from its LOCAL_RANK (None when unset), the number of CUDA devices it
    sees and the number of ranks on its node (the world size when the node's share is unknown).

    One visible device is this rank's whatever its LOCAL_RANK (SLURM's ``--gpus-per-task 1`` / ``--gpu-bind``
    give each task its own); with several visible, LOCAL_RANK picks one. Raises :class:`ConfigError` when
    LOCAL_RANK names a device that is not visible, or is missing while several ranks could share the node.
    """
    if visible < 1:
        raise ConfigError(f"no CUDA device is visible to this rank (LOCAL_RANK {local_rank})")
    if visible == 1:
        return 0
    if local_rank is None:
        if local_world > 1:
            raise ConfigError(f"LOCAL_RANK is not set and {visible} CUDA devices are visible to one of "
                              f"{local_world} ranks: start ranks through triarch or torchrun, or set LOCAL_RANK")
        return 0
    if not 0 <= local_rank < visible:
        raise ConfigError(f"LOCAL_RANK {local_rank} has no CUDA device: this rank sees {visible} "
                          f"(indices 0-{visible - 1}) with {local_world} ranks on the node; make every GPU of the "
                          "node visible to each rank, or give each rank exactly one")
    return local_rank


def _env_int(name: str) -> int | None:
    """An integer environment variable set by the launcher (None when unset)."""
    text = os.environ.get(name)
    if text is None or text == "":
        return None
    try:
        return int(text)
    except ValueError:
        raise ConfigError(f"{name} ({text!r}) must be an integer") from None


def init_distributed(device: torch.device, timeout_s: float = 600.0) -> None:
    """Join the default process group (NCCL on CUDA, gloo on CPU); a lone process gets a world of one.
    The process also takes its share of the node's CPU cores (:func:`configure_threads`)."""
    if dist.is_initialized():
        return
    configure_threads()
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


def exit_process(code: int) -> None:
    """End a rank process with ``code`` once its work is done and its output flushed, skipping interpreter
    teardown: a rank that used pipelining or gloo can otherwise abort there ("terminate called without an
    active exception", SIGABRT) after everything succeeded, while torch's C++ threads are destroyed."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
