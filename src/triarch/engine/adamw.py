"""The AdamW of the engines that step a torch optimizer (native; deepspeed as its client optimizer): decoupled
weight decay on matrices only."""

from __future__ import annotations

import torch
from torch import nn

from triarch.config import TrainConfig


def adamw_groups(modules: list[nn.Module], cfg: TrainConfig) -> list[dict]:
    """Two parameter groups over every trainable parameter of ``modules`` (each once): matrices with
    ``cfg.weight_decay``, vectors (norm weights) without."""
    decay, no_decay, seen = [], [], set()
    for module in modules:
        for p in module.parameters():
            if id(p) in seen or not p.requires_grad:
                continue
            seen.add(id(p))
            shape = getattr(p, "ds_shape", p.shape)  # a ZeRO-3 partitioned parameter keeps its shape there
            (decay if len(shape) >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(modules: list[nn.Module], cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW over every parameter of ``modules``, with the fused kernel (CUDA and CPU): its step counters
    stay tensors the kernel reads itself, so an optimizer step never copies a value to the host."""
    return torch.optim.AdamW(adamw_groups(modules, cfg), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                             fused=True)
