"""The run-level outputs of a profiling session (rank 0): ``summary.json``, ``summary.md``,
``step_breakdown.png`` (one stacked bar per rank) and a table on the terminal."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from triarch.profiling.breakdown import PARTS

LABELS = {"forward": "forward", "backward": "backward", "optimizer": "optimizer", "tp_comm": "TP comm",
          "dp_comm": "DP comm", "pp_send_recv": "PP send/recv", "pp_bubble": "PP bubble", "sync": "sync",
          "data_wait": "data wait", "checkpoint": "checkpoint", "evaluation": "evaluation", "other": "other"}
COLORS = {"forward": "#4c72b0", "backward": "#55a868", "optimizer": "#8172b2", "tp_comm": "#c44e52",
          "dp_comm": "#dd8452", "pp_send_recv": "#937860", "pp_bubble": "#bbbbbb", "sync": "#64b5cd",
          "data_wait": "#da8bc3", "checkpoint": "#8c8c8c", "evaluation": "#ccb974", "other": "#e5e5e5"}


def _mib(n: int) -> str:
    return f"{n / 2**20:.0f} MiB"


def summary_markdown(ranks: list[dict[str, Any]]) -> str:
    """The per-rank table of ``summary.md``: each part in ms and in % of the step."""
    shown = [p for p in PARTS if any(r["parts_s"].get(p, 0.0) > 0 for r in ranks)]
    head = ["rank", "step ms", *[LABELS[p] for p in shown], "exposed comm", "overlapped comm", "MFU", "HFU",
            "peak memory"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in ranks:
        wall = r["step_wall_s"] or 1.0
        cells = [str(r["rank"]), f"{r['step_wall_s'] * 1e3:.1f}"]
        cells += [f"{r['parts_s'][p] * 1e3:.1f} ({r['parts_s'][p] / wall:.0%})" for p in shown]
        cells += [f"{r['comm_exposed_s'] * 1e3:.1f}", f"{r['comm_overlapped_s'] * 1e3:.1f}", f"{r['mfu']:.1%}",
                  f"{r['hfu']:.1%}", _mib(r["peak_mem_bytes"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _plot(ranks: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6.5, 3.5 + 0.6 * len(ranks)), 4.5))
    bottoms = [0.0] * len(ranks)
    x = list(range(len(ranks)))
    for part in PARTS:
        heights = [r["parts_s"].get(part, 0.0) * 1e3 for r in ranks]
        if not any(heights):
            continue
        ax.bar(x, heights, bottom=bottoms, color=COLORS[part], label=LABELS[part])
        bottoms = [b + h for b, h in zip(bottoms, heights)]
    ax.set_xticks(x, [str(r["rank"]) for r in ranks])
    ax.set_xlabel("rank")
    ax.set_ylabel("ms per step")
    ax.set_title(f"where a step's time goes\n{ranks[0]['layout']}", fontsize="medium")
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _print_table(ranks: list[dict[str, Any]], out: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    shown = [p for p in PARTS if any(r["parts_s"].get(p, 0.0) > 0 for r in ranks)]
    table = Table(title=f"ms per step by rank (mean of {len(ranks[0]['steps'])} profiled steps)")
    table.add_column("part")
    for r in ranks:
        table.add_column(f"rank {r['rank']}", justify="right")
    table.add_row("step", *[f"{r['step_wall_s'] * 1e3:.1f}" for r in ranks])
    for p in shown:
        table.add_row(LABELS[p], *[f"{r['parts_s'][p] * 1e3:.1f}" for r in ranks])
    table.add_row("overlapped comm", *[f"{r['comm_overlapped_s'] * 1e3:.1f}" for r in ranks])
    table.add_row("MFU / HFU", *[f"{r['mfu']:.1%} / {r['hfu']:.1%}" for r in ranks])
    console = Console()
    if console.width < 110:  # not a terminal (a pipe, a log): wide enough for every column
        console = Console(width=110)
    console.print(table)
    console.print(f"traces, summary.md and step_breakdown.png in {out}")


def write_report(out: Path, ranks: list[dict[str, Any]], facts: dict[str, Any]) -> None:
    """Write the run-level files from every rank's summary (``profiling.session``) and print the table."""
    ranks = sorted(ranks, key=lambda r: r["rank"])
    slowest = max(ranks, key=lambda r: r["step_wall_s"])
    summary = {"layout": facts["layout"], "parts": list(PARTS), "steps": ranks[0]["steps"],
               "slowest_rank": slowest["rank"], "ranks": ranks}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    md = [f"# Step breakdown ({facts['layout']})", "",
          f"Profiled steps {ranks[0]['steps']}; each part is the mean per step, in ms and as a share of the step's "
          "wall time on that rank (docs/profiling.md, \"Reading a profile\").", "", summary_markdown(ranks), "",
          f"Slowest rank: {slowest['rank']} ({slowest['step_wall_s'] * 1e3:.1f} ms per step). Traces: "
          "`rank<N>.trace.json` (open in https://ui.perfetto.dev or TensorBoard)."]
    (out / "summary.md").write_text("\n".join(md) + "\n")
    _plot(ranks, out / "step_breakdown.png")
    _print_table(ranks, out)
