"""What a checkpoint holds for the native engine, keyed by layout-independent names.

Model parameters and AdamW moments are DTensors (or plain tensors) under canonical parameter names, so
distributed checkpoint (DCP) can load them into any TP/PP/DP layout of the same model: each rank reads
exactly the shards its parameters hold.
"""

from __future__ import annotations

from typing import Any

import torch

from triarch.parallel.init import canonical_name

_MOMENTS = ("exp_avg", "exp_avg_sq")


def named_parameters(chunks: list[torch.nn.Module]) -> dict[str, torch.nn.Parameter]:
    """This rank's parameters of ``chunks`` by canonical name (tied weights once)."""
    out: dict[str, torch.nn.Parameter] = {}
    seen: set[int] = set()
    for chunk in chunks:
        for name, p in chunk.named_parameters():
            if id(p) not in seen:
                seen.add(id(p))
                out[canonical_name(name)] = p
    return out


def ensure_optimizer_state(opt: torch.optim.Optimizer) -> None:
    """Create zeroed AdamW state for parameters that have none yet (before any step), so it can be loaded."""
    fused = bool(opt.defaults.get("fused"))
    for group in opt.param_groups:
        for p in group["params"]:
            if p in opt.state and opt.state[p]:
                continue
            step = torch.zeros((), dtype=torch.float32, device=p.device if fused else "cpu")
            moments = {m: torch.zeros_like(p, memory_format=torch.preserve_format) for m in _MOMENTS}
            opt.state[p] = {"step": step, **moments}


def engine_state(chunks: list[torch.nn.Module], opt: torch.optim.Optimizer, prefix: str = "") -> dict[str, Any]:
    """Tensors to save or load in place: ``model.<name>``, ``optim.<name>.<moment>``, ``optim.<name>.step``,
    each behind ``prefix`` (a second trained model of the run, e.g. ``critic.``)."""
    ensure_optimizer_state(opt)
    state: dict[str, Any] = {}
    for name, p in named_parameters(chunks).items():
        state[f"{prefix}model.{name}"] = p.detach()
        slot = opt.state[p]
        for moment in _MOMENTS:
            state[f"{prefix}optim.{name}.{moment}"] = slot[moment]
        state[f"{prefix}optim.{name}.step"] = slot["step"]
    return state
