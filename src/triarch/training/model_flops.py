"""Model FLOPs and parameter counts of the Llama-family model, from its config alone (no torch: the planner
uses them too). MFU's formula is in ``training.mfu``."""

from __future__ import annotations

from typing import Any


def parameter_count(model_cfg: Any) -> int:
    """Exact parameter count of the Llama-family model described by ``model_cfg``.

    Accepts :class:`triarch.config.ModelConfig` or anything with the same fields (``LlamaArgs`` too).
    Tied embeddings are counted once.
    """
    vocab, dim, ffn = model_cfg.vocab_size, model_cfg.dim, model_cfg.ffn_hidden
    kv_heads = getattr(model_cfg, "kv_heads", None) or model_cfg.n_kv_heads or model_cfg.n_heads
    head_dim = dim // model_cfg.n_heads
    attention = 2 * dim * dim + 2 * dim * kv_heads * head_dim  # wq, wo + wk, wv
    mlp = 3 * dim * ffn  # w1, w3, w2
    norms = 2 * dim
    per_layer = attention + mlp + norms
    embedding = vocab * dim
    output = 0 if model_cfg.tie_embeddings else vocab * dim
    return embedding + model_cfg.n_layers * per_layer + dim + output


def matmul_parameter_count(model_cfg: Any) -> int:
    """Parameters that take part in matmuls: all but the input embedding, which is a lookup. A tied embedding
    is the output projection too, so it stays, counted once."""
    embedding = 0 if model_cfg.tie_embeddings else model_cfg.vocab_size * model_cfg.dim
    return parameter_count(model_cfg) - embedding


def flops_per_token(model_cfg: Any, n_params: int | None = None) -> float:
    """Training FLOPs per token: 6*N + 12*L*d*T (forward + backward, attention included), N from
    :func:`matmul_parameter_count` unless ``n_params`` gives it."""
    n = matmul_parameter_count(model_cfg) if n_params is None else n_params
    return float(6 * n + 12 * model_cfg.n_layers * model_cfg.dim * model_cfg.seq_len)


def recompute_flops_per_token(model_cfg: Any, activation_checkpoint: str) -> float:
    """FLOPs per token that activation checkpointing adds by recomputing: ``full`` reruns each block's forward
    (its matmuls, 2 per block parameter, and attention, 4·L·d·T); ``selective`` recomputes only element-wise
    ops (norms, activations, rotary), which model FLOPs do not count; ``none`` nothing."""
    if activation_checkpoint != "full":
        return 0.0
    block_params = matmul_parameter_count(model_cfg) - _head_parameters(model_cfg) - model_cfg.dim  # final norm
    return float(2 * block_params + 4 * model_cfg.n_layers * model_cfg.dim * model_cfg.seq_len)


def _head_parameters(model_cfg: Any) -> int:
    return model_cfg.vocab_size * model_cfg.dim  # the output projection (the tied embedding when tied)
