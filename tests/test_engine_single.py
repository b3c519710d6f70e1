"""Engine behaviour on one process: non-finite loss stops before the update; clipping hits the max norm."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from triarch.config import load_config, validate_for_world
from triarch.engine.native import NativeEngine, NonFiniteLossError
from triarch.engine.native_grad_norm import clip_gradients, global_grad_norm
from triarch.launcher.distributed import init_distributed, shutdown_distributed
from triarch.parallel.topology import Topology

SMALL = ["model.vocab_size=128", "model.dim=32", "model.n_layers=2", "model.n_heads=2", "model.ffn_hidden=64",
         "model.seq_len=8", "train.global_batch_size=4", "train.micro_batch_size=2", "train.warmup_steps=1",
         "train.steps=4"]


@pytest.fixture
def engine():
    device = torch.device("cpu")
    init_distributed(device)
    cfg = validate_for_world(load_config(None, SMALL), 1)
    topo = Topology.build(device, pp=1, dp_replicate=1, dp_shard=1, tp=1)
    yield NativeEngine(cfg, topo)
    shutdown_distributed()


def _batch(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 128, (4, 9), generator=torch.Generator().manual_seed(seed))


def test_non_finite_loss_stops_before_optimizer_step(engine: NativeEngine) -> None:
    before = {k: v.clone() for k, v in engine.full_parameters().items()}
    batch = _batch()
    with pytest.raises(NonFiniteLossError, match="loss is nan at step 7; stopping before the optimizer step"):
        engine.train_step(batch[:, :-1], batch[:, 1:], lambda logits, labels: logits.sum() * float("nan"), step=7)
    after = engine.full_parameters()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_clipping_brings_global_norm_to_max(engine: NativeEngine) -> None:
    batch = _batch(1)
    logits = engine.chunks[0](batch[:, :-1])
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten()).mul(100).backward()
    norm = global_grad_norm(engine.chunks, engine.topo)
    assert norm > 1.0
    clip_gradients(engine.chunks, norm, 0.25)
    assert global_grad_norm(engine.chunks, engine.topo) == pytest.approx(0.25, rel=1e-5)


def test_loss_masks_change_the_counted_tokens(engine: NativeEngine) -> None:
    batch = _batch(2)
    labels = batch[:, 1:].clone()
    labels[:, :4] = -100
    result = engine.train_step(batch[:, :-1], labels, step=1)
    assert result.tokens == int((labels != -100).sum()) == 16
    assert dist.get_world_size() == 1


def test_bf16_autocast_trains_close_to_fp32() -> None:
    device = torch.device("cpu")
    init_distributed(device)
    try:
        losses = {}
        for precision in ("fp32", "bf16"):
            cfg = validate_for_world(load_config(None, [*SMALL, f"train.precision={precision}", "train.lr=1e-2"]), 1)
            topo = Topology.build(device, pp=1, dp_replicate=1, dp_shard=1, tp=1)
            engine = NativeEngine(cfg, topo)
            batch = _batch(3)
            losses[precision] = [engine.train_step(batch[:, :-1], batch[:, 1:], step=s).loss for s in range(1, 5)]
        assert losses["bf16"][-1] < losses["bf16"][0]
        assert losses["bf16"] == pytest.approx(losses["fp32"], rel=2e-2)
        assert losses["bf16"] != losses["fp32"]  # autocast really ran in bf16
    finally:
        shutdown_distributed()


def test_tied_embeddings_stay_one_parameter_through_materialization() -> None:
    """Allocating from the meta device gives each module a new tensor; the tie must survive it (one tensor in
    the model, the optimizer and the checkpoint; trained as one)."""
    device = torch.device("cpu")
    init_distributed(device)
    try:
        cfg = validate_for_world(load_config(None, [*SMALL, "model.tie_embeddings=true"]), 1)
        topo = Topology.build(device, pp=1, dp_replicate=1, dp_shard=1, tp=1)
        engine = NativeEngine(cfg, topo)
        chunk = engine.chunks[0]
        assert chunk.output.weight is chunk.tok_embeddings.weight
        assert sum(len(g["params"]) for g in engine.optimizer.param_groups) == len(list(chunk.parameters()))
        batch = _batch()
        engine.train_step(batch[:, :-1], batch[:, 1:], step=1)
        assert chunk.output.weight is chunk.tok_embeddings.weight
        assert "output.weight" not in engine.full_parameters()
    finally:
        shutdown_distributed()
