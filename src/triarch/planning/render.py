"""What ``triarch plan`` prints: a table of the ranked layouts (or JSON) and the override line of the best."""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import Any

from triarch.planning.devices import GIB, Device
from triarch.planning.memory import Layout
from triarch.planning.search import Candidate


def as_json(candidates: list[Candidate], device: Device, gpus: int) -> str:
    """The ranked layouts as one JSON document."""
    rows: list[dict[str, Any]] = []
    for c in candidates:
        rows.append({"layout": asdict(c.layout), "overrides": c.layout.overrides(),
                     "memory_bytes": {**c.memory.terms(), "total": c.memory.total, "host": c.memory.host,
                                      "host_per_node": c.host_per_node},
                     "step_time_s": {**c.step.terms(), "total": c.step.total},
                     "tokens_per_s": c.tokens_per_s, "mfu": c.mfu})
    return json.dumps({"device": device.key, "gpus": gpus, "usable_bytes": device.usable_bytes,
                       "host_usable_bytes_per_node": device.host_usable_bytes, "layouts": rows}, indent=1)


def _offload(layout: Layout) -> str:
    if not layout.zero_stage:
        return layout.fsdp_offload
    moved = [name for name, where in (("opt", layout.offload_optimizer), ("params", layout.offload_params))
             if where != "none"]
    return "+".join(moved) or "none"


def print_table(candidates: list[Candidate], device: Device, gpus: int, gpus_per_node: int) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"layouts on {gpus} x {device.key} ({gpus_per_node} per node), by predicted tokens/s; "
                        f"{device.usable_bytes / GIB:.0f} GiB usable per GPU")
    offloaded = any(c.memory.offloaded for c in candidates)
    zero = any(c.layout.zero_stage for c in candidates)
    names = ["#", "tp", "pp", "v", "dp r x s", "mbs", "recompute", "prec", "mem GiB", "step s", "tok/s", "MFU"]
    if offloaded or zero:  # the offload choice and each rank's state in host memory
        names[8:8] = ["offload", "host GiB/node"]
    if zero:
        names[1:4] = ["ZeRO"]
    for name in names:
        table.add_column(name, justify="right")
    for i, c in enumerate(candidates, 1):
        lay = c.layout
        cells = [str(i), str(lay.tp), str(lay.pp), str(lay.virtual_stages), f"{lay.dp_replicate}x{lay.dp_shard}",
                 str(lay.micro_batch_size), lay.activation_checkpoint, lay.precision, f"{c.memory.total / GIB:.1f}",
                 f"{c.step.total:.2f}", f"{c.tokens_per_s:,.0f}", f"{c.mfu:.0%}"]
        if offloaded or zero:
            cells[8:8] = [_offload(lay), f"{c.host_per_node / GIB:.0f}"]
        if zero:
            cells[1:4] = [str(lay.zero_stage)]
        table.add_row(*cells)
    console = Console()
    if console.width < 110:  # not a terminal (a pipe, a log): wide enough for every column
        console = Console(width=110)
    console.print(table)
    best = candidates[0]
    mem = ", ".join(f"{k} {v / GIB:.1f}" for k, v in best.memory.terms().items() if v or not k.startswith("host"))
    time = ", ".join(f"{k} {v:.2f}" for k, v in best.step.terms().items())
    console.print(f"best: memory GiB {mem}; step s {time}")
    console.print("run it with: " + " ".join(best.layout.overrides()), soft_wrap=True)
