"""A step's inputs on the engine's device: the rows, the objective's fields (``labels`` joined in) and the
per-document positions, as the engines that run triarch's own Llama take them."""

from __future__ import annotations

import torch

from triarch.objectives.base import Fields


def inputs_on_device(device: torch.device, inputs: torch.Tensor, labels: torch.Tensor | None, fields: Fields | None,
                     position_ids: torch.Tensor | None) -> tuple[torch.Tensor, Fields, torch.Tensor | None]:
    """``inputs``, ``fields`` (with ``labels`` as ``fields["labels"]`` when given) and ``position_ids`` on
    ``device``; ``fields`` is copied, never changed."""
    fields = dict(fields) if fields is not None else {}
    if labels is not None:
        fields["labels"] = labels
    fields = {name: value.to(device) for name, value in fields.items()}
    return inputs.to(device), fields, position_ids.to(device) if position_ids is not None else None
