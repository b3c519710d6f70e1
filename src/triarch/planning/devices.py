"""The device table of ``triarch plan`` (``devices.yaml``: datasheet figures with their sources, and the time
model's efficiency assumptions)."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from pathlib import Path

import yaml

TABLE = Path(__file__).with_name("devices.yaml")
GIB = 2**30


@dataclass(frozen=True)
class Device:
    """One GPU model: memory, peaks, bandwidths (bytes and FLOP/s per second, per GPU, one direction)."""

    key: str
    name: str
    memory_bytes: int
    usable_bytes: int
    hbm_bytes_s: float
    bf16_flops: float
    fp8_flops: float | None
    nvlink_bytes_s: float
    inter_node_bytes_s: float
    host_usable_bytes: int  # per node, for parallel.fsdp_offload: cpu
    host_bytes_s: float  # the node's DRAM bandwidth
    pcie_bytes_s: float

    def peak(self, precision: str) -> float:
        if precision == "fp8" and self.fp8_flops:
            return self.fp8_flops
        return self.bf16_flops


@dataclass(frozen=True)
class Efficiency:
    gemm: float
    gemm_fp8: float
    attention: float
    memory: float
    link: float
    dp_overlap: float
    host_optimizer: float


@cache
def _table() -> dict:
    return yaml.safe_load(TABLE.read_text())


def device_names() -> list[str]:
    return [k for k in _table() if k != "efficiency"]


def load_device(key: str) -> Device:
    """The device ``key`` (h100, h200, a100, b200, ...); ValueError naming the known ones."""
    table = _table()
    if key not in device_names():
        raise ValueError(f"--gpu {key!r} is not in {TABLE.name}; known: {', '.join(device_names())}")
    d = table[key]
    memory = int(d["memory_gb"] * 1e9)
    return Device(key=key, name=d["name"], memory_bytes=memory, usable_bytes=memory - int(d["reserve_gib"] * GIB),
                  hbm_bytes_s=d["hbm_tbps"] * 1e12, bf16_flops=d["bf16_tflops"] * 1e12,
                  fp8_flops=d["fp8_tflops"] * 1e12 if d.get("fp8_tflops") else None,
                  nvlink_bytes_s=d["nvlink_gbps"] * 1e9, inter_node_bytes_s=d["inter_node_gbps"] * 1e9,
                  host_usable_bytes=int(d["host_memory_gb"] * 1e9) - int(d["host_reserve_gib"] * GIB),
                  host_bytes_s=d["host_bandwidth_gbps"] * 1e9, pcie_bytes_s=d["pcie_gbps"] * 1e9)


def efficiency() -> Efficiency:
    return Efficiency(**_table()["efficiency"])
