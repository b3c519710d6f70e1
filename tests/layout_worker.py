"""One rank of a layout-parity run: initial full weights, a few steps on fixed batches, losses, final weights.

Run through ``triarch.launcher.local.launch_local``; argv: OUT_DIR then dotted config overrides.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from triarch.config import config_from_dict, apply_overrides, validate_for_world
from triarch.data_pipeline.stream import document_positions
from triarch.engine.build import build_engine
from triarch.launcher.distributed import exit_process, init_distributed, pick_device, shutdown_distributed
from triarch.parallel.topology import Topology

BASE = {
    "model": {"vocab_size": 256, "dim": 64, "n_layers": 4, "n_heads": 4, "n_kv_heads": 2, "ffn_hidden": 128,
              "seq_len": 16, "max_seq_len": 64},
    "train": {"steps": 3, "micro_batch_size": 2, "global_batch_size": 8, "warmup_steps": 1, "lr": 3e-4,
              "grad_clip": 1.0, "seed": 7},
}


EOS = 0
DOCUMENT_END_RATE = 0.15  # with data.document_masks: rows packed with several short documents


def fixed_batch(step: int, cfg) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1000 + step)
    shape = (cfg.train.global_batch_size, cfg.model.seq_len + 1)
    batch = torch.randint(0, cfg.model.vocab_size, shape, generator=gen)
    if cfg.data.document_masks:
        batch[torch.rand(shape, generator=gen) < DOCUMENT_END_RATE] = EOS
    return batch


def main() -> None:
    out = Path(sys.argv[1])
    cfg = config_from_dict(apply_overrides(json.loads(json.dumps(BASE)), sys.argv[2:]))
    device = pick_device("cpu")
    init_distributed(device)
    cfg = validate_for_world(cfg, dist.get_world_size())
    p = cfg.parallel
    topo = Topology.build(device, pp=p.pp, dp_replicate=p.dp_replicate, dp_shard=p.dp_shard, tp=p.tp)
    engine = build_engine(cfg, topo)
    initial = engine.full_parameters()
    init_norm = sum(float(v.norm()) for v in initial.values())
    if topo.dp_rank == 0 and topo.tp_rank == 0:
        torch.save(initial, out / f"initial_pp{topo.pp_rank}.pt")
    hidden_dtypes: set[str] = set()  # dtype of every block's output: the residual stream (and PP messages)
    for chunk in getattr(engine, "chunks", []):  # the native engine's blocks
        for block in chunk.layers.values():
            block.register_forward_hook(lambda _m, _i, out: hidden_dtypes.add(str(out.dtype)))
    losses, norms = [], []
    for step in range(cfg.train.steps):
        batch = fixed_batch(step, cfg)
        rows = batch.shape[0] // topo.dp
        mine = batch[topo.dp_rank * rows:(topo.dp_rank + 1) * rows]
        positions = None
        if cfg.data.document_masks:
            positions = torch.from_numpy(document_positions(mine[:, :-1].numpy(), EOS))
        result = engine.train_step(mine[:, :-1], mine[:, 1:], step=step + 1, position_ids=positions)
        losses.append(result.loss)
        norms.append(result.grad_norm)
    params = engine.full_parameters()
    if topo.dp_rank == 0 and topo.tp_rank == 0:
        torch.save(params, out / f"params_pp{topo.pp_rank}.pt")
    if dist.get_rank() == 0:
        (out / "losses.json").write_text(json.dumps({"loss": losses, "grad_norm": norms, "init_norm": init_norm,
                                                     "hidden_dtypes": sorted(hidden_dtypes),
                                                     "engine": getattr(engine, "describe", dict)()}))
    shutdown_distributed(sync=True)


if __name__ == "__main__":
    main()
    exit_process(0)  # skip interpreter teardown (see triarch.launcher.distributed.exit_process)
