"""Step timing, peak memory, and a windowed throughput / MFU meter."""

from __future__ import annotations

import resource
import sys
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from triarch.training.mfu import PeakFlops, mfu, raise_cpu_peak

RSS_UNITS_PER_BYTE_LINUX = 1024  # ru_maxrss is in KiB on Linux, in bytes on macOS


def synchronize(device: torch.device | str) -> None:
    """Wait for queued device work, so wall-clock times cover it (no-op on CPU)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StepTimer:
    """Wall-clock time of one region, synchronizing the device at both ends.

    ``with StepTimer(device) as t: ...`` then read ``t.elapsed_s``; or ``start()`` / ``stop()``.
    """

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.elapsed_s = 0.0
        self._start: float | None = None

    def start(self) -> "StepTimer":
        synchronize(self.device)
        self._start = time.perf_counter()
        return self

    def stop(self) -> float:
        if self._start is None:
            raise RuntimeError("StepTimer.stop() called before start()")
        synchronize(self.device)
        self.elapsed_s = time.perf_counter() - self._start
        self._start = None
        return self.elapsed_s

    def __enter__(self) -> "StepTimer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def peak_memory_bytes(device: torch.device | str) -> int:
    """Peak memory: CUDA max allocated by the caching allocator; on CPU the process's peak RSS.

    On Linux the CPU figure is ``VmHWM``, this process image's own high-water mark: ``ru_maxrss`` survives
    ``exec`` and so reports the launcher's peak when that was higher."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    hwm = _status_kib("VmHWM")
    if hwm is not None:
        return hwm * 1024
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(maxrss if sys.platform == "darwin" else maxrss * RSS_UNITS_PER_BYTE_LINUX)


def _status_kib(field: str) -> int | None:
    """A ``kB`` field of /proc/self/status (None where there is no such file)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def local_peak_memory(device: torch.device | str) -> tuple[int, int]:
    """(allocated, reserved) peak bytes of this rank since the last reset: the CUDA caching allocator's two
    high-water marks; on CPU both are the process's peak RSS (which cannot be reset)."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device)), int(torch.cuda.max_memory_reserved(device))
    rss = peak_memory_bytes(device)
    return rss, rss


def window_peak_memory(device: torch.device | str, group: dist.ProcessGroup | None = None) -> tuple[int, int]:
    """(allocated, reserved) peak bytes of the log window, the maximum over all ranks (host values agreed on
    the host ``group``, gloo), then a new window starts (CUDA)."""
    peaks = torch.tensor(local_peak_memory(device), dtype=torch.int64)
    if dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(peaks, op=dist.ReduceOp.MAX, group=group)
    reset_peak_memory(device)
    allocated, reserved = peaks.tolist()
    return allocated, reserved


def reset_peak_memory(device: torch.device | str) -> None:
    """Start a new CUDA peak-memory window; the CPU peak RSS cannot be reset (no-op)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


@dataclass(frozen=True)
class Throughput:
    """Averages over one logging window."""

    steps: int
    tokens: int
    seconds: float
    tokens_per_s: float
    step_time_s: float
    mfu: float
    mfu_source: str
    hfu: float = 0.0  # hardware FLOPs utilisation: recomputation (activation checkpointing) included

    def as_metrics(self) -> dict[str, Any]:
        """The keys the metrics log expects."""
        return {
            "tokens_per_s": self.tokens_per_s,
            "mfu": self.mfu,
            "hfu": self.hfu,
            "step_time_s": self.step_time_s,
            "mfu_source": self.mfu_source,
        }


class ThroughputMeter:
    """Accumulates (tokens, seconds) per step; ``window()`` returns the averages and starts a new window.

    ``tokens`` are the tokens of the whole step across all data-parallel ranks (global batch x seq_len);
    ``n_devices`` is the number of devices doing that work (the world size). ``recompute_flops_per_token``:
    what activation checkpointing adds (``mfu.recompute_flops_per_token``), counted by HFU only. A measured
    CPU peak that the run beats is probed again and raised (``mfu.raise_cpu_peak``).
    """

    def __init__(self, flops_per_token: float, peak: PeakFlops, n_devices: int,
                 recompute_flops_per_token: float = 0.0) -> None:
        self.flops_per_token = flops_per_token
        self.recompute_flops_per_token = recompute_flops_per_token
        self.peak = peak
        self.n_devices = n_devices
        self._steps = 0
        self._tokens = 0
        self._seconds = 0.0

    def update(self, tokens: int, seconds: float) -> None:
        self._steps += 1
        self._tokens += int(tokens)
        self._seconds += float(seconds)

    def window(self) -> Throughput:
        steps, tokens, seconds = self._steps, self._tokens, self._seconds
        self._steps, self._tokens, self._seconds = 0, 0, 0.0
        tokens_per_s = tokens / seconds if seconds > 0 else 0.0
        hardware_flops = self.flops_per_token + self.recompute_flops_per_token
        self.peak = raise_cpu_peak(self.peak, tokens_per_s * hardware_flops / max(self.n_devices, 1))
        return Throughput(
            steps=steps,
            tokens=tokens,
            seconds=seconds,
            tokens_per_s=tokens_per_s,
            step_time_s=seconds / steps if steps else 0.0,
            mfu=mfu(tokens_per_s, self.flops_per_token, self.peak, self.n_devices),
            mfu_source=self.peak.source,
            hfu=mfu(tokens_per_s, hardware_flops, self.peak, self.n_devices),
        )
