"""One rank of a megatron-engine check that needs its own process group: a Hugging Face Llama folder loaded
into the megatron engine (``init.from=hf:``), then its logits and weights.

Run through ``triarch.launcher.local.launch_local``; argv: OUT_DIR HF_FOLDER then dotted config overrides.
Writes ``logits.pt`` (the engine's full logits on fixed tokens) and ``params.pt`` (its canonical weights).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from triarch.checkpointing.init_from import load_initial_weights
from triarch.config import apply_overrides, config_from_dict, validate_for_world
from triarch.engine.build import build_engine
from triarch.launcher.distributed import exit_process, init_distributed, pick_device, shutdown_distributed
from triarch.parallel.topology import Topology

SHAPE = {"model": {"vocab_size": 256, "dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "ffn_hidden": 128,
                   "seq_len": 24, "max_seq_len": 128},
         "train": {"micro_batch_size": 2, "global_batch_size": 2, "steps": 1, "warmup_steps": 0}}
TOKENS = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))


def main() -> None:
    out, folder = Path(sys.argv[1]), sys.argv[2]
    cfg = config_from_dict(apply_overrides(json.loads(json.dumps(SHAPE)), ["engine=megatron", *sys.argv[3:]]))
    device = pick_device("cpu")
    init_distributed(device)
    cfg = validate_for_world(cfg, dist.get_world_size())
    p = cfg.parallel
    topo = Topology.build(device, pp=p.pp, dp_replicate=p.dp_replicate, dp_shard=p.dp_shard, tp=p.tp)
    engine = build_engine(cfg, topo, trainable=False)
    load_initial_weights(engine, f"hf:{folder}", topo.host_group)
    with torch.no_grad():
        logits = engine._output(engine.model_chunks[0].eval(), TOKENS.to(device))  # noqa: SLF001 (the head's raw output)
    logits = logits.full_tensor() if hasattr(logits, "full_tensor") else logits
    params = engine.full_parameters()
    if dist.get_rank() == 0:
        torch.save({"logits": logits.cpu(), "tokens": TOKENS}, out / "logits.pt")
        torch.save(params, out / "params.pt")
    shutdown_distributed(sync=True)


if __name__ == "__main__":
    main()
    exit_process(0)
