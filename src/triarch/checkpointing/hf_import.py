"""``triarch ckpt import --hf``: a Hugging Face Llama folder -> a new run directory (committed step 0).

The folder is checked before anything is written: ``config.json`` (family, required fields, features
triarch lacks), the safetensors headers (truncation, names, shapes) and the tied-embedding rule.
"""

from __future__ import annotations

from pathlib import Path

import torch

from triarch.checkpointing.commit import CheckpointError
from triarch.checkpointing.hf_folder import (
    CONFIG_FILE,
    HFWeights,
    hf_weights,
    load_tensors,
    read_hf_config,
)
from triarch.checkpointing.offline import write_model_checkpoint
from triarch.config import ConfigError, TriarchConfig, config_from_dict, dump_config
from triarch.models.hf_llama import args_from_hf_config, from_hf_state_dict, hf_tensor_shapes, ignored_hf_tensor
from triarch.models.llama import LlamaArgs

HEAD = "lm_head.weight"
EMBEDDING = "model.embed_tokens.weight"


def _checked_names(weights: HFWeights, args: LlamaArgs, config_path: Path) -> list[str]:
    """The HF tensors to load, after checking every name and shape in the headers against the config."""
    expected = hf_tensor_shapes(args)
    for name, entry in weights.entries.items():
        if ignored_hf_tensor(name):
            continue
        if name not in expected:
            raise CheckpointError(f"{entry.file}: unexpected tensor {name} (the Llama that {config_path} "
                                  f"describes has num_hidden_layers={args.n_layers} and no biases)")
        if entry.shape != expected[name]:
            raise CheckpointError(f"{entry.file}: tensor {name} has shape {entry.shape}, {config_path} implies "
                                  f"{expected[name]}")
    for name in expected:
        if name not in weights.entries and name != HEAD:
            raise CheckpointError(f"{weights.source}: missing tensor {name}")
    if HEAD not in weights.entries and not args.tie_embeddings:
        raise CheckpointError(f"{weights.source}: missing tensor {HEAD} ({config_path} has tie_word_embeddings "
                              f"false, so the output projection is its own tensor)")
    return [name for name in expected if name in weights.entries]


def _triarch_tensors(weights: HFWeights, names: list[str], args: LlamaArgs, config_path: Path
                     ) -> dict[str, torch.Tensor]:
    """The weights under triarch's names, float32; a tied model's head must equal its embedding."""
    hf = load_tensors(weights, names)
    if args.tie_embeddings and HEAD in hf:
        head = hf.pop(HEAD)
        if not torch.equal(head, hf[EMBEDDING]):
            raise CheckpointError(f"{weights.entries[HEAD].file}: tensor {HEAD} differs from {EMBEDDING}, but "
                                  f"{config_path} has tie_word_embeddings true")
    tensors = from_hf_state_dict(hf, args.n_layers)
    if args.tie_embeddings:
        tensors.pop("output.weight")
    return tensors


def _run_config(args: LlamaArgs, run_dir: Path, config_path: Path) -> TriarchConfig:
    """The run config of the imported model (training settings at their defaults)."""
    model = {"vocab_size": args.vocab_size, "dim": args.dim, "n_layers": args.n_layers, "n_heads": args.n_heads,
             "n_kv_heads": args.n_kv_heads, "ffn_hidden": args.ffn_hidden, "max_seq_len": args.max_seq_len,
             "seq_len": min(args.max_seq_len, 2048), "rope_theta": args.rope_theta, "norm_eps": args.norm_eps,
             "tie_embeddings": args.tie_embeddings}
    try:
        return config_from_dict({"name": run_dir.resolve().name, "model": model})
    except ConfigError as err:
        raise CheckpointError(f"{config_path}: {err}") from None


def _write_run(run_dir: Path, tensors: dict[str, torch.Tensor], cfg: TriarchConfig, source: Path) -> Path:
    """Committed step 0, then ``config.yaml``."""
    step_dir = run_dir / "checkpoints" / "step_0"
    write_model_checkpoint(step_dir, tensors, {"step": 0, "config": cfg.model_dump(mode="json"),
                                               "layout": "imported", "source": str(source)})
    dump_config(cfg, run_dir / "config.yaml")
    return step_dir


def import_hf(hf_dir: Path, run_dir: Path) -> Path:
    """Write a committed step-0 checkpoint and a matching ``config.yaml`` into ``run_dir``."""
    config_path = hf_dir / CONFIG_FILE
    try:
        args = args_from_hf_config(read_hf_config(hf_dir))
    except ValueError as err:
        raise CheckpointError(f"{config_path}: {err}") from None
    weights = hf_weights(hf_dir)
    names = _checked_names(weights, args, config_path)
    cfg = _run_config(args, run_dir, config_path)
    tensors = _triarch_tensors(weights, names, args, config_path)
    run_dir.mkdir(parents=True, exist_ok=True)
    return _write_run(run_dir, tensors, cfg, hf_dir)
