"""Rank-0 metrics outputs: ``RUN_DIR/metrics.jsonl``, TensorBoard scalars, and a progress bar or log line.

Each ``log`` call appends one JSON object (``step`` first; non-finite floats as ``null``) and flushes it, so
a killed run loses at most the line being written. On resume, lines past the resumed step are dropped
first, so the file never holds a step twice.
"""

from __future__ import annotations

import json
import logging
import math
import numbers
import os
import sys
from pathlib import Path
from typing import Any, Literal

import torch

log = logging.getLogger("triarch.train")

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
GIB = 1024**3


def _scalar(key: str, value: Any) -> Any:
    """A plain Python scalar (non-finite floats kept) from a number, 1-element tensor, string or None."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise TypeError(f"metric '{key}' is a tensor of shape {tuple(value.shape)}, not a scalar")
        value = value.item()
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    raise TypeError(f"metric '{key}' has type {type(value).__name__}; expected a number, string or None")


def _json_value(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def truncate_after(path: Path, step: int) -> int:
    """Drop lines of a metrics.jsonl whose step is past ``step`` (and torn lines); return how many were dropped."""
    if not path.exists():
        return 0
    kept: list[str] = []
    dropped = 0
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():  # bytes that are not UTF-8: torn
        try:
            record = json.loads(line)
            keep = isinstance(record, dict) and int(record["step"]) <= step
        except (ValueError, KeyError, TypeError):
            keep = False
        if keep:
            kept.append(line)
        else:
            dropped += bool(line.strip())
    if dropped:
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "w") as f:
            f.write("".join(line + "\n" for line in kept))
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(path)
    return dropped


def _format_bytes(n: float) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB else f"{n / 1024**2:.0f} MiB"


def summary_line(step: int, total_steps: int, values: dict[str, Any]) -> str:
    """``step 12/100 | loss 5.4321 | lr 3.0e-04 | gnorm 1.23 | 12,345 tok/s | mfu 4.1% (src) | 0.52 s``."""
    parts = [f"step {step}/{total_steps}"]

    def number(key: str) -> float | None:
        v = values.get(key)
        return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None

    for key, label, fmt in (("loss", "loss", "{:.4f}"), ("lr", "lr", "{:.1e}"), ("grad_norm", "gnorm", "{:.2f}")):
        if (v := number(key)) is not None:
            parts.append(f"{label} {fmt.format(v)}")
    if (v := number("tokens_per_s")) is not None:
        parts.append(f"{v:,.0f} tok/s")
    if (v := number("mfu")) is not None:
        source = values.get("mfu_source")
        parts.append(f"mfu {v:.1%}" + (f" ({source})" if source else ""))
    if (v := number("step_time_s")) is not None:
        parts.append(f"{v:.2f} s")
    if (v := number("peak_mem_bytes")) is not None:
        parts.append(f"mem {_format_bytes(v)}")
    return " | ".join(parts)


class MetricsLogger:
    """Writes metrics.jsonl, TensorBoard scalars and progress; every method is a no-op unless ``enabled``.

    Use on rank 0 only. ``start_step`` is the last completed step of a resumed run (0 for a fresh one);
    lines an earlier attempt wrote past it are dropped, so a restart from step 0 clears the old file.
    """

    def __init__(
        self,
        run_dir: Path,
        *,
        enabled: bool,
        total_steps: int,
        tensorboard: bool,
        progress: Literal["auto", "on", "off"] = "auto",
        start_step: int = 0,
    ) -> None:
        self.enabled = enabled
        self.total_steps = total_steps
        self.path = Path(run_dir) / METRICS_FILE
        self._file = None
        self._writer = None
        self._progress = None
        self._task = None
        self._closed = not enabled
        if not enabled:
            return
        if progress not in ("auto", "on", "off"):
            raise ValueError(f"progress ({progress!r}) must be 'auto', 'on' or 'off'")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        dropped = truncate_after(self.path, start_step)
        if dropped:
            log.info("dropped %d metrics line(s) past step %d in %s", dropped, start_step, self.path)
        self._file = open(self.path, "a", encoding="utf-8")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step hides events an earlier attempt wrote past the resumed step, as in metrics.jsonl.
            self._writer = SummaryWriter(log_dir=str(Path(run_dir) / TENSORBOARD_DIR), purge_step=start_step + 1)
        if progress == "on" or (progress == "auto" and sys.stdout.isatty()):
            self._start_progress(start_step)

    def _start_progress(self, start_step: int) -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self._progress = Progress(
            TextColumn("[bold]train"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[stats]}"),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
        )
        self._task = self._progress.add_task("train", total=self.total_steps, completed=start_step, stats="")
        self._progress.start()

    def _write(self, step: int, values: dict[str, Any], tags: dict[str, str]) -> None:
        """One JSON line (``step`` first), then each numeric value as a TensorBoard scalar under ``tags[key]``."""
        record = {"step": int(step)}
        record.update({k: _json_value(v) for k, v in values.items() if k != "step"})
        self._file.write(json.dumps(record, allow_nan=False) + "\n")
        self._file.flush()
        if self._writer is not None:
            for key, value in values.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._writer.add_scalar(tags[key], value, global_step=step)
            self._writer.flush()

    def log(self, step: int, values: dict[str, Any]) -> None:
        """Record one training step's metrics."""
        if self._closed:
            return
        clean = {k: _scalar(k, v) for k, v in values.items()}
        self._write(step, clean, {k: f"train/{k}" for k in clean})
        if self._progress is not None:
            stats = []
            if isinstance(loss := clean.get("loss"), float):
                stats.append(f"loss {loss:.4f}")
            if isinstance(tok := clean.get("tokens_per_s"), (int, float)):
                stats.append(f"{tok:,.0f} tok/s")
            self._progress.update(self._task, completed=step, stats=" | ".join(stats))
        else:
            log.info(summary_line(step, self.total_steps, clean))

    def log_eval(self, step: int, values: dict[str, Any]) -> None:
        """Record evaluation metrics; keys are prefixed ``eval_`` unless they already are."""
        if self._closed:
            return
        clean = {(k if k.startswith("eval_") else f"eval_{k}"): _scalar(k, v) for k, v in values.items()}
        self._write(step, clean, {k: f"eval/{k.removeprefix('eval_')}" for k in clean})
        line = f"eval step {step}/{self.total_steps} | " + " | ".join(
            f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in clean.items()
        )
        if self._progress is not None:
            self._progress.console.print(line)
        else:
            log.info(line)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._progress is not None:
            self._progress.stop()
        if self._writer is not None:
            self._writer.close()
        if self._file is not None:
            self._file.close()

    def __enter__(self) -> "MetricsLogger":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
