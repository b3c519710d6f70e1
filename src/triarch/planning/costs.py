"""Cost primitives both step-time models use (FSDP's in ``planning.step_time``, ZeRO's in ``planning.zero``)."""

from __future__ import annotations

OPTIMIZER_BYTES_PER_ELEMENT = 4 * 7  # AdamW reads parameter, gradient, two moments; writes parameter, moments


def ring_seconds(size: float, ranks: int, bandwidth: float) -> float:
    """Seconds of an all-gather or reduce-scatter of ``size`` bytes (the full tensor) over ``ranks``."""
    return 0.0 if ranks == 1 else (ranks - 1) / ranks * size / bandwidth
