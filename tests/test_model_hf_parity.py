"""Numerical parity of triarch's Llama with Hugging Face LlamaForCausalLM, through the weight converter."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from triarch.models.hf_llama import (  # noqa: E402
    args_from_hf_config,
    from_hf_state_dict,
    hf_config_dict,
    to_hf_state_dict,
)
from triarch.models.llama import Llama, LlamaArgs  # noqa: E402

LOGIT_ATOL = 1e-5
SEQ_LEN = 24


def _hf_config(tie: bool = False) -> transformers.LlamaConfig:
    return transformers.LlamaConfig(
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        max_position_embeddings=64,
        rope_theta=500000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=tie,
        attn_implementation="eager",
    )


def _hf_model(config: transformers.LlamaConfig) -> torch.nn.Module:
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).float().eval()
    with torch.no_grad():  # HF initialises norms to 1; randomise them so a swapped norm would show
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return model


def _tokens(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (2, SEQ_LEN), generator=torch.Generator().manual_seed(1))


def _max_diff(triarch_model: Llama, hf_model: torch.nn.Module) -> float:
    tokens = _tokens(triarch_model.args.vocab_size)
    with torch.no_grad():
        ours = triarch_model(tokens)
        theirs = hf_model(input_ids=tokens).logits
    assert ours.shape == theirs.shape
    return (ours - theirs).abs().max().item()


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_hf_to_triarch_logits_match(tie: bool) -> None:
    hf = _hf_model(_hf_config(tie))
    args = args_from_hf_config(hf.config.to_dict())
    assert args.tie_embeddings is tie and args.rope_theta == 500000.0 and args.n_kv_heads == 2
    hf_sd = hf.state_dict()
    if tie:
        hf_sd.pop("lm_head.weight", None)  # how tied checkpoints are saved
    model = Llama(args).eval()
    model.load_state_dict(from_hf_state_dict(hf_sd, args.n_layers), strict=True)
    if tie:
        assert model.output.weight is model.tok_embeddings.weight
    assert _max_diff(model, hf) <= LOGIT_ATOL


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_triarch_to_hf_logits_match(tie: bool) -> None:
    args = LlamaArgs(vocab_size=128, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=160,
                     max_seq_len=64, rope_theta=10000.0, norm_eps=1e-5, tie_embeddings=tie)
    torch.manual_seed(2)
    model = Llama(args).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.1)
    config = transformers.LlamaConfig(**hf_config_dict(args), attn_implementation="eager")
    hf = transformers.LlamaForCausalLM(config).float().eval()
    hf_sd = to_hf_state_dict(model.state_dict())
    assert ("lm_head.weight" in hf_sd) is not tie
    missing, unexpected = hf.load_state_dict(hf_sd, strict=False)
    assert not unexpected
    assert missing == (["lm_head.weight"] if tie else [])
    if tie:
        assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()
    assert _max_diff(model, hf) <= LOGIT_ATOL


def test_round_trip_is_exact() -> None:
    args = args_from_hf_config(_hf_config().to_dict())
    model = Llama(args)
    sd = model.state_dict()
    back = from_hf_state_dict(to_hf_state_dict(sd), args.n_layers)
    assert back.keys() == sd.keys()
    for name, tensor in sd.items():
        assert torch.equal(back[name], tensor), name
    assert args_from_hf_config(hf_config_dict(args)) == args


def test_config_dict_loads_in_transformers() -> None:
    args = LlamaArgs(vocab_size=128, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=160,
                     max_seq_len=64, rope_theta=123.0, norm_eps=1e-6, tie_embeddings=True)
    config = transformers.LlamaConfig(**hf_config_dict(args))
    assert args_from_hf_config(config.to_dict()) == args


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"attention_bias": True}, "attention_bias"),
        ({"mlp_bias": True}, "mlp_bias"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "rope_scaling"),
        ({"rope_parameters": {"rope_type": "linear", "rope_theta": 1e4, "factor": 2.0}}, "rope_scaling"),
        ({"head_dim": 32}, "head_dim"),
    ],
)
def test_unsupported_config_names_field(change: dict, field: str) -> None:
    cfg = {**_hf_config().to_dict(), **change}
    if "rope_scaling" in change:
        cfg.pop("rope_parameters")
    with pytest.raises(ValueError, match=field) as info:
        args_from_hf_config(cfg)
    assert "\n" not in str(info.value)


def test_unknown_and_missing_tensors_are_named() -> None:
    args = args_from_hf_config(_hf_config().to_dict())
    hf_sd = to_hf_state_dict(Llama(args).state_dict())
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.q_norm\.weight"):
        from_hf_state_dict({**hf_sd, "model.layers.0.self_attn.q_norm.weight": torch.ones(16)}, args.n_layers)
    without_down = {k: v for k, v in hf_sd.items() if k != "model.layers.1.mlp.down_proj.weight"}
    with pytest.raises(ValueError, match=r"missing HF tensor: 'model\.layers\.1\.mlp\.down_proj\.weight'"):
        from_hf_state_dict(without_down, args.n_layers)
    with pytest.raises(ValueError, match=r"unknown HF tensor name: 'model\.layers\.1\."):
        from_hf_state_dict(hf_sd, n_layers=1)
    with pytest.raises(ValueError, match=r"unknown triarch tensor name: 'layers\.0\.attention\.wq\.bias'"):
        to_hf_state_dict({**Llama(args).state_dict(), "layers.0.attention.wq.bias": torch.zeros(64)})
    ignored = {**hf_sd, "model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(8)}
    assert from_hf_state_dict(ignored, args.n_layers).keys() == Llama(args).state_dict().keys()
