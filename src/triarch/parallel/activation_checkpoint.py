"""Activation checkpointing applied to each transformer block from outside the model.

- ``full``: recompute the whole block in backward.
- ``selective``: keep the outputs of matmuls and attention (the expensive ops), recompute the cheap
  element-wise ones (norms, activations, rotary), trading a little compute for most of the memory.
  Document attention (``models.document_attention``) is kept too: on CPU its per-document SDPA calls are
  the listed CPU flash op (O(seq) outputs in all); on CUDA FlexAttention is the ``flex_attention``
  higher-order op when the block is compiled, and the ``inductor_compiled_code`` op around the separately
  compiled FlexAttention when it is not.
"""

from __future__ import annotations

import torch
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

from triarch.models.llama import Llama

_SAVED_OPS = {
    torch.ops.aten.mm.default,
    torch.ops.aten.addmm.default,
    torch.ops.aten.bmm.default,
    torch.ops.aten._scaled_dot_product_efficient_attention.default,
    torch.ops.aten._scaled_dot_product_flash_attention.default,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,
    torch._higher_order_ops.flex_attention,
    torch._higher_order_ops.inductor_compiled_code,
}


def _selective_policy(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in _SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def _selective_context():
    return create_selective_checkpoint_contexts(_selective_policy)


def apply_activation_checkpointing(model: Llama, mode: str) -> None:
    """Wrap every block of ``model`` for ``mode`` in {"none", "full", "selective"} (in place)."""
    if mode == "none":
        return
    for key, block in list(model.layers.items()):
        if mode == "full":
            wrapped = checkpoint_wrapper(block, preserve_rng_state=False)
        else:
            wrapped = checkpoint_wrapper(block, preserve_rng_state=False, context_fn=_selective_context)
        model.layers[key] = wrapped
