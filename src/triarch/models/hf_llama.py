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
SCORE = "score.weight"  # the scalar head's name on both sides
_SEQUENCE_CLASSIFICATION = "LlamaForSequenceClassification"
_LAYER_RE = re.compile(r"^layers\.(\d+)\.(.+)$")
# Rotary frequencies some older HF checkpoints saved; both sides recompute them.
_HF_IGNORED_RE = re.compile(r"(^|\.)rotary_emb\.inv_freq$")


def _name_map(n_layers: int, with_head: bool) -> dict[str, str]:
    """Every expected triarch name -> its HF name."""
    names = {k: v for k, v in _TOP_NAMES.items() if with_head or k != "output.weight"}
    for i in range(n_layers):
        names.update({f"layers.{i}.{k}": f"model.layers.{i}.{v}" for k, v in _LAYER_NAMES.items()})
    return names


def hf_names(n_layers: int, *, with_head: bool = True) -> dict[str, str]:
    """Every triarch parameter name of a Llama with ``n_layers`` layers -> its HF name (``with_head``:
    include ``output.weight`` -> ``lm_head.weight``). The score head keeps its name (:data:`SCORE`)."""
    return _name_map(n_layers, with_head)


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
    layer_ids = [int(m.group(1)) for k in sd if (m := _LAYER_RE.match(k))]
    n_layers = max(layer_ids) + 1 if layer_ids else 0
    sd = dict(sd)
    if SCORE in sd:  # a reward model: the trunk and its scalar head, no LM head
        score = sd.pop(SCORE)
        return {**_convert(sd, _name_map(n_layers, with_head=False), "triarch"), SCORE: score}
    if tie_embeddings is None:
        head, emb = sd.get("output.weight"), sd.get("tok_embeddings.weight")
        tie_embeddings = head is None or _shares_storage(head, emb)
    if tie_embeddings:
        sd.pop("output.weight", None)
    return _convert(sd, _name_map(n_layers, with_head=not tie_embeddings), "triarch")


def from_hf_state_dict(sd: dict[str, Tensor], n_layers: int) -> dict[str, Tensor]:
    """HF ``LlamaForCausalLM`` state dict -> triarch ``Llama`` names (tensors shared, not copied).

    Without ``lm_head.weight`` (tied embeddings) ``output.weight`` is the embedding tensor itself, so
    ``Llama(tie_embeddings=True).load_state_dict(..., strict=True)`` works.
    """
    sd = {k: v for k, v in sd.items() if not ignored_hf_tensor(k)}
    if SCORE in sd:  # LlamaForSequenceClassification: no LM head, tied or not
        score = sd.pop(SCORE)
        trunk = {v: k for k, v in _name_map(n_layers, with_head=False).items()}
        return {**_convert(sd, trunk, "HF"), SCORE: score}
    tied = "lm_head.weight" not in sd
    to_hf = _name_map(n_layers, with_head=not tied)
    out = _convert(sd, {v: k for k, v in to_hf.items()}, "HF")
    if tied:
        out["output.weight"] = out["tok_embeddings.weight"]
    return out


def hf_config_dict(args: LlamaArgs, dtype: str = "float32", pad_token_id: int | None = None) -> dict:
    """A ``LlamaConfig``-compatible dict (the ``config.json`` of an exported model).

    A reward model (``args.head == "score"``) is a ``LlamaForSequenceClassification`` with one label, whose
    ``pad_token_id`` tells transformers where each sequence ends: it scores the rightmost token that is not
    ``pad_token_id``.
    """
    extra: dict = {}
    if args.head == "score":
        extra = {"id2label": {"0": "LABEL_0"}, "label2id": {"LABEL_0": 0}, "num_labels": 1,
                 "pad_token_id": pad_token_id}
    elif pad_token_id is not None:
        extra = {"pad_token_id": pad_token_id}
    return {
        "architectures": [_SEQUENCE_CLASSIFICATION if args.head == "score" else "LlamaForCausalLM"],
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
        **extra,
    }


# Accepted ``model_type`` values -> the defaults their transformers config class gives the optional fields
# triarch reads (what a config.json written with ``use_diff`` may leave out). Mistral is Llama's
# architecture plus a sliding attention window, accepted when that window never shortens attention.
_FAMILY_DEFAULTS: dict[str, dict[str, object]] = {
    "llama": {"num_key_value_heads": None, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
              "sliding_window": None},
    "mistral": {"num_key_value_heads": 8, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
                "sliding_window": 4096},
}
# Why some near-Llama families are refused (named in the error).
_REFUSED_FAMILIES = {
    "qwen2": "its q/k/v projections have biases",
    "qwen3": "it normalises queries and keys (q_norm, k_norm)",
    "gemma": "it scales embeddings and uses (1 + weight) RMSNorm and GELU",
    "gpt2": "it has learned positions, LayerNorm, GELU and fused attention",
}
_REQUIRED_INTS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size",
                  "max_position_embeddings")


def _model_type(cfg: dict) -> str:
    """The config's ``model_type`` when it is one triarch imports."""
    if "model_type" not in cfg:
        raise ValueError("missing required field 'model_type' (triarch imports llama and mistral)")
    kind = cfg["model_type"]
    if kind not in _FAMILY_DEFAULTS:
        why = _REFUSED_FAMILIES.get(kind, "it is not a Llama-architecture model")
        raise ValueError(f"model_type {kind!r} is not supported: {why} "
                         f"(triarch imports {' and '.join(map(repr, _FAMILY_DEFAULTS))})")
    return kind


def _positive_int(cfg: dict, field: str) -> int:
    """A required positive-integer field."""
    if field not in cfg:
        raise ValueError(f"missing required field {field!r}")
    value = cfg[field]
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{field} must be a positive integer, not {value!r}")
    return value


def _positive_float(cfg: dict, field: str, default: float) -> float:
    """An optional positive number."""
    value = cfg.get(field, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        raise ValueError(f"{field} must be a positive number, not {value!r}")
    return float(value)


def _rope(cfg: dict) -> float:
    """Rotary theta from the transformers 5 ``rope_parameters`` or the older keys; only default rope."""
    params = cfg.get("rope_parameters")
    if isinstance(params, dict):
        source, scaling = "rope_parameters", params
        theta = params.get("rope_theta", cfg.get("rope_theta", 10000.0))
    else:
        source, scaling = "rope_scaling", cfg.get("rope_scaling") or {}
        theta = cfg.get("rope_theta", 10000.0)
    if not isinstance(scaling, dict):
        raise ValueError(f"{source} must be an object or null, not {scaling!r}")
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind not in ("default", "none"):
        raise ValueError(f"unsupported rope_scaling type {kind!r} in {source} (triarch implements only "
                         f"default rotary embeddings)")
    return _positive_float({"rope_theta": theta}, "rope_theta", 10000.0)


def _check_features(cfg: dict, defaults: dict) -> None:
    """Refuse, by field name, what triarch's Llama does not implement."""
    for field in ("attention_bias", "mlp_bias"):
        if cfg.get(field, False):
            raise ValueError(f"unsupported {field}={cfg[field]!r} (triarch's Llama has no biases)")
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"unsupported hidden_act={act!r} (only 'silu')")
    window = cfg.get("sliding_window", defaults["sliding_window"])
    longest = cfg["max_position_embeddings"]
    if window is not None and (not isinstance(window, int) or window < longest):
        raise ValueError(f"unsupported sliding_window={window!r}: shorter than max_position_embeddings "
                         f"({longest}); triarch attends over the whole sequence")
    tie = cfg.get("tie_word_embeddings", defaults["tie_word_embeddings"])
    if not isinstance(tie, bool):
        raise ValueError(f"tie_word_embeddings must be true or false, not {tie!r}")


def _heads(cfg: dict, defaults: dict) -> tuple[int, int]:
    """(query heads, key/value heads), checked against hidden_size and head_dim."""
    dim, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    kv = cfg.get("num_key_value_heads", defaults["num_key_value_heads"]) or heads
    if isinstance(kv, bool) or not isinstance(kv, int) or kv <= 0 or heads % kv:
        raise ValueError(f"num_key_value_heads ({kv!r}) must be a positive divisor of "
                         f"num_attention_heads ({heads})")
    head_dim = cfg.get("head_dim") or dim // heads
    if dim % heads or head_dim != dim // heads:
        raise ValueError(f"unsupported head_dim ({head_dim}): must equal hidden_size ({dim}) / "
                         f"num_attention_heads ({heads})")
    if head_dim % 2:
        raise ValueError(f"head_dim ({head_dim}) must be even for rotary embeddings")
    return heads, kv


def _head(cfg: dict) -> str:
    """``"score"`` for a one-label ``*ForSequenceClassification`` (a reward model), else ``"lm"``."""
    architectures = cfg.get("architectures") or []
    if not any(isinstance(a, str) and a.endswith("ForSequenceClassification") for a in architectures):
        return "lm"
    labels = cfg.get("num_labels", len(cfg.get("id2label") or {}) or 2)  # transformers' default is 2 labels
    if labels != 1:
        raise ValueError(f"num_labels is {labels}: triarch's score head has one output (a reward or value); "
                         f"only a one-label sequence classifier imports")
    return "score"


def args_from_hf_config(cfg: dict) -> LlamaArgs:
    """:class:`LlamaArgs` from a HF Llama (or window-free Mistral) config dict; a one-label
    ``LlamaForSequenceClassification`` gives ``head="score"``.

    Anything missing, malformed or not implemented is a one-line ``ValueError`` naming the field.
    """
    defaults = _FAMILY_DEFAULTS[_model_type(cfg)]
    ints = {field: _positive_int(cfg, field) for field in _REQUIRED_INTS}
    _check_features(cfg, defaults)
    heads, kv = _heads(cfg, defaults)
    return LlamaArgs(
        vocab_size=ints["vocab_size"],
        dim=ints["hidden_size"],
        n_layers=ints["num_hidden_layers"],
        n_heads=heads,
        n_kv_heads=kv,
        ffn_hidden=ints["intermediate_size"],
        max_seq_len=ints["max_position_embeddings"],
        rope_theta=_rope(cfg),
        norm_eps=_positive_float(cfg, "rms_norm_eps", defaults["rms_norm_eps"]),
        tie_embeddings=cfg.get("tie_word_embeddings", defaults["tie_word_embeddings"]),
        head=_head(cfg),
    )


def ignored_hf_tensor(name: str) -> bool:
    """Whether an HF tensor is one both sides recompute (rotary inverse frequencies)."""
    return bool(_HF_IGNORED_RE.search(name))


def hf_tensor_shapes(args: LlamaArgs) -> dict[str, tuple[int, ...]]:
    """Every HF tensor name of an untied model of this shape -> its shape (a reward model: ``score.weight``
    instead of ``lm_head.weight``)."""
    dim, q, kv, ffn = args.dim, args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim, args.ffn_hidden
    layer = {"self_attn.q_proj.weight": (q, dim), "self_attn.k_proj.weight": (kv, dim),
             "self_attn.v_proj.weight": (kv, dim), "self_attn.o_proj.weight": (dim, q),
             "mlp.gate_proj.weight": (ffn, dim), "mlp.up_proj.weight": (ffn, dim), "mlp.down_proj.weight": (dim, ffn),
             "input_layernorm.weight": (dim,), "post_attention_layernorm.weight": (dim,)}
    shapes = {"model.embed_tokens.weight": (args.vocab_size, dim), "model.norm.weight": (dim,)}
    if args.head == "score":
        shapes[SCORE] = (1, dim)
    else:
        shapes["lm_head.weight"] = (args.vocab_size, dim)
    for i in range(args.n_layers):
        shapes.update({f"model.layers.{i}.{k}": v for k, v in layer.items()})
    return shapes
