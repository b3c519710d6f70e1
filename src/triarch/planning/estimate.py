"""The predicted peak memory of one rank of any layout: the native engine's model (``planning.memory``) or,
for a deepspeed-engine layout (``layout.zero_stage`` set), ZeRO's (``planning.zero``)."""

from __future__ import annotations

from triarch.config import TriarchConfig
from triarch.planning.memory import Layout, MemoryEstimate, estimate_native_memory
from triarch.planning.zero import estimate_zero_memory


def estimate_memory(cfg: TriarchConfig, layout: Layout, head: str = "lm", pp_rank: int | None = None
                    ) -> MemoryEstimate:
    """The predicted peak of ``layout``'s most loaded rank (of pipeline stage ``pp_rank`` when given)."""
    if layout.zero_stage:
        return estimate_zero_memory(cfg, layout, head)
    return estimate_native_memory(cfg, layout, head, pp_rank)
