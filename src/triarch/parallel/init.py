"""Materialize a meta-device model after parallelization with layout-independent initial weights.

Each parameter's full value comes from a generator seeded by (seed, parameter name), so every layout
(any TP/PP/DP split) starts from the same full weights; each rank then keeps only its own shard.
"""

from __future__ import annotations

import math
import zlib

import torch
from torch import nn
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from triarch.models.llama import Llama

_WRAPPER_PREFIXES = ("_checkpoint_wrapped_module.", "_orig_mod.", "_fsdp_wrapped_module.")


def canonical_name(name: str) -> str:
    """Parameter name with wrapper segments (activation checkpointing, compile) removed."""
    for prefix in _WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def full_init_value(name: str, shape: torch.Size, *, seed: int, std: float, n_layers: int) -> torch.Tensor:
    """The full float32 initial value of one parameter, identical on every rank and layout."""
    if name.endswith("norm.weight"):
        return torch.ones(shape)
    gen = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63))
    scale = std / math.sqrt(2 * n_layers) if name.endswith(("attention.wo.weight", "feed_forward.w2.weight")) else std
    return torch.randn(shape, generator=gen) * scale


def local_part(full: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """The slice of ``full`` this rank holds for ``param`` (a DTensor or a plain tensor)."""
    if not isinstance(param, DTensor):
        return full
    shape, offset = compute_local_shape_and_global_offset(full.shape, param.device_mesh, param.placements)
    index = tuple(slice(o, o + s) for o, s in zip(offset, shape))
    return full[index]


@torch.no_grad()
def materialize(model: Llama, device: torch.device, *, seed: int, std: float) -> None:
    """Allocate ``model`` on ``device`` and fill every parameter with its layout-independent value."""
    model.to_empty(device=device)
    model.reset_buffers()
    n_layers = model.args.n_layers
    for raw_name, param in model.named_parameters():
        name = canonical_name(raw_name)
        full = full_init_value(name, param.shape, seed=seed, std=std, n_layers=n_layers)
        local = param.to_local() if isinstance(param, DTensor) else param
        part = local_part(full, param)
        if part.shape != local.shape:
            raise RuntimeError(f"init of {name}: local shard {tuple(local.shape)} != computed {tuple(part.shape)}")
        local.copy_(part.to(local.dtype))


def full_parameters(modules: list[nn.Module]) -> dict[str, torch.Tensor]:
    """Gather every parameter of these modules to a full CPU tensor, keyed by canonical name (collective)."""
    out: dict[str, torch.Tensor] = {}
    for module in modules:
        for raw_name, param in module.named_parameters():
            value = param.full_tensor() if isinstance(param, DTensor) else param.detach()
            out[canonical_name(raw_name)] = value.detach().cpu().clone()
    return out
