"""AdamW with decoupled weight decay on matrices only, and a warmup + decay learning-rate schedule."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from triarch.config import TrainConfig


def build_optimizer(modules: list[nn.Module], cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW over every parameter of ``modules``, with the fused kernel (CUDA and CPU): its step counters
    stay tensors the kernel reads itself, so an optimizer step never copies a value to the host."""
    decay, no_decay, seen = [], [], set()
    for module in modules:
        for p in module.parameters():
            if id(p) in seen or not p.requires_grad:
                continue
            seen.add(id(p))
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=True)


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
