"""Checkpoint access without a process group: full tensors out (inspect, export) and in (import)."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from triarch.checkpointing.commit import CheckpointError, read_commit, write_commit
from triarch.checkpointing.safe_load import check_dcp_metadata

MODEL_PREFIX = "model."
OPTIM_PREFIX = "optim."


@contextlib.contextmanager
def _single_process() -> Iterator[None]:
    """DCP without a process group, minus its warning that it assumes one process (we asked for that)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def tensor_metadata(step_dir: Path) -> dict[str, TensorStorageMetadata]:
    """Global shape and dtype of every tensor in a DCP folder (its metadata checked to hold data only)."""
    check_dcp_metadata(step_dir)
    try:
        meta = FileSystemReader(str(step_dir)).read_metadata()
    except (OSError, EOFError, RuntimeError, ValueError) as err:
        raise CheckpointError(f"{step_dir} is not a readable distributed checkpoint: {err}") from None
    return {k: v for k, v in meta.state_dict_metadata.items() if isinstance(v, TensorStorageMetadata)}


def read_full_tensors(step_dir: Path, prefix: str = MODEL_PREFIX) -> dict[str, torch.Tensor]:
    """Every tensor whose key starts with ``prefix``, as a full CPU tensor keyed without the prefix."""
    metas = {k: v for k, v in tensor_metadata(step_dir).items() if k.startswith(prefix)}
    if not metas:
        raise CheckpointError(f"{step_dir} holds no tensors named {prefix}*")
    state = {k: torch.empty(tuple(m.size), dtype=m.properties.dtype) for k, m in metas.items()}
    with _single_process():
        dcp.load(state, checkpoint_id=str(step_dir), no_dist=True,
                 planner=DefaultLoadPlanner(allow_partial_load=True))
    return {k[len(prefix):]: v for k, v in state.items()}


def write_model_checkpoint(step_dir: Path, tensors: dict[str, torch.Tensor], trainer_state: dict[str, Any],
                           optimizer: dict[str, torch.Tensor] | None = None) -> None:
    """A committed checkpoint of model weights and, when given, AdamW state (``optimizer``: ``<name>.exp_avg``,
    ``<name>.exp_avg_sq`` and ``<name>.step`` for every parameter, saved as ``optim.*``); without it the optimizer
    starts fresh. The schedule always starts fresh."""
    if step_dir.exists() and read_commit(step_dir) is not None:
        raise CheckpointError(f"{step_dir} already holds a committed checkpoint")
    step_dir.mkdir(parents=True, exist_ok=True)
    state = {MODEL_PREFIX + k: v.contiguous() for k, v in tensors.items()}
    state.update({OPTIM_PREFIX + k: v.contiguous() for k, v in (optimizer or {}).items()})
    with _single_process():
        dcp.save(state, checkpoint_id=str(step_dir), no_dist=True)
    torch.save(trainer_state, step_dir / "trainer_state.pt")
    write_commit(step_dir, {"step": trainer_state["step"], "world_size": 1, "layout": "imported"})
