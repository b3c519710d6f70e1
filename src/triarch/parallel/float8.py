"""FP8 matmuls on the native engine (``train.precision=fp8``) through torchao's float8 training.

The linear layers of the transformer blocks (attention q/k/v/o, MLP w1/w2/w3) become torchao ``Float8Linear``:
each matmul of the forward and of both backward products casts its operands to float8 with a scale computed
from the current tensor (``tensorwise``: one scale per tensor; ``rowwise``: one per row, power-of-two scales)
and runs ``torch._scaled_mm``. Weights, gradients and optimizer state keep their dtypes and names, so a fp8
checkpoint is an ordinary checkpoint (it resumes in bf16 or fp32 and the reverse). Embeddings, norms and the
vocabulary / score heads stay in bf16, as is usual: the head's logits are the most sensitive to rounding.

Conversion happens on the meta-device chunk before tensor parallelism and FSDP wrap it; with TP the weight is
a DTensor and the tensorwise scale is the amax of the full tensor (an all-reduce over the TP group), so every
layout computes the same scales. A linear whose dimensions are not multiples of 16 (``_scaled_mm``'s rule)
stays in bf16. Delayed scaling and MXFP8 are recipes of Transformer Engine (``engine: megatron``).
"""

from __future__ import annotations

import contextlib
import logging

from torch import nn

from triarch.models.llama import Llama

NATIVE_RECIPES = ("tensorwise", "rowwise")  # torchao's recipe names; the others are Transformer Engine's
FP8_ALIGNMENT = 16


@contextlib.contextmanager
def _quiet_torchao_import():
    """torchao's import logs a warning per CUDA kernel library it cannot load on a CPU-only machine (none is used
    here) and torch one about how torchao registers an enum with pytree: neither is the user's concern."""
    loggers = [logging.getLogger(name) for name in ("torchao", "torch.utils._pytree")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def _fits_fp8(module: nn.Module) -> bool:
    return (isinstance(module, nn.Linear) and module.in_features % FP8_ALIGNMENT == 0
            and module.out_features % FP8_ALIGNMENT == 0)


def apply_float8(chunk: Llama, recipe: str) -> list[str]:
    """Convert the block linears of ``chunk`` (on the meta device, before TP / FSDP) to float8 training with
    torchao ``recipe``; returns the converted modules' names (relative to ``chunk``)."""
    if recipe not in NATIVE_RECIPES:
        raise ValueError(f"fp8 recipe '{recipe}' is not one of the native engine's {', '.join(NATIVE_RECIPES)}")
    with _quiet_torchao_import():
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    config = Float8LinearConfig.from_recipe_name(recipe)
    converted: list[str] = []
    for key, block in chunk.layers.items():
        names = [name for name, module in block.named_modules() if _fits_fp8(module)]
        convert_to_float8_training(block, config=config, module_filter_fn=lambda module, fqn: _fits_fp8(module))
        converted += [f"layers.{key}.{name}" for name in names]
    return converted
