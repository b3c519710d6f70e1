"""What every engine needs around an objective: per-row forward values (``RowCollector``), the token objective of
a loss function, and a loss as a plain tensor."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.distributed.tensor import DTensor

from triarch.objectives.base import PRETRAIN, Fields, Objective, TokenObjective
from triarch.objectives.token_loss import TokenLossFn, cross_entropy_sum

RowFn = Callable[[torch.Tensor, Fields], torch.Tensor]


class RowCollector:
    """An objective with no loss that writes ``row_fn``'s per-row values into ``out`` at ``fields["row_index"]``
    (an engine's ``forward_rows``)."""

    rows_per_example = 1
    stat_names: tuple[str, ...] = ()

    def __init__(self, row_fn: RowFn, out: torch.Tensor) -> None:
        self.row_fn, self.out = row_fn, out

    def units(self, fields: Fields) -> torch.Tensor:
        return torch.zeros((), dtype=torch.int64, device=self.out.device)

    def units_bound(self, fields: Fields) -> int:
        return 1

    def loss(self, output: torch.Tensor, fields: Fields) -> tuple[torch.Tensor, None]:
        values = local_value(self.row_fn(output, fields))
        self.out.index_copy_(0, fields["row_index"], values.detach().double())
        return torch.zeros((), dtype=torch.float32, device=self.out.device), None


def token_objective(loss_fn: TokenLossFn) -> Objective:
    """The objective of a token loss function (pretraining's for the default cross entropy)."""
    return PRETRAIN if loss_fn is cross_entropy_sum else TokenObjective(loss_fn)


def local_value(value: torch.Tensor) -> torch.Tensor:
    """A loss as a plain device tensor (a DTensor loss from the vocabulary-parallel loss is gathered)."""
    return value.full_tensor() if isinstance(value, DTensor) else value
