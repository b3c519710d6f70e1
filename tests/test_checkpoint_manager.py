"""Checkpoint manager on one process: retention keeps the last k plus every n-th committed step, in the
background, and leaves no half-deleted step; the commit records what each rank hashed."""

from __future__ import annotations

import pytest
import torch

from triarch.checkpointing.commit import read_commit, verify
from triarch.checkpointing import manager as manager_module
from triarch.checkpointing.manager import CheckpointManager, list_steps
from triarch.checkpointing.retention import TRASH_PREFIX
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
    manager.wait()  # the run's end: the background deletions are finished
    ckpt_dir = tmp_path / "checkpoints"
    assert [s.step for s in list_steps(ckpt_dir)] == [3, 6, 7]
    assert sorted(p.name for p in ckpt_dir.iterdir()) == ["step_3", "step_6", "step_7"]  # nothing half deleted
    for info in list_steps(ckpt_dir):
        verify(info.path)


def test_interrupted_deletion_is_hidden_and_cleared(engine, tmp_path) -> None:
    """A step whose deletion was cut short (rename done, removal not) never lists; the next pass removes it."""
    manager = CheckpointManager(tmp_path, keep=2)
    ckpt_dir = tmp_path / "checkpoints"
    for step in (1, 2):
        manager.save(step, engine, {"layout": "one"})
    manager.wait()
    (ckpt_dir / "step_1").rename(ckpt_dir / f"{TRASH_PREFIX}step_1")  # as a kill mid-delete leaves it
    assert [s.step for s in list_steps(ckpt_dir)] == [2]
    manager.save(3, engine, {"layout": "one"})
    manager.wait()
    assert sorted(p.name for p in ckpt_dir.iterdir()) == ["step_2", "step_3"]


def test_commit_records_the_bytes_each_rank_hashed(engine, tmp_path) -> None:
    manager = CheckpointManager(tmp_path, keep=2)
    step_dir = manager.save(1, engine, {"layout": "one"})
    record = read_commit(step_dir)
    assert set(record["files"]) == {".metadata", "__0_0.distcp", "rng/rank_0.pt", "trainer_state.pt"}
    assert record["hashed_by_rank"] == {"0": sum(f["bytes"] for f in record["files"].values())}
    verify(step_dir)


def test_keep_below_two_is_refused(tmp_path) -> None:
    with pytest.raises(ValueError, match=r"checkpoint.keep \(1\) must be at least 2"):
        CheckpointManager(tmp_path, keep=1)


def test_saving_a_step_again_replaces_it(engine, tmp_path) -> None:
    """As after a fallback to an older step: the folder is rewritten whole (never racing a deletion)."""
    manager = CheckpointManager(tmp_path, keep=2, async_save=True)
    for step in (1, 2, 3, 2, 3):
        manager.save(step, engine, {"layout": "one"})
    manager.wait()
    ckpt_dir = tmp_path / "checkpoints"
    assert [s.step for s in list_steps(ckpt_dir) if s.committed] == [2, 3]
    for info in list_steps(ckpt_dir):
        verify(info.path)


@pytest.mark.parametrize("reusable", [True, False], ids=["one_stager", "stager_per_save"])
def test_async_saves_through_one_stager_or_one_per_save(engine, tmp_path, monkeypatch, reusable: bool) -> None:
    """torch >= 2.13 keeps one DCP stager (and its CPU copies) for the run; torch 2.11 / 2.12, whose stager
    closes itself after each save and fails the next, get a new one per save: every step commits either way."""
    monkeypatch.setattr(manager_module, "STAGER_REUSABLE", reusable)
    manager = CheckpointManager(tmp_path, keep=5, async_save=True)
    stagers = []
    for step in range(1, 4):
        manager.save(step, engine, {"layout": "one"})
        stagers.append(manager._stager)
        manager.poll()
    manager.wait()
    assert len({id(s) for s in stagers}) == (1 if reusable else 3)
    steps = list_steps(tmp_path / "checkpoints")
    assert [s.step for s in steps] == [1, 2, 3] and all(s.committed for s in steps)
    for info in steps:
        verify(info.path)
