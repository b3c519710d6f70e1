"""One rank of a checkpoint-commit run, launched by ``triarch.launcher.local.launch_local``.

argv: MODE RUN_DIR OUT_DIR [dotted overrides]
- ``save``: steps 1 and 2 with async saves, step 3 with a sync save, all committed (keep 5).
- ``resume``: pick the newest usable step (every rank verifies its share); each rank writes
  ``OUT_DIR/chosen_<rank>.json`` and its log to ``OUT_DIR/log_<rank>.txt``.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from triarch.checkpointing.manager import CheckpointManager
from triarch.config import load_config, validate_for_world
from triarch.engine.native import NativeEngine
from triarch.launcher.distributed import exit_process, init_distributed, shutdown_distributed
from triarch.parallel.topology import Topology

MODEL = ["model.vocab_size=1024", "model.dim=128", "model.n_layers=2", "model.n_heads=4", "model.ffn_hidden=256",
         "model.seq_len=16", "train.global_batch_size=4", "train.micro_batch_size=1", "train.warmup_steps=1"]
KEEP = 5


def save(run_dir: Path, overrides: list[str]) -> None:
    cfg = validate_for_world(load_config(None, MODEL + overrides), dist.get_world_size())
    p = cfg.parallel
    topo = Topology.build(torch.device("cpu"), pp=p.pp, dp_replicate=p.dp_replicate, dp_shard=p.dp_shard, tp=p.tp)
    engine = NativeEngine(cfg, topo)
    background = CheckpointManager(run_dir, keep=KEEP, async_save=True)
    background.save(1, engine, {"layout": topo.describe()})
    background.poll()
    background.save(2, engine, {"layout": topo.describe()})
    background.wait()
    CheckpointManager(run_dir, keep=KEEP).save(3, engine, {"layout": topo.describe()})


def resume(run_dir: Path, out: Path) -> None:
    rank = dist.get_rank()
    logging.basicConfig(filename=out / f"log_{rank}.txt", level=logging.WARNING, format="%(message)s", force=True)
    info = CheckpointManager(run_dir, keep=KEEP).newest_usable()
    (out / f"chosen_{rank}.json").write_text(json.dumps(None if info is None else info.step))


def main() -> None:
    mode, run_dir, out = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    init_distributed(torch.device("cpu"))
    if mode == "save":
        save(run_dir, sys.argv[4:])
    else:
        resume(run_dir, out)
    shutdown_distributed(sync=True)


if __name__ == "__main__":
    main()
    exit_process(0)  # skip interpreter teardown (see triarch.launcher.distributed.exit_process)
