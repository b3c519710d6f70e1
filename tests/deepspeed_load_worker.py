"""One rank of a deepspeed-engine load check: weights loaded into an engine that has already run a forward
must be the weights its next forward uses (ZeRO-3 keeps small parameters gathered between forwards: a load
must release and regather them), for a trainable engine (through ``checkpoint_state``) and a frozen one
(through ``model_state``, as ``init.from`` loads a DPO reference).

Run through ``triarch.launcher.local.launch_local``; argv: OUT_DIR then dotted config overrides. Rank 0 writes
``losses.json``: the evaluation loss of the trained source engine, of a fresh engine before its load, and of
the trainable and frozen engines after theirs.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch.distributed as dist
from layout_worker import BASE, fixed_batch
from torch.distributed.tensor import DTensor

from triarch.config import apply_overrides, config_from_dict, validate_for_world
from triarch.engine.build import build_engine
from triarch.launcher.distributed import exit_process, init_distributed, pick_device, shutdown_distributed
from triarch.parallel.topology import Topology


def load_into(state: dict, full: dict, rank: int, ranks: int) -> None:
    """Write full tensors into handed-out ones (this rank's rows of a DTensor), as a checkpoint load does."""
    for key, tensor in state.items():
        value = full[key]
        if isinstance(tensor, DTensor):
            block = -(-value.shape[0] // ranks)
            tensor.to_local().copy_(value[rank * block:(rank + 1) * block])
        else:
            tensor.copy_(value)


def main() -> None:
    out = Path(sys.argv[1])
    cfg = config_from_dict(apply_overrides(json.loads(json.dumps(BASE)), sys.argv[2:]))
    device = pick_device("cpu")
    init_distributed(device)
    cfg = validate_for_world(cfg, dist.get_world_size())
    topo = Topology.build(device, pp=1, dp_replicate=1, dp_shard=cfg.parallel.dp_shard, tp=1)
    rows = cfg.train.global_batch_size // topo.dp

    def mine(step: int):
        batch = fixed_batch(step, cfg)[topo.dp_rank * rows:(topo.dp_rank + 1) * rows]
        return batch[:, :-1], batch[:, 1:]

    source = build_engine(cfg, topo)
    for step in range(2):
        source.train_step(*mine(step), step=step + 1)
    probe = mine(5)
    trained = source.eval_loss(*probe)
    state = source.checkpoint_state()
    saved = {k: (v.full_tensor() if isinstance(v, DTensor) else v).clone() for k, v in state.items()}
    weights = {k.removeprefix("model."): v for k, v in saved.items() if k.startswith("model.")}

    fresh = build_engine(cfg, topo)
    before = fresh.eval_loss(*probe)  # a forward before the load
    load_into(fresh.checkpoint_state(), saved, topo.dp_rank, topo.dp)
    fresh.state_loaded()
    loaded = fresh.eval_loss(*probe)

    frozen = build_engine(cfg, topo, trainable=False)
    frozen.eval_loss(*probe)
    load_into(frozen.model_state(), weights, topo.dp_rank, topo.dp)
    frozen.state_loaded()
    frozen_loaded = frozen.eval_loss(*probe)
    if dist.get_rank() == 0:
        (out / "losses.json").write_text(json.dumps({"trained": trained, "before": before, "loaded": loaded,
                                                     "frozen_loaded": frozen_loaded,
                                                     "frozen": getattr(frozen, "describe", dict)()}))
    shutdown_distributed(sync=True)


if __name__ == "__main__":
    main()
    exit_process(0)
