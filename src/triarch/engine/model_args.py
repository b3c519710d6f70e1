"""The model's shape from the config: the same ``LlamaArgs`` on every engine (canonical names follow from it)."""

from __future__ import annotations

from triarch.config import TriarchConfig
from triarch.models.llama import LlamaArgs


def llama_args(cfg: TriarchConfig, head: str | None = None) -> LlamaArgs:
    """Model shape from the config; ``head`` ("lm" or "score") defaults to the objective's (a reward model
    scores, everything else predicts tokens)."""
    m = cfg.model
    return LlamaArgs(
        vocab_size=m.vocab_size, dim=m.dim, n_layers=m.n_layers, n_heads=m.n_heads, n_kv_heads=m.kv_heads,
        ffn_hidden=m.ffn_hidden, max_seq_len=m.max_seq_len, rope_theta=m.rope_theta, norm_eps=m.norm_eps,
        tie_embeddings=m.tie_embeddings,
        head=head if head is not None else ("score" if cfg.objective.kind == "rm" else "lm"),
    )
