"""What a checkpoint holds for the engine, keyed by layout-independent names.

Model parameters and AdamW moments are DTensors (or plain tensors) under canonical parameter names, so
distributed checkpoint (DCP) can load them into any TP/PP/DP layout of the same model: each rank reads
exactly the shards its parameters hold.
"""

from __future__ import annotations

from typing import Any

import torch

from triarch.engine.native import NativeEngine
from triarch.parallel.init import canonical_name

_MOMENTS = ("exp_avg", "exp_avg_sq")


def named_parameters(engine: NativeEngine) -> dict[str, torch.nn.Parameter]:
    """This rank's parameters by canonical name (tied weights once)."""
    out: dict[str, torch.nn.Parameter] = {}
    seen: set[int] = set()
    for chunk in engine.chunks:
        for name, p in chunk.named_parameters():
            if id(p) not in seen:
                seen.add(id(p))
                out[canonical_name(name)] = p
    return out


def ensure_optimizer_state(engine: NativeEngine) -> None:
    """Create zeroed AdamW state for parameters that have none yet (before any step), so it can be loaded."""
    opt = engine.optimizer
    fused = bool(opt.defaults.get("fused"))
    for group in opt.param_groups:
        for p in group["params"]:
            if p in opt.state and opt.state[p]:
                continue
            step = torch.zeros((), dtype=torch.float32, device=p.device if fused else "cpu")
            opt.state[p] = {"step": step, **{m: torch.zeros_like(p, memory_format=torch.preserve_format) for m in _MOMENTS}}


def engine_state(engine: NativeEngine, prefix: str = "") -> dict[str, Any]:
    """Tensors to save or load in place: ``model.<name>``, ``optim.<name>.<moment>``, ``optim.<name>.step``,
    each behind ``prefix`` (a second trained model of the run, e.g. ``critic.``)."""
    ensure_optimizer_state(engine)
    state: dict[str, Any] = {}
    for name, p in named_parameters(engine).items():
        state[f"{prefix}model.{name}"] = p.detach()
        slot = engine.optimizer.state[p]
        for moment in _MOMENTS:
            state[f"{prefix}optim.{name}.{moment}"] = slot[moment]
        state[f"{prefix}optim.{name}.step"] = slot["step"]
    return state


def scheduler_state(engine: NativeEngine) -> dict[str, Any]:
    """The LR schedule's position (plain Python values)."""
    s = engine.scheduler.state_dict()
    return {"last_epoch": s["last_epoch"], "_step_count": s["_step_count"], "_last_lr": list(s["_last_lr"])}


def load_scheduler_state(engine: NativeEngine, state: dict[str, Any]) -> None:
    """Restore the LR schedule and the learning rate the next step will use."""
    engine.scheduler.load_state_dict({**engine.scheduler.state_dict(), **state})
    for group, lr in zip(engine.optimizer.param_groups, engine.scheduler.get_last_lr()):
        group["lr"] = lr
