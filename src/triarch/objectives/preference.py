"""Reward-model and DPO objectives for the engine (``objectives.base``): pair rows, losses, statistics.

A pair batch interleaves rows: row 2i is example i's chosen sequence, row 2i + 1 its rejected one
(``rows_per_example = 2``), so any micro-batch split keeps each pair in one loss call. ``labels`` mark the
response tokens (prompt and padding are ``IGNORE_INDEX``); DPO also reads ``ref_logps`` (the frozen
reference's sequence log-probs, per row) and the reward model an optional ``margin`` (per row, the pair's
value on both rows).
"""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor

from triarch.objectives.base import Fields
from triarch.objectives.pair_losses import dpo_losses, last_label_positions, reward_losses, sequence_log_probs

DPO_STATS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
             "logps/rejected")
RM_STATS = ("accuracy", "margin", "rewards/chosen", "rewards/rejected")


def _plain(value: torch.Tensor) -> torch.Tensor:
    """A replicated DTensor (from the vocabulary-parallel loss) as a plain tensor, differentiably."""
    return value.full_tensor() if isinstance(value, DTensor) else value


def _pairs(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    pairs = values.view(-1, 2)
    return pairs[:, 0], pairs[:, 1]


class _PairObjective:
    rows_per_example = 2

    def units(self, fields: Fields) -> torch.Tensor:
        labels = fields["labels"]
        return torch.tensor(labels.shape[0] // 2, dtype=torch.int64, device=labels.device)

    def units_bound(self, fields: Fields) -> int:
        return fields["labels"].shape[0] // 2


class RewardObjective(_PairObjective):
    """Bradley-Terry loss on the scalar head's value at each sequence's last response token."""

    stat_names = RM_STATS

    def __init__(self, use_margin: bool = False) -> None:
        self.use_margin = use_margin

    def loss(self, output: torch.Tensor, fields: Fields) -> tuple[torch.Tensor, torch.Tensor]:
        rewards = sequence_rewards(output, fields["labels"])
        chosen, rejected = _pairs(rewards)
        margin = _pairs(fields["margin"])[0].float() if self.use_margin else None
        losses = reward_losses(chosen, rejected, margin)
        diff = (chosen - rejected).detach()
        stats = torch.stack([(diff > 0).float().sum(), diff.sum(), chosen.detach().sum(), rejected.detach().sum()])
        return losses.sum(), stats


def sequence_rewards(values: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The scalar head's output (rows, seq, 1) read at each row's last response token, float32."""
    values = _plain(values).float().squeeze(-1)
    last = last_label_positions(labels).clamp(max=values.shape[1] - 1)
    return values.gather(1, last[:, None]).squeeze(1)


class DpoObjective(_PairObjective):
    """DPO and variants (``objectives.pair_losses``) against per-row reference log-probs in ``fields["ref_logps"]``."""

    stat_names = DPO_STATS

    def __init__(self, beta: float, loss_type: str = "sigmoid", label_smoothing: float = 0.0) -> None:
        self.beta, self.loss_type, self.label_smoothing = beta, loss_type, label_smoothing

    def loss(self, output: torch.Tensor, fields: Fields) -> tuple[torch.Tensor, torch.Tensor]:
        logps = _plain(sequence_log_probs(output, fields["labels"]))
        chosen, rejected = _pairs(logps)
        ref_chosen, ref_rejected = _pairs(fields["ref_logps"].to(logps.dtype))
        losses = dpo_losses(chosen, rejected, ref_chosen, ref_rejected, beta=self.beta, loss_type=self.loss_type,
                            label_smoothing=self.label_smoothing)
        reward_chosen = self.beta * (chosen - ref_chosen).detach()
        reward_rejected = self.beta * (rejected - ref_rejected).detach()
        stats = torch.stack([reward_chosen.sum(), reward_rejected.sum(), (reward_chosen > reward_rejected).float().sum(),
                             (reward_chosen - reward_rejected).sum(), chosen.detach().sum(), rejected.detach().sum()])
        return losses.sum(), stats


def reference_row_fn(output: torch.Tensor, fields: Fields) -> torch.Tensor:
    """Per-row sequence log-probs for ``Engine.forward_rows`` (the reference pass)."""
    return sequence_log_probs(output, fields["labels"])
