"""Split each profiled step of one rank's Chrome trace into the parts of a training step.

The host thread that runs the step loop is swept from the start of each ``triarch.step`` range to its end;
every instant is given to exactly one part, so the parts add up to the step's wall time:

- the innermost range or operator that names a part wins: ``profiling.scopes`` (data, forward/backward,
  optimizer, checkpoint, evaluation), torch's ``Optimizer.step#...`` (optimizer) and
  ``autograd::engine::evaluate_function: ...`` (backward);
- a communication operator (``c10d::...``, ``_c10d_functional::...``, ``record_param_comms``) is exposed
  communication: pipeline send/recv when it is one; else data-parallel inside an ``FSDP::`` range (FSDP2's
  gathers and reductions), the engine's gradient-sync range or the optimizer range (the loss and
  gradient-norm reductions, a distributed optimizer's gathers); else tensor-parallel inside the
  forward/backward range; else ``sync``: the step's agreement all-reduce (loss, norm, flags) and the
  loop's own (peak memory), where a rank waits for the slowest (a pipeline's last stage waits there for
  the first one's last backward). Ranges inside data wait, checkpointing and evaluation stay there;
- time between operators (Python) belongs to the part of the operator before it when that was forward or
  backward compute, else to the enclosing part, with two exceptions. Right after a communication
  operator (which only posts the work), the time its collective is still running on the backend's threads
  (the ``gloo:*`` spans) is that collective's exposed wait. Elsewhere, while a pipeline send or receive
  this thread started is still in flight (``gloo:send`` / ``gloo:recv``), the thread waits for its
  pipeline neighbour: the pipeline bubble (so is the wait right after posting a send or receive);
- communication that runs on the backend's own threads while this thread computes is overlapped
  communication (reported apart: it costs no step time).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from triarch.profiling import scopes

PARTS = ("forward", "backward", "optimizer", "tp_comm", "dp_comm", "pp_send_recv", "pp_bubble", "sync",
         "data_wait", "checkpoint", "evaluation", "other")
COMM_PARTS = ("tp_comm", "dp_comm", "pp_send_recv", "sync")
STICKY = {scopes.DATA: "data_wait", scopes.CHECKPOINT: "checkpoint", scopes.EVALUATION: "evaluation"}
COMM_PREFIXES = ("c10d::", "_c10d_functional::", "record_param_comms", "nccl:")
P2P_SPANS = ("gloo:send", "gloo:recv", "nccl:send", "nccl:recv")
BACKEND_SPANS = ("gloo:", "nccl:")
US = 1e-6


@dataclass
class StepBreakdown:
    """One profiled step on one rank: ``parts`` in seconds (they add up to ``wall_s``), and communication
    that the backend's threads ran while this thread computed (``comm_overlapped_s``)."""

    step: int
    wall_s: float
    parts: dict[str, float] = field(default_factory=lambda: dict.fromkeys(PARTS, 0.0))
    comm_overlapped_s: float = 0.0

    @property
    def comm_exposed_s(self) -> float:
        return sum(self.parts[p] for p in COMM_PARTS)


@dataclass
class _Node:
    name: str
    start: float
    end: float
    op: bool = False  # an operator (C++ time) rather than a Python-level range
    children: list["_Node"] = field(default_factory=list)


def _own_label(name: str) -> str | None:
    if name in STICKY:
        return STICKY[name]
    if name == scopes.FORWARD_BACKWARD:
        return "forward"
    if name == scopes.OPTIMIZER or name.startswith("Optimizer."):
        return "optimizer"
    if name.startswith("autograd::engine::evaluate_function"):
        return "backward"
    return None


def _comm_label(name: str, comm_class: str) -> str | None:
    if not name.startswith(COMM_PREFIXES) or name.startswith("_c10d_functional::_wrap_tensor_autograd"):
        return None
    if "send" in name or "recv" in name:
        return "pp_send_recv"
    return comm_class


def _comm_class(name: str, inherited: str) -> str:
    """What a collective inside the range ``name`` serves."""
    if name.startswith("FSDP::") or name in (scopes.GRAD_SYNC, scopes.OPTIMIZER) or name.startswith("Optimizer."):
        return "dp_comm"
    if name == scopes.FORWARD_BACKWARD:
        return "tp_comm"
    if name == scopes.AGREE:
        return "sync"
    return inherited


def _merge(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    merged: list[tuple[float, float]] = []
    for a, b in sorted(intervals):
        if merged and a <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], b))
        else:
            merged.append((a, b))
    return merged


def _overlap(a: float, b: float, spans: list[tuple[float, float]]) -> float:
    """Length of [a, b) covered by the sorted, disjoint ``spans``."""
    total = 0.0
    for lo, hi in spans:
        if hi <= a:
            continue
        if lo >= b:
            break
        total += min(b, hi) - max(a, lo)
    return total


def _intersection(xs: list[tuple[float, float]], ys: list[tuple[float, float]]) -> float:
    """Total length of the intersection of two sorted, disjoint interval lists."""
    i = j = 0
    total = 0.0
    while i < len(xs) and j < len(ys):
        lo, hi = max(xs[i][0], ys[j][0]), min(xs[i][1], ys[j][1])
        if hi > lo:
            total += hi - lo
        if xs[i][1] < ys[j][1]:
            i += 1
        else:
            j += 1
    return total


def _tree(events: list[dict[str, Any]], start: float, end: float) -> _Node:
    root = _Node(scopes.STEP, start, end)
    stack = [root]
    for e in sorted(events, key=lambda e: (e["ts"], -e["dur"])):
        a, b = float(e["ts"]), float(e["ts"]) + float(e["dur"])
        if b <= start or a >= end:
            continue
        while len(stack) > 1 and a >= stack[-1].end:
            stack.pop()
        parent = stack[-1]
        node = _Node(e["name"], max(a, parent.start), min(b, parent.end), op=e.get("cat") != "user_annotation")
        parent.children.append(node)
        stack.append(node)
    return root


class _Sweep:
    """Walks one step's tree and gives each instant to a part."""

    def __init__(self, p2p: list[tuple[float, float]], in_flight: list[tuple[float, float]]) -> None:
        self.p2p, self.in_flight = p2p, in_flight
        self.parts = dict.fromkeys(PARTS, 0.0)
        self.compute: list[tuple[float, float]] = []  # instants the thread computed (not waiting)

    def _add(self, label: str, a: float, b: float, gap: bool, after: str | None = None) -> None:
        """[a, b) to ``label``; in a Python ``gap`` right after a communication operator (``after``), the
        time its collective is still in flight is that operator's wait (a pipeline transfer's: the bubble);
        in any other gap, the time a pipeline transfer is in flight is the bubble."""
        if b <= a:
            return
        waiting, wait_label = 0.0, "pp_bubble"
        if gap and after in COMM_PARTS:
            waiting = _overlap(a, b, self.in_flight)
            wait_label = "pp_bubble" if after == "pp_send_recv" else after
        elif gap and label not in STICKY.values() and label not in COMM_PARTS:
            waiting = _overlap(a, b, self.p2p)
        self.parts[wait_label] += waiting
        self.parts[label] += (b - a) - waiting
        if label not in COMM_PARTS and not waiting:
            self.compute.append((a, b))

    def walk(self, root: _Node) -> None:
        work = [(root, "other", "sync")]
        while work:
            node, inherited, comm_class = work.pop()
            label = inherited
            if inherited not in STICKY.values():
                label = _comm_label(node.name, comm_class) or _own_label(node.name) or inherited
            comm_class = _comm_class(node.name, comm_class)
            cursor, gap_label, after = node.start, label, None
            python = not node.op  # time between this range's operators is Python, or a wait
            for child in node.children:
                self._add(gap_label, cursor, child.start, gap=python, after=after)
                work.append((child, label, comm_class))
                child_label = label
                if label not in STICKY.values():
                    child_label = _comm_label(child.name, comm_class) or _own_label(child.name) or label
                gap_label = child_label if child_label in ("forward", "backward") else label
                after = child_label
                cursor = max(cursor, child.end)
            self._add(gap_label, cursor, node.end, gap=python, after=after)


def step_breakdowns(trace: dict[str, Any]) -> list[StepBreakdown]:
    """The breakdown of every ``triarch.step#N`` range in one rank's Chrome trace (``torch.profiler``'s
    ``export_chrome_trace`` format), in step order."""
    events = [e for e in trace.get("traceEvents", []) if e.get("ph") == "X" and "dur" in e]
    steps = [e for e in events if str(e.get("name", "")).startswith(scopes.STEP + "#")]
    if not steps:
        return []
    tid = steps[0]["tid"]
    host = [e for e in events if e["tid"] == tid and not e["name"].startswith((scopes.STEP, "ProfilerStep#"))
            and not e["name"].startswith(BACKEND_SPANS)]
    p2p = _merge([(float(e["ts"]), float(e["ts"]) + float(e["dur"])) for e in events
                  if e["tid"] == tid and e["name"].startswith(P2P_SPANS)])
    backend = _merge([(float(e["ts"]), float(e["ts"]) + float(e["dur"])) for e in events
                      if e["tid"] != tid and e["name"].startswith(BACKEND_SPANS)])
    in_flight = _merge(p2p + backend)
    out = []
    for s in sorted(steps, key=lambda e: e["ts"]):
        start, end = float(s["ts"]), float(s["ts"]) + float(s["dur"])
        inside = [e for e in host if float(e["ts"]) < end and float(e["ts"]) + float(e["dur"]) > start]
        sweep = _Sweep(p2p, in_flight)
        sweep.walk(_tree(inside, start, end))
        overlapped = _intersection(_merge(sweep.compute), [(max(a, start), min(b, end)) for a, b in backend
                                                          if b > start and a < end])
        out.append(StepBreakdown(step=int(s["name"].split("#", 1)[1]), wall_s=(end - start) * US,
                                 parts={k: v * US for k, v in sweep.parts.items()}, comm_overlapped_s=overlapped * US))
    return out
