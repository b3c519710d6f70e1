"""Checkpoint manager on one process: retention keeps the last k plus every n-th committed step."""

from __future__ import annotations

import pytest
import torch

from triarch.checkpointing.manager import CheckpointManager, list_steps
from triarch.config import load_config, validate_for_world
from triarch.engine.native import NativeEngine
from triarch.launcher.distributed import init_distributed, shutdown_distributed
from triarch.parallel.topology import Topology

SMALL = ["model.vocab_size=128", "model.dim=32", "model.n_layers=2", "model.n_heads=2", "model.ffn_hidden=64",
         "model.seq_len=8", "train.global_batch_size=2", "train.micro_batch_size=2", "train.warmup_steps=1"]


@pytest.fixture
def engine():
    device = torch.device("cpu")
    init_distributed(device)
    cfg = validate_for_world(load_config(None, SMALL), 1)
    yield NativeEngine(cfg, Topology.build(device, pp=1, dp_replicate=1, dp_shard=1, tp=1))
    shutdown_distributed()


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_retention_keeps_last_k_and_every_nth(engine, tmp_path, async_save: bool) -> None:
    manager = CheckpointManager(tmp_path, keep=2, keep_every=3, async_save=async_save)
    for step in range(1, 8):
        manager.save(step, engine, {"layout": "one"})
        manager.poll()
    manager.wait()
    assert [s.step for s in list_steps(tmp_path / "checkpoints")] == [3, 6, 7]


def test_keep_below_two_is_refused(tmp_path) -> None:
    with pytest.raises(ValueError, match=r"checkpoint.keep \(1\) must be at least 2"):
        CheckpointManager(tmp_path, keep=1)
