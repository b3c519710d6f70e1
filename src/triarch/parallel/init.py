"""Materialize a meta-device model after parallelization with layout-independent initial weights.

Each parameter's full value is a grid of fixed tiles drawn from generators seeded by (seed, parameter
name, tile index) (``parallel.tiled_normal``), so every layout (any TP/PP/DP split, or one process)
starts from the same full weights. Each rank draws only the tiles that its own shard touches, so the
work per rank follows its shard (plus tile rounding), not the full parameter.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import torch
from torch import nn
from torch.distributed.tensor import DTensor, Shard
from torch.distributed.tensor.placement_types import Placement, _StridedShard

from triarch.models.llama import Llama
from triarch.parallel.tiled_normal import Box, standard_normal_box

_WRAPPER_PREFIXES = ("_checkpoint_wrapped_module.", "_orig_mod.", "_fsdp_wrapped_module.")
_SCALED_OUTPUTS = ("attention.wo.weight", "feed_forward.w2.weight")


def canonical_name(name: str) -> str:
    """Parameter name with wrapper segments (activation checkpointing, compile) removed."""
    for prefix in _WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def init_box(name: str, full_shape: Sequence[int], box: Box, *, seed: int, std: float,
             n_layers: int) -> tuple[torch.Tensor, int]:
    """Initial float32 values of ``full[box]`` of parameter ``name``, and the elements drawn for them.

    Norm weights are ones; output projections (``wo``, ``w2``) have std / sqrt(2 * n_layers); the rest std.
    """
    shape = [stop - start for start, stop in box]
    if name.endswith("norm.weight"):
        return torch.ones(shape), 0
    scale = std / math.sqrt(2 * n_layers) if name.endswith(_SCALED_OUTPUTS) else std
    value, drawn = standard_normal_box(name, full_shape, box, seed=seed)
    return value.mul_(scale), drawn


def full_init_value(name: str, shape: Sequence[int], *, seed: int, std: float, n_layers: int) -> torch.Tensor:
    """The full float32 initial value of one parameter, identical on every rank and layout."""
    return init_box(name, shape, [(0, n) for n in shape], seed=seed, std=std, n_layers=n_layers)[0]


def flat_init_value(name: str, shape: Sequence[int], start: int, stop: int, *, seed: int, std: float,
                    n_layers: int) -> torch.Tensor:
    """Initial values of elements ``[start, stop)`` of the flattened parameter (a ZeRO-3 partition), drawing
    only those: a matrix's range is at most three boxes (a partial row, whole rows, a partial row)."""
    stop = min(stop, math.prod(shape))
    if stop <= start:
        return torch.empty(0)
    if len(shape) == 1:
        return init_box(name, shape, [(start, stop)], seed=seed, std=std, n_layers=n_layers)[0]
    if len(shape) != 2:
        return full_init_value(name, shape, seed=seed, std=std, n_layers=n_layers).reshape(-1)[start:stop]
    cols = shape[1]
    (r0, c0), (r1, c1) = divmod(start, cols), divmod(stop, cols)
    if r0 == r1:
        boxes = [[(r0, r0 + 1), (c0, c1)]]
    else:
        boxes = [[(r0, r0 + 1), (c0, cols)]] if c0 else []
        first_whole = r0 + 1 if c0 else r0
        if r1 > first_whole:
            boxes.append([(first_whole, r1), (0, cols)])
        if c1:
            boxes.append([(r1, r1 + 1), (0, c1)])
    return torch.cat([init_box(name, shape, box, seed=seed, std=std, n_layers=n_layers)[0].reshape(-1)
                      for box in boxes])


def shard_indices(full_shape: Sequence[int], mesh_shape: Sequence[int], coordinate: Sequence[int],
                  placements: Sequence[Placement]) -> list[torch.Tensor]:
    """Per dimension, the full-tensor indices of the shard held at ``coordinate`` of the mesh, in local order.

    Placements apply left to right, each splitting what the previous ones left, with DTensor's own split
    (``torch.chunk`` for ``Shard``, interleaved chunks for FSDP's ``_StridedShard``), so the result is what
    ``full_tensor()`` puts back together, contiguous or not.
    """
    indices = [torch.arange(n) for n in full_shape]
    for mesh_dim, placement in enumerate(placements):
        if not isinstance(placement, (Shard, _StridedShard)):  # _StridedShard.is_shard() is False
            continue
        dim = placement.dim
        along_dim = indices[dim].view([1] * dim + [-1])
        shards, _ = placement._split_tensor(along_dim, mesh_shape[mesh_dim], with_padding=False, contiguous=False)
        indices[dim] = shards[coordinate[mesh_dim]].reshape(-1)
    return indices


def local_indices(param: torch.Tensor) -> list[torch.Tensor]:
    """Per dimension, the full-tensor indices of this rank's part of ``param`` (a DTensor or a plain tensor)."""
    if not isinstance(param, DTensor):
        return [torch.arange(n) for n in param.shape]
    coordinate = param.device_mesh.get_coordinate()
    if coordinate is None:
        raise RuntimeError("this rank is not in the parameter's device mesh")
    return shard_indices(param.shape, param.device_mesh.shape, coordinate, param.placements)


def runs(index: torch.Tensor) -> list[tuple[int, int, int]]:
    """Maximal runs of consecutive full-tensor indices in ``index``: (local start, full start, length)."""
    if index.numel() == 0:
        return []
    breaks = (torch.nonzero(index[1:] != index[:-1] + 1).flatten() + 1).tolist()
    starts, stops = [0, *breaks], [*breaks, index.numel()]
    return [(a, int(index[a]), b - a) for a, b in zip(starts, stops)]


def local_init_value(name: str, full_shape: Sequence[int], indices: Sequence[torch.Tensor], *, seed: int,
                     std: float, n_layers: int) -> tuple[torch.Tensor, int]:
    """Initial values of ``full[indices]`` (one index tensor per dimension), and the elements drawn for them.

    Each box of consecutive indices is drawn on its own; with every shard the engine builds there is one.
    """
    out = torch.empty([len(i) for i in indices])
    drawn = 0
    for pieces in itertools.product(*(runs(i) for i in indices)):
        box = [(start, start + n) for _, start, n in pieces]
        value, count = init_box(name, full_shape, box, seed=seed, std=std, n_layers=n_layers)
        out[tuple(slice(at, at + n) for at, _, n in pieces)] = value
        drawn += count
    return out, drawn


@torch.no_grad()
def materialize(model: Llama, device: torch.device, *, seed: int, std: float,
                buffer_device: torch.device | None = None) -> int:
    """Allocate ``model`` on ``device`` and fill every parameter's local part with its layout-independent value.
    ``buffer_device`` (default ``device``) holds the buffers: the compute device when parameters are offloaded
    to the CPU.

    Returns the number of random elements this rank drew.
    """
    shared = _shared_parameter_names(model)
    model.to_empty(device=device)
    _retie(model, shared)
    if buffer_device is not None and buffer_device != device:
        for module in model.modules():
            for key, buffer in module._buffers.items():
                if buffer is not None:  # still uninitialized: reset_buffers fills it where it now lives
                    module._buffers[key] = torch.empty_like(buffer, device=buffer_device)
    model.reset_buffers()
    drawn = 0
    for raw_name, param in model.named_parameters():
        name = canonical_name(raw_name)
        local = param.to_local() if isinstance(param, DTensor) else param
        value, count = local_init_value(name, param.shape, local_indices(param), seed=seed, std=std,
                                        n_layers=model.args.n_layers)
        if value.shape != local.shape:
            raise RuntimeError(f"init of {name}: local shard {tuple(local.shape)} != computed {tuple(value.shape)}")
        local.copy_(value.to(local.dtype))
        drawn += count
    return drawn


def _shared_parameter_names(model: nn.Module) -> list[list[str]]:
    """Names that refer to one parameter (tied embeddings), grouped; first name first."""
    groups: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(param), []).append(name)
    return [names for names in groups.values() if len(names) > 1]


def _retie(model: nn.Module, shared: list[list[str]]) -> None:
    """``to_empty`` gives each module its own new tensor (meta -> device cannot keep the object): make every
    name of a shared group refer to the first name's parameter again."""
    for first, *others in shared:
        param = model.get_parameter(first)
        for name in others:
            owner, _, attr = name.rpartition(".")
            setattr(model.get_submodule(owner), attr, param)


def full_parameters(modules: list[nn.Module]) -> dict[str, torch.Tensor]:
    """Gather every parameter of these modules to a full CPU tensor, keyed by canonical name (collective)."""
    out: dict[str, torch.Tensor] = {}
    for module in modules:
        for raw_name, param in module.named_parameters():
            value = param.full_tensor() if isinstance(param, DTensor) else param.detach()
            out[canonical_name(raw_name)] = value.detach().cpu().clone()
    return out
