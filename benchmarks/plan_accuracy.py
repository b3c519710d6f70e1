"""How far `triarch plan`'s predictions are from what the layouts it can run here measure, in one run.

For each layout (1-2 CPU ranks, a small Llama): the native engine is built and stepped by
``tests/plan_worker.py``, which measures the peak memory of a step (tensors at its start plus the most the CPU
allocator held above them) and the mean time of a few more steps; the planner predicts both for the same
layout on a "device" made of this machine's figures measured in the same run: the cached matmul probe
(peak FLOP/s per rank), a large copy (memory bandwidth) and a gloo all-reduce between the ranks (link
bandwidth). Prints a table and, last, a JSON line with every ratio and the worst (predicted / measured).

The step-time model is built for GPUs; on CPU it leaves out Python's per-operator overhead and gloo's
latency, so step-time ratios below 1 are expected here. With a GPU in the device table (``devices.yaml``)
present, the 886M benchmark shape also runs on one GPU against the table's figures for it.

    python benchmarks/plan_accuracy.py
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from plan_worker import BASE, DEVICE_ENV, TIMED_STEPS_ENV  # noqa: E402

from triarch.config import apply_overrides, config_from_dict, validate_for_world  # noqa: E402
from triarch.launcher.local import launch_local  # noqa: E402
from triarch.planning.devices import Device, device_names, efficiency, load_device  # noqa: E402
from triarch.planning.estimate import estimate_memory  # noqa: E402
from triarch.planning.memory import Layout  # noqa: E402
from triarch.planning.step_time import predict_step_time  # noqa: E402

SHAPE = ["model.dim=256", "model.ffn_hidden=768", "model.vocab_size=2000", "model.seq_len=128", "model.max_seq_len=128"]
LAYOUTS = {
    "1 rank": (1, []),
    "1 rank, full recompute": (1, ["train.activation_checkpoint=full"]),
    "tp2": (2, ["parallel.tp=2"]),
    "pp2": (2, ["parallel.pp=2"]),
    "dp_shard2": (2, ["parallel.dp_shard=2"]),
    "dp_shard2, fsdp_offload": (2, ["parallel.dp_shard=2", "parallel.fsdp_offload=cpu"]),
    "deepspeed ZeRO-2": (2, ["engine=deepspeed", "parallel.dp_shard=2", "deepspeed.zero_stage=2"]),
    "deepspeed ZeRO-3": (2, ["engine=deepspeed", "parallel.dp_shard=2", "deepspeed.zero_stage=3"]),
}
TIMED_STEPS = 3
# the 886M benchmark shape (examples/1b.yaml), one GPU, when one is present
GPU_SHAPE = ["model.dim=2048", "model.n_layers=16", "model.n_heads=16", "model.n_kv_heads=8", "model.ffn_hidden=5632",
             "model.vocab_size=32000", "model.seq_len=2048", "model.max_seq_len=2048", "train.micro_batch_size=4",
             "train.global_batch_size=4", "train.precision=bf16", "train.activation_checkpoint=selective"]


def copy_bandwidth() -> float:
    """Bytes/s of a 256 MiB tensor copy (read + write), best of three."""
    src = torch.ones(64 * 2**20)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - start)
    return 2 * src.numel() * 4 / best


def cpu_device(peak: float, memory_bw: float, link_bw: float) -> Device:
    """This machine as a "device": its host memory is the device's, and a host<->device copy is a memory copy."""
    return Device(key="cpu", name="this CPU", memory_bytes=2**40, usable_bytes=2**40, hbm_bytes_s=memory_bw,
                  bf16_flops=peak, fp8_flops=None, nvlink_bytes_s=link_bw, inter_node_bytes_s=link_bw,
                  host_usable_bytes=2**40, host_bytes_s=memory_bw, pcie_bytes_s=memory_bw)


def gpu_device() -> Device | None:
    """The device table's entry for this machine's GPU (None without CUDA or for a GPU not in the table)."""
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name().lower()
    return next((load_device(k) for k in device_names() if k in name), None)


def main() -> None:
    os.environ[TIMED_STEPS_ENV] = str(TIMED_STEPS)
    memory_bw = copy_bandwidth()
    rows = []
    runs = [(name, nproc, [*SHAPE, *extra], None) for name, (nproc, extra) in LAYOUTS.items()]
    gpu = gpu_device()
    if gpu is not None:
        runs.append((f"886M, 1 {gpu.key}", 1, GPU_SHAPE, gpu))
        runs.append((f"886M, 1 {gpu.key}, fsdp_offload", 1, [*GPU_SHAPE, "parallel.fsdp_offload=cpu"], gpu))
    for name, nproc, overrides, table_device in runs:
        os.environ[DEVICE_ENV] = "cuda" if table_device is not None else "cpu"
        with tempfile.TemporaryDirectory() as out:
            launch_local(nproc, [str(ROOT / "tests" / "plan_worker.py"), out, *overrides])
            ranks = [json.loads((Path(out) / f"rank{r}.json").read_text()) for r in range(nproc)]
        cfg = validate_for_world(config_from_dict(apply_overrides(json.loads(json.dumps(BASE)), overrides)), nproc)
        layout = Layout.of(cfg)
        link = min((r.get("link_bytes_s", float("inf")) for r in ranks), default=float("inf"))
        link = link if link != float("inf") else memory_bw
        device = table_device or cpu_device(ranks[0]["peak_flops"], memory_bw, link)
        predicted_s = predict_step_time(cfg, layout, device, efficiency(), gpus_per_node=nproc).total
        measured_s = max(r["step_s"] for r in ranks)
        def predicted_peak(pp_rank: int) -> int:  # on CPU, host and "device" memory are one
            est = estimate_memory(cfg, layout, pp_rank=pp_rank)
            return est.total if table_device is not None else est.total + est.host

        worst_mem = max(ranks, key=lambda r: abs(predicted_peak(r["pp_rank"]) / r["step_peak"] - 1))
        predicted_mem = predicted_peak(worst_mem["pp_rank"])
        rows.append({"layout": name, "memory_predicted": predicted_mem, "memory_measured": worst_mem["step_peak"],
                     "memory_ratio": predicted_mem / worst_mem["step_peak"], "step_predicted_s": predicted_s,
                     "step_measured_s": measured_s, "step_ratio": predicted_s / measured_s})
    print(f"{'layout':<24} {'mem pred MiB':>12} {'mem meas MiB':>12} {'ratio':>6} {'step pred s':>11} "
          f"{'step meas s':>11} {'ratio':>6}")
    for r in rows:
        print(f"{r['layout']:<24} {r['memory_predicted'] / 2**20:>12.1f} {r['memory_measured'] / 2**20:>12.1f} "
              f"{r['memory_ratio']:>6.2f} {r['step_predicted_s']:>11.3f} {r['step_measured_s']:>11.3f} "
              f"{r['step_ratio']:>6.2f}")
    print(f"(reference: each layout's own measurement in this run; memory bandwidth {memory_bw / 1e9:.1f} GB/s)")
    worst_memory = max(rows, key=lambda r: abs(r["memory_ratio"] - 1))
    worst_step = max(rows, key=lambda r: abs(r["step_ratio"] - 1))
    print(json.dumps({"rows": rows, "worst_memory_ratio": worst_memory["memory_ratio"],
                      "worst_step_ratio": worst_step["step_ratio"]}))


if __name__ == "__main__":
    main()
