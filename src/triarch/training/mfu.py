"""Model FLOPs, device peak FLOP/s, and model FLOPs utilisation (MFU).

MFU = achieved model FLOP/s / (peak dense FLOP/s of one device x devices), with model FLOPs per token
6*N + 12*L*d*T (PaLM's form): N counts the parameters that take part in matmuls, so the input embedding (a
lookup) is left out; a tied embedding counts once, as the output projection. HFU counts the FLOPs the
hardware ran, recomputation included (full activation checkpointing reruns each block's forward:
+ 2*N_blocks + 4*L*d*T per token). GPU peaks come from a table of datasheet dense figures (``gpu_peaks``)
for the run's matmul precision; on CPU the peak is measured once by a matmul probe in the run's matmul dtype
(fp32 or bf16), cached on disk per (CPU model, thread count, dtype), probed again and raised when a run beats
it (so MFU stays <= 100%), and every figure carries a ``source`` label saying which it is.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from triarch.training.gpu_peaks import matmul_precision, table_peak
from triarch.training.model_flops import (  # noqa: F401  (re-exported)
    flops_per_token,
    matmul_parameter_count,
    parameter_count,
    recompute_flops_per_token,
)

log = logging.getLogger(__name__)

CPU_PEAK_ENV = "TRIARCH_CPU_PEAK_FLOPS"
PROBE_BUDGET_S = 1.0  # timed part of a matmul probe; warm-up adds a little on top
CPU_PROBE_SIZES = (1024, 2048)  # square fp32 matmul sizes, the larger one used when the machine is fast
PROBE_LARGER_IF_BELOW_S = 0.03  # switch to the larger size when one small matmul takes less than this
PROBE_WARMUP = 2
PROBE_MAX_REPEATS = 10
GPU_PROBE_SIZE = 8192

@dataclass(frozen=True)
class PeakFlops:
    """Peak dense FLOP/s of one device and where the figure came from."""

    flops: float
    source: str


# ----------------------------------------------------------------------------------------------
# Model FLOPs: ``training.model_flops`` (re-exported here)


def mfu(tokens_per_s: float, token_flops: float, peak_flops: float | PeakFlops, n_devices: int) -> float:
    """Model FLOPs utilisation as a fraction (0.41 means 41%): ``tokens_per_s`` across all devices times
    ``token_flops`` (FLOPs per token) over their peak."""
    peak = peak_flops.flops if isinstance(peak_flops, PeakFlops) else float(peak_flops)
    if peak <= 0 or n_devices <= 0:
        raise ValueError(f"peak FLOP/s ({peak}) and device count ({n_devices}) must be positive")
    return tokens_per_s * token_flops / (peak * n_devices)


# ----------------------------------------------------------------------------------------------
# Device peak


_process_cache: dict[Any, PeakFlops] = {}


def device_peak_flops(device: torch.device | str, precision: str = "bf16", tf32: bool = True) -> PeakFlops:
    """Peak dense FLOP/s of one ``device`` at ``precision`` (fp32 | bf16 | fp8); fp32 means the TF32 tensor-core
    peak when ``tf32`` (``train.tf32``) lets float32 matmuls use them, the plain FP32 peak otherwise.

    On CPU the figure is a measured matmul peak in the dtype the run's matmuls use: bf16 for bf16 and fp8 runs
    (CPUs with AMX run bf16 matmuls several times faster than fp32; torch's CPU fp8 matmul is a reference
    kernel, not a peak), fp32 otherwise.
    """
    device = torch.device(device)
    column = matmul_precision(precision, tf32)
    if device.type == "cuda":
        return _cuda_peak(device, column)
    if device.type == "cpu":
        return cpu_peak_flops("fp32" if column in ("tf32", "fp32") else "bf16")
    raise ValueError(f"no peak FLOP/s known for device type '{device.type}'")


def _cuda_peak(device: torch.device, column: str) -> PeakFlops:
    name = torch.cuda.get_device_name(device)
    found = table_peak(name, column)
    if found is not None:
        return PeakFlops(*found)
    dtype = torch.float32 if column in ("tf32", "fp32") else torch.bfloat16
    label = column if dtype == torch.float32 else "bf16"
    cache_key = ("cuda", name, label)
    if cache_key not in _process_cache:
        log.warning("GPU '%s' is not in the peak table; MFU uses a measured %s matmul peak", name, label)
        flops = _probe_matmul(device, dtype, (GPU_PROBE_SIZE,), PROBE_BUDGET_S)
        _process_cache[cache_key] = PeakFlops(flops, f"cuda-matmul-probe:{name} {label}")
    return _process_cache[cache_key]


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown-cpu"


def cpu_cache_path() -> Path:
    """Where measured CPU peaks are kept: ``~/.cache/triarch/cpu_peak.json``."""
    return Path.home() / ".cache" / "triarch" / "cpu_peak.json"


_CPU_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _cpu_key(dtype: str) -> str:
    return f"{_cpu_model()} | threads={torch.get_num_threads()} | {dtype}"


def _cpu_source(dtype: str) -> str:
    return "cpu-matmul-probe" if dtype == "fp32" else f"cpu-matmul-probe:{dtype}"


def _read_cache(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def cpu_peak_flops(dtype: str = "fp32") -> PeakFlops:
    """The CPU peak of ``dtype`` (fp32 | bf16) matmuls: env override, else this process's memo, else the disk
    cache, else a probe."""
    override = os.environ.get(CPU_PEAK_ENV)
    if override:
        try:
            value = float(override)
        except ValueError:
            raise ValueError(f"{CPU_PEAK_ENV} ({override!r}) must be a number of FLOP/s") from None
        if value <= 0:
            raise ValueError(f"{CPU_PEAK_ENV} ({override!r}) must be positive")
        return PeakFlops(value, f"env:{CPU_PEAK_ENV}")
    key = _cpu_key(dtype)
    path = cpu_cache_path()
    memo_key = ("cpu", key, str(path))
    if memo_key in _process_cache:
        return _process_cache[memo_key]
    path.parent.mkdir(parents=True, exist_ok=True)
    # One prober at a time: local ranks starting together wait here and then read the cached figure.
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        entry = _read_cache(path).get(key)
        if isinstance(entry, dict) and isinstance(entry.get("flops"), (int, float)) and entry["flops"] > 0:
            flops = float(entry["flops"])
        else:
            flops = _probe_matmul(torch.device("cpu"), _CPU_DTYPES[dtype], CPU_PROBE_SIZES, PROBE_BUDGET_S)
            _write_cache(path, key, {"flops": flops, "torch": torch.__version__, "measured_at": time.time()})
            log.info("measured CPU matmul peak %.3g FLOP/s for '%s' (cached in %s)", flops, key, path)
    _process_cache[memo_key] = PeakFlops(flops, _cpu_source(dtype))
    return _process_cache[memo_key]


def raise_cpu_peak(peak: PeakFlops, achieved: float) -> PeakFlops:
    """A run did ``achieved`` FLOP/s per device, more than the cached CPU ``peak`` (probed while other work
    held the cores, say): probe again and keep the larger of the new probe and ``achieved`` as this machine's
    peak, in the cache and in this process, so MFU never reads above 100%. Other peaks come back unchanged."""
    dtype = next((d for d in _CPU_DTYPES if _cpu_source(d) == peak.source), None)
    if dtype is None or achieved <= peak.flops:
        return peak
    path = cpu_cache_path()
    key = _cpu_key(dtype)
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        probed = _probe_matmul(torch.device("cpu"), _CPU_DTYPES[dtype], CPU_PROBE_SIZES, PROBE_BUDGET_S)
        cached = _read_cache(path).get(key, {})
        flops = max(probed, achieved, float(cached.get("flops", 0.0)) if isinstance(cached, dict) else 0.0)
        _write_cache(path, key, {"flops": flops, "torch": torch.__version__, "measured_at": time.time(),
                                 "raised_by_a_run": achieved > probed})
    log.info("a run beat the cached CPU %s peak (%.3g > %.3g FLOP/s); re-probed: %.3g", dtype, achieved,
             peak.flops, flops)
    raised = PeakFlops(flops, peak.source)
    _process_cache[("cpu", key, str(path))] = raised
    return raised


def _write_cache(path: Path, key: str, entry: dict[str, Any]) -> None:
    data = _read_cache(path)
    data[key] = entry
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    tmp.replace(path)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _probe_matmul(device: torch.device, dtype: torch.dtype, sizes: tuple[int, ...], budget_s: float) -> float:
    """Best-of FLOP/s of square matmuls; moves to the next size while one matmul is quicker than the cut."""
    with torch.no_grad(), torch.autocast(device.type, enabled=False):
        return _time_matmuls(device, dtype, sizes, budget_s)


def _time_matmuls(device: torch.device, dtype: torch.dtype, sizes: tuple[int, ...], budget_s: float) -> float:
    size = sizes[0]
    for size in sizes:
        a = torch.randn(size, size, device=device, dtype=dtype)
        b = torch.randn(size, size, device=device, dtype=dtype)
        out = torch.empty(size, size, device=device, dtype=dtype)
        for _ in range(PROBE_WARMUP):
            torch.mm(a, b, out=out)
        _sync(device)
        start = time.perf_counter()
        torch.mm(a, b, out=out)
        _sync(device)
        if time.perf_counter() - start >= PROBE_LARGER_IF_BELOW_S:
            break
    best = float("inf")
    deadline = time.perf_counter() + budget_s
    for _ in range(PROBE_MAX_REPEATS):
        start = time.perf_counter()
        torch.mm(a, b, out=out)
        _sync(device)
        best = min(best, time.perf_counter() - start)
        if time.perf_counter() > deadline:
            break
    return 2.0 * size**3 / best
