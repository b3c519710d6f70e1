"""Conversion between triarch's :class:`Llama` and Hugging Face ``LlamaForCausalLM``: weights and config.

Both sides use the half-split (``rotate_half``) rotary convention, so q/k projections map without any
permutation; every tensor is renamed, never reshaped. Tied embeddings: the HF side has no
``lm_head.weight`` (it is dropped on export and, when absent, restored from the embedding on import).
"""

from __future__ import annotations

import re

from torch import Tensor

from triarch.models.llama import LlamaArgs

# triarch suffix within ``layers.{i}.`` -> HF suffix within ``model.layers.{i}.``
_LAYER_NAMES = {
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
_TOP_NAMES = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_RE = re.compile(r"^layers\.(\d+)\.(.+)$")
# Rotary frequencies some older HF checkpoints saved; both sides recompute them.
_HF_IGNORED_RE = re.compile(r"(^|\.)rotary_emb\.inv_freq$")


def _name_map(n_layers: int, with_head: bool) -> dict[str, str]:
    """Every expected triarch name -> its HF name."""
    names = {k: v for k, v in _TOP_NAMES.items() if with_head or k != "output.weight"}
    for i in range(n_layers):
        names.update({f"layers.{i}.{k}": f"model.layers.{i}.{v}" for k, v in _LAYER_NAMES.items()})
    return names


def _convert(sd: dict[str, Tensor], names: dict[str, str], side: str) -> dict[str, Tensor]:
    for key in sd:
        if key not in names:
            raise ValueError(f"unknown {side} tensor name: {key!r}")
    for key in names:
        if key not in sd:
            raise ValueError(f"missing {side} tensor: {key!r}")
    return {names[k]: sd[k] for k in names}


def _shares_storage(a: Tensor | None, b: Tensor | None) -> bool:
    if a is None or b is None or a.shape != b.shape or a.is_meta:  # meta tensors all have data_ptr 0
        return False
    return a.data_ptr() == b.data_ptr()


def to_hf_state_dict(sd: dict[str, Tensor], *, tie_embeddings: bool | None = None) -> dict[str, Tensor]:
    """triarch ``Llama`` state dict -> HF ``LlamaForCausalLM`` names (tensors shared, not copied).

    With tied embeddings no ``lm_head.weight`` is written. ``tie_embeddings=None`` means: tied when
    ``output.weight`` is absent or shares storage with ``tok_embeddings.weight`` (``Llama.state_dict()``
    of a tied model).
    """
    if tie_embeddings is None:
        head, emb = sd.get("output.weight"), sd.get("tok_embeddings.weight")
        tie_embeddings = head is None or _shares_storage(head, emb)
    layer_ids = [int(m.group(1)) for k in sd if (m := _LAYER_RE.match(k))]
    n_layers = max(layer_ids) + 1 if layer_ids else 0
    sd = dict(sd)
    if tie_embeddings:
        sd.pop("output.weight", None)
    return _convert(sd, _name_map(n_layers, with_head=not tie_embeddings), "triarch")


def from_hf_state_dict(sd: dict[str, Tensor], n_layers: int) -> dict[str, Tensor]:
    """HF ``LlamaForCausalLM`` state dict -> triarch ``Llama`` names (tensors shared, not copied).

    Without ``lm_head.weight`` (tied embeddings) ``output.weight`` is the embedding tensor itself, so
    ``Llama(tie_embeddings=True).load_state_dict(..., strict=True)`` works.
    """
    sd = {k: v for k, v in sd.items() if not _HF_IGNORED_RE.search(k)}
    tied = "lm_head.weight" not in sd
    to_hf = _name_map(n_layers, with_head=not tied)
    out = _convert(sd, {v: k for k, v in to_hf.items()}, "HF")
    if tied:
        out["output.weight"] = out["tok_embeddings.weight"]
    return out


def hf_config_dict(args: LlamaArgs, dtype: str = "float32") -> dict:
    """A ``LlamaConfig``-compatible dict (the ``config.json`` of an exported model)."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": args.dim,
        "intermediate_size": args.ffn_hidden,
        "num_hidden_layers": args.n_layers,
        "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.n_kv_heads,
        "head_dim": args.head_dim,
        "vocab_size": args.vocab_size,
        "max_position_embeddings": args.max_seq_len,
        "rope_theta": args.rope_theta,
        "rope_scaling": None,
        "rms_norm_eps": args.norm_eps,
        "tie_word_embeddings": args.tie_embeddings,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "torch_dtype": dtype,
    }


def _rope(cfg: dict) -> tuple[float, str]:
    """(theta, rope type) from either the transformers 5 ``rope_parameters`` or the older keys."""
    params = cfg.get("rope_parameters")
    if isinstance(params, dict):
        theta = params.get("rope_theta", cfg.get("rope_theta", 10000.0))
        return float(theta), str(params.get("rope_type", params.get("type", "default")))
    scaling = cfg.get("rope_scaling") or {}
    return float(cfg.get("rope_theta", 10000.0)), str(scaling.get("rope_type", scaling.get("type", "default")))


def args_from_hf_config(cfg: dict) -> LlamaArgs:
    """:class:`LlamaArgs` from a HF Llama config dict; a one-line ``ValueError`` for what triarch lacks."""
    for field in ("attention_bias", "mlp_bias"):
        if cfg.get(field, False):
            raise ValueError(f"unsupported HF config: {field}={cfg[field]!r} (triarch Llama has no biases)")
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"unsupported HF config: hidden_act={act!r} (only 'silu')")
    theta, rope_type = _rope(cfg)
    if rope_type not in ("default", "none"):
        raise ValueError(f"unsupported HF config: rope_scaling type {rope_type!r} (only default)")
    dim, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or dim // heads
    if dim % heads or head_dim != dim // heads:
        raise ValueError(
            f"unsupported HF config: head_dim ({head_dim}) must equal "
            f"hidden_size ({dim}) / num_attention_heads ({heads})"
        )
    return LlamaArgs(
        vocab_size=cfg["vocab_size"],
        dim=dim,
        n_layers=cfg["num_hidden_layers"],
        n_heads=heads,
        n_kv_heads=cfg.get("num_key_value_heads") or heads,
        ffn_hidden=cfg["intermediate_size"],
        max_seq_len=cfg.get("max_position_embeddings", 2048),
        rope_theta=theta,
        norm_eps=cfg.get("rms_norm_eps", 1e-6),
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
    )
