"""Peak memory per rank of one model under DeepSpeed ZeRO-2, and ZeRO-3 with and without offload, against the native
engine's FSDP2 (and FSDP2's CPU offload policy), measured in one run (same ranks, model and batch): a table
and a JSON last line.

Usage: python benchmarks/memory_offload.py [--dim 512 --layers 8 --vocab 8192 --steps 3 --nproc 2]
(on a machine with one GPU: --nproc 1, since NCCL refuses two ranks on one device)

Measured per rank: the model's own memory (peak resident set after the steps minus the resident set before
the model was built: imports and the process group excluded), the bytes of the state the rank holds
(parameters, gradients and AdamW state as stored: its shards only), and the step time. On a CUDA machine
the same run reads the device memory (the caching allocator's peak) and tokens/s instead.

What to expect on a CPU-only machine: offload moves optimizer state and parameters from the device to the
host, and here the device *is* the host, so offload cannot lower the figure; it shows its own cost (the
CPU-side buffers and copies DeepSpeed adds). What ZeRO-3 and FSDP2 each save by sharding is visible.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LAYOUTS = {  # name: overrides (every rank a data-parallel shard)
    "native FSDP2": [],
    "native FSDP2 + CPU offload": ["parallel.fsdp_offload=cpu"],
    "deepspeed ZeRO-2": ["engine=deepspeed", "deepspeed.zero_stage=2"],
    "deepspeed ZeRO-3": ["engine=deepspeed", "deepspeed.zero_stage=3"],
    "ZeRO-3 + offload optimizer": ["engine=deepspeed", "deepspeed.zero_stage=3", "deepspeed.offload_optimizer=cpu"],
    "ZeRO-3 + offload optimizer + params": ["engine=deepspeed", "deepspeed.zero_stage=3",
                                            "deepspeed.offload_optimizer=cpu", "deepspeed.offload_params=cpu"],
}


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _state_bytes(engine) -> int:
    """Bytes of parameters, gradients and AdamW state this rank stores (distinct storages)."""
    import torch

    tensors: list[torch.Tensor] = []
    if getattr(engine, "ds", None) is not None:
        zero = engine.zero
        flats = getattr(zero, "fp32_partitioned_groups_flat", None) or zero.single_partition_of_fp32_groups
        for p in engine.module.parameters():
            tensors.append(p.ds_tensor if hasattr(p, "ds_tensor") else p)
        tensors += list(flats) + [f.grad for f in flats if f.grad is not None]
        tensors += [v for s in zero.optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
    else:
        from torch.distributed.tensor import DTensor

        params = [p for c in engine.chunks for p in c.parameters()]
        tensors = [p for p in params] + [p.grad for p in params if p.grad is not None]
        tensors += [v for s in engine.optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
        tensors = [t.to_local() if isinstance(t, DTensor) else t for t in tensors]
    seen, total = set(), 0
    for t in tensors:
        storage = t.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
    return total


def rank_main(out: Path, overrides: list[str]) -> None:
    """One rank: build the engine, take the steps, write what it measured."""
    import torch
    import torch.distributed as dist

    from triarch.config import apply_overrides, config_from_dict, validate_for_world
    from triarch.engine.build import build_engine
    from triarch.launcher.distributed import exit_process, init_distributed, pick_device, shutdown_distributed
    from triarch.parallel.topology import Topology

    device = pick_device("cuda" if torch.cuda.is_available() else "cpu")
    init_distributed(device)
    if "engine=deepspeed" in overrides:
        from triarch.engine.deepspeed import import_deepspeed

        import_deepspeed()  # imported before the baseline: libraries are not the model's memory
    spec = json.loads(os.environ["MEMORY_BENCH_SHAPE"])
    cfg = config_from_dict(apply_overrides(spec, overrides))
    cfg = validate_for_world(cfg, dist.get_world_size())
    p = cfg.parallel
    topo = Topology.build(device, pp=p.pp, dp_replicate=p.dp_replicate, dp_shard=p.dp_shard, tp=p.tp)
    dist.barrier()
    before = _rss_bytes()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    engine = build_engine(cfg, topo)
    gen = torch.Generator().manual_seed(3)
    batch = torch.randint(0, cfg.model.vocab_size, (cfg.train.global_batch_size, cfg.model.seq_len + 1), generator=gen)
    rows = batch.shape[0] // topo.dp
    mine = batch[topo.dp_rank * rows:(topo.dp_rank + 1) * rows]
    times = []
    for step in range(cfg.train.steps):
        start = time.perf_counter()
        engine.train_step(mine[:, :-1], mine[:, 1:], step=step + 1)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    result = {"rank": dist.get_rank(), "model_bytes": peak_rss - before, "state_bytes": _state_bytes(engine),
              "step_s": min(times[1:] or times),
              "tokens_per_s": rows * cfg.model.seq_len / min(times[1:] or times)}
    if device.type == "cuda":
        result["device_peak_bytes"] = torch.cuda.max_memory_allocated(device)
    (out / f"rank{dist.get_rank()}.json").write_text(json.dumps(result))
    shutdown_distributed(sync=True)
    exit_process(0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--nproc", type=int, default=2, help="ranks (data-parallel shards) per layout")
    parser.add_argument("--out", type=Path, default=Path("/tmp/triarch-memory-offload"))
    args = parser.parse_args()
    import shutil

    from triarch.launcher.local import launch_local

    shape = {"model": {"vocab_size": args.vocab, "dim": args.dim, "n_layers": args.layers, "n_heads": 8,
                       "n_kv_heads": 4, "ffn_hidden": 4 * args.dim, "seq_len": 128, "max_seq_len": 128},
             "train": {"steps": args.steps, "micro_batch_size": 2, "global_batch_size": 8, "warmup_steps": 1}}
    os.environ["MEMORY_BENCH_SHAPE"] = json.dumps(shape)
    results = {}
    for name, overrides in LAYOUTS.items():
        out = args.out / name.replace(" ", "_").replace("+", "plus")
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        launch_local(args.nproc, [__file__, "--rank", str(out), f"parallel.dp_shard={args.nproc}", *overrides])
        ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(args.nproc)]
        results[name] = {key: max(r[key] for r in ranks) for key in ranks[0] if key != "rank"}
    ref = results["native FSDP2"]
    mib = 2**20
    params = 12 * args.layers * args.dim**2 + 2 * args.vocab * args.dim  # approximate, for the header
    print(f"model: dim {args.dim}, {args.layers} layers, vocab {args.vocab} (~{params / 1e6:.0f}M parameters), "
          f"{args.nproc} ranks, fp32, AdamW; the largest rank shown")
    memory = "device_peak_bytes" if "device_peak_bytes" in ref else "model_bytes"  # CUDA: the allocator's peak
    label = "device peak MiB" if memory == "device_peak_bytes" else "model memory MiB"
    print(f"{'layout':<38} {label:>17} {'vs FSDP2':>9} {'state MiB':>10} {'tokens/s':>9} {'vs FSDP2':>9}")
    for name, r in results.items():
        print(f"{name:<38} {r[memory] / mib:>17.1f} {r[memory] / ref[memory]:>9.2f} {r['state_bytes'] / mib:>10.1f} "
              f"{r['tokens_per_s']:>9.0f} {r['tokens_per_s'] / ref['tokens_per_s']:>9.2f}")
    print(json.dumps({"reference": f"native FSDP2 (dp_shard={args.nproc}), same run", "memory": memory,
                      "memory_ratio": {n: round(r[memory] / ref[memory], 3) for n, r in results.items()},
                      "tokens_per_s_ratio": {n: round(r["tokens_per_s"] / ref["tokens_per_s"], 3)
                                             for n, r in results.items()},
                      "results": results}))


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--rank":
        sys.path.insert(0, str(REPO / "src"))
        rank_main(Path(sys.argv[2]), sys.argv[3:])
    else:
        main()
