"""One rank of a planner check: build the native engine at a layout, take one optimizer step, and write the
bytes this rank's parameters, gradients (just before the step) and AdamW state actually occupy, and the peak
of a step (``step_peak``: all tensors on CPU; on CUDA the device's, which excludes state offloaded to the host).

Run through ``triarch.launcher.local.launch_local``; argv: OUT_DIR then dotted config overrides (on top of
``BASE``). Bytes are counted per distinct storage (FSDP2 allocates each shard padded to ceil(rows / dp_shard)
rows, which is what occupies memory)."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from torch.profiler import ProfilerActivity, profile

from triarch.config import apply_overrides, config_from_dict, validate_for_world
from triarch.engine.build import build_engine
from triarch.launcher.distributed import exit_process, init_distributed, pick_device, shutdown_distributed
from triarch.parallel.topology import Topology

BASE = {  # rows that FSDP cannot split evenly over 4 ranks (a vocabulary of 250), GQA with 2 KV heads
    "model": {"vocab_size": 250, "dim": 64, "n_layers": 4, "n_heads": 4, "n_kv_heads": 2, "ffn_hidden": 96,
              "seq_len": 16, "max_seq_len": 64},
    "train": {"steps": 1, "micro_batch_size": 2, "global_batch_size": 8, "warmup_steps": 0, "lr": 3e-4, "seed": 7},
}


TIMED_STEPS_ENV = "PLAN_WORKER_TIMED_STEPS"
DEVICE_ENV = "PLAN_WORKER_DEVICE"  # cuda: benchmarks/plan_accuracy.py on a GPU (peak from the CUDA allocator)
LINK_PROBE_BYTES = 16 * 2**20


def storage_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        local = t.to_local() if isinstance(t, DTensor) else t
        storage = local.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
    return total


def main() -> None:
    out = Path(sys.argv[1])
    cfg = config_from_dict(apply_overrides(json.loads(json.dumps(BASE)), sys.argv[2:]))
    device = pick_device(os.environ.get(DEVICE_ENV, "cpu"))
    init_distributed(device)  # shares the cores among the ranks (OMP_NUM_THREADS wins), as a training launch does
    cfg = validate_for_world(cfg, dist.get_world_size())
    p = cfg.parallel
    topo = Topology.build(device, pp=p.pp, dp_replicate=p.dp_replicate, dp_shard=p.dp_shard, tp=p.tp)
    engine = build_engine(cfg, topo)
    if cfg.engine == "deepspeed":  # the module's parameters (a ZeRO-3 rank's slices); AdamW steps fp32 partitions
        params = [prm.ds_tensor if hasattr(prm, "ds_tensor") else prm for prm in engine.module.parameters()]
        zero = engine.zero  # its float32 master partitions, which ZeRO hands AdamW group by group as it steps
        stepped = list(getattr(zero, "fp32_partitioned_groups_flat", None) or zero.single_partition_of_fp32_groups)
    else:
        params = stepped = [prm for chunk in engine.chunks for prm in chunk.parameters()]
    measured = {"pp_rank": topo.pp_rank, "parameters": storage_bytes(params)}

    def before_step(optimizer, args, kwargs) -> None:  # (ZeRO: one group's gradient at a time; not compared)
        measured["gradients"] = storage_bytes([prm.grad for prm in stepped if prm.grad is not None])

    engine.optimizer.register_step_pre_hook(before_step)
    gen = torch.Generator().manual_seed(3)
    batch = torch.randint(0, cfg.model.vocab_size, (cfg.train.global_batch_size, cfg.model.seq_len + 1), generator=gen)
    rows = batch.shape[0] // topo.dp
    mine = batch[topo.dp_rank * rows:(topo.dp_rank + 1) * rows]
    engine.train_step(mine[:, :-1], mine[:, 1:], step=1)
    state = [v for values in engine.optimizer.state.values() for v in values.values()]
    measured["optimizer"] = storage_bytes(state + (stepped if cfg.engine == "deepspeed" else []))
    # the peak of a second step: what the step starts with (parameters, AdamW state; gradients are freed)
    # plus the most the CPU allocator held above that during the step (the profiler's memory events); on CUDA
    # the caching allocator's own high-water mark
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        engine.train_step(mine[:, :-1], mine[:, 1:], step=2)
        torch.cuda.synchronize(device)
        above = torch.cuda.max_memory_allocated(device)
        if cfg.parallel.fsdp_offload == "none":  # else parameters and AdamW state are in host memory
            above -= measured["parameters"] + measured["optimizer"]
    else:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            engine.train_step(mine[:, :-1], mine[:, 1:], step=2)
        trace = out / f"memory{dist.get_rank()}.json"
        prof.export_chrome_trace(str(trace))
        events = json.loads(trace.read_text())["traceEvents"]
        above = max([e["args"]["Total Allocated"] for e in events if e.get("name") == "[memory]"], default=0)
        trace.unlink()
    in_host = device.type == "cuda" and cfg.parallel.fsdp_offload == "cpu"
    measured["step_peak"] = above if in_host else measured["parameters"] + measured["optimizer"] + above
    timed = int(os.environ.get(TIMED_STEPS_ENV, "0"))  # benchmarks/plan_accuracy.py: step time, peak, link
    if timed:
        from triarch.training.mfu import device_peak_flops

        measured["peak_flops"] = device_peak_flops(device, cfg.train.precision).flops
        start = time.perf_counter()
        for step in range(3, 3 + timed):
            engine.train_step(mine[:, :-1], mine[:, 1:], step=step)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        measured["step_s"] = (time.perf_counter() - start) / timed
        if dist.get_world_size() > 1:
            message = torch.zeros(LINK_PROBE_BYTES // 4)
            dist.all_reduce(message)
            start = time.perf_counter()
            dist.all_reduce(message)
            measured["link_bytes_s"] = LINK_PROBE_BYTES / (time.perf_counter() - start)
    (out / f"rank{dist.get_rank()}.json").write_text(json.dumps(measured))
    shutdown_distributed(sync=True)
    exit_process(0)


if __name__ == "__main__":
    main()
