"""One rank of a control-plane check, run through ``triarch.launcher.local.launch_local``.

argv: MODE OUT_DIR. Modes:
- ``nccl_like``: the default group is ``cuda:gloo`` (a backend for CUDA tensors only, as NCCL is), so any
  collective on a CPU tensor there fails; checkpoint save (sync and async), commit, verify, load, the stop
  agreement and the peak-memory agreement must all still work, because they run on the host group.
- ``timeouts``: start-up and collective timeouts reach every process group, not only the default one; a
  tensor-parallel collective whose peer is late fails after the collective timeout.
- ``peak_memory``: the window's peak memory is the maximum over ranks, on every rank.
- ``grad_sync``: after the first of two micro-batches, FSDP holds a sharded gradient (every_microbatch) or
  nothing yet (last_microbatch).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from triarch.checkpointing.manager import CheckpointManager
from triarch.config import config_from_dict, validate_for_world
from triarch.engine.native import NativeEngine
from triarch.launcher.distributed import exit_process
from triarch.launcher.stop_signal import StopRequest
from triarch.objectives.token_loss import cross_entropy_sum
from triarch.parallel.process_groups import all_groups, group_timeout, host_group
from triarch.parallel.topology import Topology
from triarch.training.metrics import local_peak_memory, window_peak_memory
from triarch.training.run_control import RunControl

CPU = torch.device("cpu")
MODEL = {"vocab_size": 128, "dim": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "ffn_hidden": 64,
         "seq_len": 8, "max_seq_len": 16}


def engine_for(world: int, **parallel: int | str) -> NativeEngine:
    cfg = validate_for_world(config_from_dict({"model": MODEL, "parallel": parallel, "train": {
        "micro_batch_size": 1, "global_batch_size": 4, "warmup_steps": 1, "steps": 4}}), world)
    p = cfg.parallel
    topo = Topology.build(CPU, pp=p.pp, dp_replicate=p.dp_replicate, dp_shard=p.dp_shard, tp=p.tp)
    return NativeEngine(cfg, topo)


def nccl_like(out: Path) -> dict:
    dist.init_process_group("cuda:gloo")
    try:
        dist.all_reduce(torch.ones(1))
        cpu_on_default = "worked"
    except RuntimeError as err:
        cpu_on_default = str(err).splitlines()[0]
    stop = StopRequest()
    control = RunControl(CPU, stop=stop, startup_timeout_s=120, collective_timeout_s=120, host_group=host_group())
    cfg = validate_for_world(config_from_dict({"model": MODEL, "train": {"micro_batch_size": 1,
                                                                       "global_batch_size": 4}}), 2)
    topo = Topology.build(CPU, pp=1, dp_replicate=1, dp_shard=2, tp=1, host=control.host_group)
    engine = NativeEngine(cfg, topo)
    saved = {}
    for mode, async_save in (("sync", False), ("async", True)):
        manager = CheckpointManager(out / mode, keep=2, async_save=async_save, host_group=topo.host_group)
        control.groups_ready()
        manager.save(1, engine, {"layout": topo.describe(), "world_size": 2})
        manager.poll()
        manager.wait()
        newest = manager.newest_usable()
        state = manager.load(newest, engine)
        saved[mode] = {"step": newest.step, "loaded_step": state["step"]}
    if dist.get_rank() == 1:
        stop.request("test")
    agreed = control.should_stop(1)
    allocated, reserved = window_peak_memory(CPU, topo.host_group)
    return {"cpu_on_default": cpu_on_default, "saved": saved, "stop_agreed": agreed,
            "peak": [allocated, reserved]}


def timeouts(out: Path) -> dict:
    dist.init_process_group("gloo")
    control = RunControl(CPU, startup_timeout_s=77, collective_timeout_s=3, host_group=host_group())
    engine = engine_for(2, tp=2)
    control.groups_ready()
    startup = sorted({group_timeout(g).total_seconds() for g in all_groups()})
    control.should_stop(1)
    after = sorted({group_timeout(g).total_seconds() for g in all_groups()})
    tp_group = engine.topo.mesh["tp"].get_group()
    started = time.monotonic()
    failed = None
    if dist.get_rank() == 1:
        time.sleep(12)  # the peer arrives far past the collective timeout
    try:
        dist.all_reduce(torch.ones(1), group=tp_group)
    except RuntimeError as err:
        failed = str(err).splitlines()[0][:200]
    return {"groups": len(all_groups()), "startup": startup, "after_first_step": after,
            "failed_after_s": time.monotonic() - started, "error": failed}


def peak_memory(out: Path) -> dict:
    dist.init_process_group("gloo")
    if dist.get_rank() == 1:
        np.ones(400 * 2**20 // 8).sum()  # 400 MB touched: this rank's peak RSS grows
    mine = local_peak_memory(CPU)
    dist.barrier()
    return {"mine": mine, "window": window_peak_memory(CPU, dist.group.WORLD)}


def grad_sync(out: Path, mode: str) -> dict:
    dist.init_process_group("gloo")
    engine = engine_for(2, dp_shard=2, dp_grad_sync=mode)
    seen: list[list] = []

    def loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        grads = [p.grad for chunk in engine.chunks for p in chunk.parameters()]
        seen.append([None if g is None else [g.to_local().numel(), g.numel()] for g in grads])
        return cross_entropy_sum(logits, labels)

    batch = torch.randint(0, MODEL["vocab_size"], (2, MODEL["seq_len"] + 1), generator=torch.Generator().manual_seed(0))
    result = engine.train_step(batch[:, :-1], batch[:, 1:], loss, step=1)
    return {"n_micro": engine.n_microbatches, "before_second_microbatch": seen[1], "loss": result.loss}


def main() -> None:
    mode, out = sys.argv[1], Path(sys.argv[2])
    if mode == "nccl_like":
        result = nccl_like(out)
    elif mode == "timeouts":
        result = timeouts(out)
    elif mode == "peak_memory":
        result = peak_memory(out)
    else:
        result = grad_sync(out, mode)
    (out / f"rank_{dist.get_rank()}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    exit_process(0)  # skip interpreter teardown (see triarch.launcher.distributed.exit_process)
