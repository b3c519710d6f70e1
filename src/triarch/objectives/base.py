"""What a training step optimizes: a loss over one micro-batch's model outputs plus the batch fields it reads.

The engine runs every objective the same way (megatron's forward_step / loss_func pair): it splits this
rank's rows into micro-batches at example boundaries (``rows_per_example`` rows stay together, so a
chosen/rejected pair never splits), hands each micro-batch's last-stage output and its slice of the
per-row ``fields`` (labels, reference log-probs, margins, later advantages) to ``loss``, and normalizes the
summed loss by the global count of the objective's units (counted tokens, or pairs). ``loss`` also returns
per-unit statistic sums (``stat_names``), which the engine reduces in the step's one fused all-reduce and
reports as means over the units. Pretraining is the token objective below; the alignment objectives live
in ``triarch.rlhf``.
"""

from __future__ import annotations

from typing import Protocol

import torch

from triarch.labels import IGNORE_INDEX
from triarch.objectives.token_loss import TokenLossFn, cross_entropy_sum

Fields = dict[str, torch.Tensor]


class Objective(Protocol):
    """A loss plus what the engine must know to split, normalize and report it."""

    rows_per_example: int
    stat_names: tuple[str, ...]

    def units(self, fields: Fields) -> torch.Tensor:
        """This rank's count of normalizing units (a device tensor; summed over data-parallel ranks)."""

    def units_bound(self, fields: Fields) -> int:
        """A host-known count of this rank's units if every one counted (exact for pairs); the backward runs
        scaled by it so that the step reads the device only once."""

    def loss(self, output: torch.Tensor, fields: Fields) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(sum of the micro-batch's unit losses, sums of ``stat_names`` over its units or None)."""


class TokenObjective:
    """Next-token loss over counted labels (pretraining, and SFT with its loss masks in ``labels``)."""

    rows_per_example = 1
    stat_names: tuple[str, ...] = ()

    def __init__(self, loss_fn: TokenLossFn = cross_entropy_sum) -> None:
        self.loss_fn = loss_fn

    def units(self, fields: Fields) -> torch.Tensor:
        return (fields["labels"] != IGNORE_INDEX).sum()

    def units_bound(self, fields: Fields) -> int:
        return fields["labels"].numel()

    def loss(self, output: torch.Tensor, fields: Fields) -> tuple[torch.Tensor, None]:
        return self.loss_fn(output, fields["labels"]), None


PRETRAIN = TokenObjective()
