"""A profiling session inside the training loop: ``profile.warmup`` steps run plain, the next
``profile.steps`` run under ``torch.profiler``, then each rank writes its Chrome trace and its step
breakdown and rank 0 writes the run's summary (``profiling.report``), and the loop ends.

Nothing else about the run changes: the same metrics lines, and checkpoints as the config asks (the
loop's last step saves as ``train.exit_at_step`` does)."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.profiler import ProfilerActivity, profile

from triarch.profiling import scopes
from triarch.profiling.breakdown import step_breakdowns

log = logging.getLogger("triarch.train")
PROFILE_DIR = "profile"
MEMORY_HISTORY_ENTRIES = 100_000


class NoProfiler:
    """The loop's profiler when profiling is off: every step is just a named range."""

    done = False

    def record(self, step: int, seconds: float) -> None:
        """The engine step's time as the loop measured it (unused when not profiling)."""

    def is_last(self, step: int) -> bool:
        return False

    @contextlib.contextmanager
    def step(self, step: int) -> Iterator[None]:
        with scopes.scope(f"{scopes.STEP}#{step}"):
            yield


class StepProfiler:
    """Profiles steps ``first .. first + steps - 1`` (``first`` = the resumed step + ``warmup`` + 1);
    ``done`` turns True after the last one, once the outputs are written.

    ``rank_facts`` (tokens per step, FLOPs per token, the peak) let each rank state its MFU and HFU over
    the profiled steps; ``group`` is the host (gloo) group rank 0 gathers the summaries over."""

    def __init__(self, run_dir: Path, first: int, steps: int, device: torch.device, group: dist.ProcessGroup | None,
                 rank_facts: dict[str, Any]) -> None:
        self.out = Path(run_dir) / PROFILE_DIR
        self.first, self.last = first, first + steps - 1
        self.device, self.group, self.facts = device, group, rank_facts
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.done = False
        self._prof: profile | None = None
        self._walls: dict[int, float] = {}
        self._compute: dict[int, float] = {}

    def record(self, step: int, seconds: float) -> None:
        """The engine step's time as the loop measured it (what its MFU counts), for this rank's MFU."""
        self._compute[step] = seconds

    def is_last(self, step: int) -> bool:
        """Whether ``step`` is the last profiled one (the loop ends after it)."""
        return step == self.last

    @contextlib.contextmanager
    def step(self, step: int) -> Iterator[None]:
        if step == self.first:
            self._start()
        started = time.perf_counter()
        with scopes.scope(f"{scopes.STEP}#{step}"):
            yield
        if self._prof is not None:
            self._walls[step] = time.perf_counter() - started
        if step == self.last:
            self._finish()

    def _start(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
        if self.device.type == "cuda":
            torch.cuda.memory._record_memory_history(max_entries=MEMORY_HISTORY_ENTRIES)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:  # kineto prints "USDT: ... profiler_start/stop" per rank at its highest level (5); on CUDA its
            os.environ.setdefault("KINETO_LOG_LEVEL", "6")  # errors (CUPTI permissions) matter, so only on CPU
        self._prof = profile(activities=activities, record_shapes=False, profile_memory=False)
        self._prof.start()

    def _finish(self) -> None:
        assert self._prof is not None
        self._prof.stop()
        trace_path = self.out / f"rank{self.rank}.trace.json"
        self._prof.export_chrome_trace(str(trace_path))
        self._prof = None
        rank_summary = self._rank_summary(json.loads(trace_path.read_text()))
        if self.device.type == "cuda":
            torch.cuda.memory._dump_snapshot(str(self.out / f"rank{self.rank}.memory_snapshot.pickle"))
            torch.cuda.memory._record_memory_history(enabled=None)
        (self.out / f"rank{self.rank}.summary.json").write_text(json.dumps(rank_summary, indent=1))
        gathered: list[Any] = [rank_summary]
        if dist.is_initialized() and dist.get_world_size(self.group) > 1:
            gathered = [None] * dist.get_world_size(self.group)
            dist.all_gather_object(gathered, rank_summary, group=self.group)
        if self.rank == 0:
            from triarch.profiling.report import write_report

            write_report(self.out, gathered, self.facts)
        self.done = True

    def _rank_summary(self, trace: dict[str, Any]) -> dict[str, Any]:
        from triarch.training.metrics import local_peak_memory
        from triarch.training.mfu import mfu

        steps = step_breakdowns(trace)
        n = max(len(steps), 1)
        parts = {k: sum(s.parts[k] for s in steps) / n for k in (steps[0].parts if steps else {})}
        wall = sum(s.wall_s for s in steps) / n
        measured = sum(self._walls.values()) / max(len(self._walls), 1)
        compute = sum(self._compute.get(s.step, 0.0) for s in steps) / n
        tokens_per_s = self.facts["tokens_per_step"] / compute if compute > 0 else 0.0
        allocated, reserved = local_peak_memory(self.device)
        peak = self.facts["peak"]
        return {
            "rank": self.rank, "layout": self.facts["layout"], "steps": [s.step for s in steps],
            "step_wall_s": wall, "measured_wall_s": measured, "train_step_s": compute, "parts_s": parts,
            "comm_exposed_s": sum(s.comm_exposed_s for s in steps) / n,
            "comm_overlapped_s": sum(s.comm_overlapped_s for s in steps) / n,
            "mfu": mfu(tokens_per_s, self.facts["flops_per_token"], peak, self.facts["world_size"]),
            "hfu": mfu(tokens_per_s, self.facts["flops_per_token"] + self.facts["recompute_flops_per_token"], peak,
                       self.facts["world_size"]),
            "mfu_source": peak.source, "tokens_per_s": tokens_per_s,
            "peak_mem_bytes": allocated, "peak_mem_reserved_bytes": reserved,
            "per_step": [asdict(s) for s in steps],
        }
