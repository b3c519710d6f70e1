"""GPU checks (skipped without CUDA): a bf16 engine step on one GPU and the throughput script's smoke run."""

from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_bf16_engine_step_on_cuda() -> None:
    from triarch.config import load_config, validate_for_world
    from triarch.engine.native import NativeEngine
    from triarch.launcher.distributed import init_distributed, shutdown_distributed
    from triarch.parallel.topology import Topology

    device = torch.device("cuda", 0)
    init_distributed(device)
    try:
        cfg = validate_for_world(load_config(None, [
            "model.vocab_size=512", "model.dim=128", "model.n_layers=2", "model.n_heads=4", "model.seq_len=64",
            "train.precision=bf16", "train.micro_batch_size=2", "train.global_batch_size=4", "train.warmup_steps=1",
            "train.steps=5"]), 1)
        topo = Topology.build(device, pp=1, dp_replicate=1, dp_shard=1, tp=1)
        engine = NativeEngine(cfg, topo)
        batch = torch.randint(0, 512, (4, 65), device=device)
        losses = [engine.train_step(batch[:, :-1], batch[:, 1:], step=s).loss for s in range(1, 6)]
        assert losses[-1] < losses[0]
    finally:
        shutdown_distributed()
