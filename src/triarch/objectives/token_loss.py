"""Token losses that work on full or vocabulary-sharded (tensor-parallel) logits.

A loss function here maps (logits, labels) to the *sum* over the micro-batch's counted tokens; the
engine divides by the global count of counted tokens, which makes the loss identical for any layout.
Labels equal to ``IGNORE_INDEX`` are not counted (loss masks).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from triarch.labels import IGNORE_INDEX

TokenLossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def cross_entropy_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy in float32 (call inside ``loss_parallel`` for sharded logits)."""
    flat = logits.flatten(0, 1).float()
    return F.cross_entropy(flat, labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")


def token_log_probs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-token log-probability of each label, shape of ``labels`` (0 where ignored)."""
    flat = logits.flatten(0, 1).float()
    nll = F.cross_entropy(flat, labels.flatten(), ignore_index=IGNORE_INDEX, reduction="none")
    return -nll.view(labels.shape)


def counted_tokens(labels: torch.Tensor) -> int:
    """Number of label positions that contribute to the loss."""
    return int((labels != IGNORE_INDEX).sum())
