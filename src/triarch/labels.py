"""Label conventions shared by the data layer, the losses and the engines (below all of them).

``IGNORE_INDEX``: a label position with this value is not predicted and not counted (prompt tokens,
padding, loss masks); it is PyTorch's ``cross_entropy`` default ``ignore_index``.
"""

from __future__ import annotations

IGNORE_INDEX = -100
