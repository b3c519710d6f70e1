"""The alignment losses as plain formulas over per-sequence quantities (testable against the papers).

DPO (Rafailov et al. 2023) with ``h = (log pi(y_w) - log pi(y_l)) - (log ref(y_w) - log ref(y_l))``:
``sigmoid``: -log sigmoid(beta h), with conservative label smoothing eps (Mitchell 2023):
-(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h); ``ipo`` (Azar et al. 2023): (h - 1 / (2 beta))^2
on summed sequence log-probs (trl averages them over response tokens for ipo; we keep the paper's sums);
``hinge`` (SLiC, Zhao et al. 2023): max(0, 1 - beta h). The implicit rewards are beta (log pi - log ref).
Bradley-Terry reward loss: -log sigmoid(r_chosen - r_rejected - margin).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from triarch.labels import IGNORE_INDEX
from triarch.objectives.token_loss import token_log_probs

DPO_LOSS_TYPES = ("sigmoid", "ipo", "hinge")


def sequence_log_probs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of each row's counted label log-probabilities, shape (rows,), float32. Call inside
    ``loss_parallel`` for vocabulary-sharded logits: full logits are never gathered."""
    return token_log_probs(logits, labels).sum(-1)


def last_label_positions(labels: torch.Tensor) -> torch.Tensor:
    """Per row, the position of its last counted token (the last response token, EOS), i.e. one past the
    last counted label position (position i's label is token i + 1)."""
    positions = torch.arange(1, labels.shape[1] + 1, device=labels.device)
    return ((labels != IGNORE_INDEX) * positions).amax(-1)


def dpo_losses(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
               ref_rejected: torch.Tensor, *, beta: float, loss_type: str = "sigmoid",
               label_smoothing: float = 0.0) -> torch.Tensor:
    """Per-pair DPO losses of sequence log-probs (module docstring)."""
    h = (policy_chosen - policy_rejected) - (ref_chosen - ref_rejected)
    if loss_type == "sigmoid":
        return -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    if loss_type == "ipo":
        return (h - 1 / (2 * beta)) ** 2
    if loss_type == "hinge":
        return torch.relu(1 - beta * h)
    raise ValueError(f"loss_type must be one of {DPO_LOSS_TYPES}, got {loss_type!r}")


def reward_losses(chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor | None = None) -> torch.Tensor:
    """Per-pair Bradley-Terry losses -log sigmoid(r_chosen - r_rejected [- margin])."""
    diff = chosen - rejected
    if margin is not None:
        diff = diff - margin
    return -F.logsigmoid(diff)
