"""The learning-rate schedule every engine follows: linear warmup, then cosine or linear decay to a floor.

``lr_factor`` is the schedule itself (a function of the step and the config); ``build_scheduler`` drives a torch
optimizer's groups with it, and ``set_schedule_step`` puts it at a step (resume), so the learning rate of a step
depends on the step and the current config only, never on the engine or on how the run got there.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch.optim.lr_scheduler import LambdaLR, LRScheduler

from triarch.config import TrainConfig


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Multiplier of ``cfg.lr`` used for optimizer step ``step`` (0-based)."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    decay_steps = cfg.resolved_decay_steps
    if cfg.decay == "constant" or decay_steps == 0:
        return 1.0
    progress = min((step - cfg.warmup_steps) / decay_steps, 1.0)
    if cfg.decay == "linear":
        shape = 1.0 - progress
    else:
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * shape


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> LambdaLR:
    """Per-step LR schedule: linear warmup, then cosine or linear decay to ``min_lr_ratio``."""
    return LambdaLR(optimizer, lambda step: lr_factor(step, cfg))


def set_schedule_step(scheduler: LambdaLR, step: int) -> None:
    """Put the schedule at ``step`` optimizer steps done: the next step's learning rate is
    ``base lr x lr_factor(step)`` of the *current* config, whatever schedule a checkpoint was saved with."""
    scheduler.last_epoch = step
    scheduler._step_count = step + 1  # noqa: SLF001 (LambdaLR's own bookkeeping: no warning on the next step)
    lrs = [base * factor(step) for base, factor in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    for group, lr in zip(scheduler.optimizer.param_groups, lrs):
        group["lr"] = lr
    scheduler._last_lr = lrs  # noqa: SLF001


def scheduler_state(scheduler: LRScheduler) -> dict[str, Any]:
    """The LR schedule's position (plain Python values)."""
    s = scheduler.state_dict()
    return {"last_epoch": s["last_epoch"], "_step_count": s["_step_count"], "_last_lr": list(s["_last_lr"])}


def load_scheduler_state(scheduler: LRScheduler, state: dict[str, Any]) -> None:
    """Restore the LR schedule and the learning rate the next step will use."""
    scheduler.load_state_dict({**scheduler.state_dict(), **state})
    for group, lr in zip(scheduler.optimizer.param_groups, scheduler.get_last_lr()):
        group["lr"] = lr
