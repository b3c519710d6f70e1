"""``triarch ckpt import --hf``: a Hugging Face Llama folder -> a new run directory (committed step 0).

A one-label ``LlamaForSequenceClassification`` folder imports as a reward model (``objective.kind: rm``,
``score.weight``).

The folder is checked before anything is written: ``config.json`` (family, required fields, features
triarch lacks), the safetensors headers (truncation, names, shapes) and the tied-embedding rule. The run
directory must be new or empty (a lock file left by an earlier run aside) and not held by a live run:
importing over a run would replace its ``config.yaml`` while resume kept loading its own checkpoints.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import torch

from triarch.checkpointing.commit import CheckpointError
from triarch.checkpointing.hf_folder import (
    CONFIG_FILE,
    HFWeights,
    folder_entries,
    hf_weights,
    listing,
    load_tensors,
    read_hf_config,
)
from triarch.checkpointing.offline import write_model_checkpoint
from triarch.config import ConfigError, TriarchConfig, config_from_dict, dump_config
from triarch.launcher.run_lock import LOCK_NAME, RunDirBusy, lock_holder, run_dir_lock
from triarch.models.hf_llama import args_from_hf_config, from_hf_state_dict, hf_tensor_shapes, ignored_hf_tensor
from triarch.models.llama import LlamaArgs

HEAD = "lm_head.weight"
EMBEDDING = "model.embed_tokens.weight"


def _require_empty(run_dir: Path) -> None:
    """Refuse a run directory holding anything but a lock file (strictly: unrelated files count too)."""
    entries = folder_entries(run_dir, ignore=(LOCK_NAME,))
    if entries:
        raise CheckpointError(
            f"run directory {run_dir} is not empty (holds {listing(entries)}); ckpt import writes only into a "
            f"new or empty directory, even unrelated files count: choose another --run-dir")


@contextmanager
def _claimed(run_dir: Path) -> Iterator[bool]:
    """Hold the run directory's lock while it is empty; yields whether this call created the directory.

    A busy or non-empty directory is refused before anything in it is created or changed.
    """
    if run_dir.exists() and not run_dir.is_dir():
        raise CheckpointError(f"--run-dir {run_dir} is a file, not a directory")
    holder = lock_holder(run_dir)
    if holder is not None:
        raise CheckpointError(f"run directory {run_dir} is in use by another triarch run (pid {holder}); "
                              f"ckpt import needs a directory no run is using")
    _require_empty(run_dir)
    created = not run_dir.exists()
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        with run_dir_lock(run_dir):
            _require_empty(run_dir)  # again, now that no one else can start a run here
            yield created
    except RunDirBusy as err:
        raise CheckpointError(f"{err}; ckpt import needs a directory no run is using") from None


def _checked_names(weights: HFWeights, args: LlamaArgs, config_path: Path) -> list[str]:
    """The HF tensors to load, after checking every name and shape in the headers against the config."""
    shapes = {name: (entry.shape, entry.file) for name, entry in weights.entries.items()}
    return check_hf_names(shapes, args, config_path, weights.source)


def check_hf_names(shapes: dict[str, tuple[Sequence[int], Any]], args: LlamaArgs, config_path: Path, source: Any
                   ) -> list[str]:
    """The HF tensor names of ``shapes`` (name -> (shape, where it is stored)) to load, after checking every
    name and shape against the model ``config_path`` describes: one CheckpointError naming the tensor."""
    expected = hf_tensor_shapes(args)
    for name, (shape, where) in shapes.items():
        if ignored_hf_tensor(name):
            continue
        if name not in expected:
            raise CheckpointError(f"{where}: unexpected tensor {name} (the Llama that {config_path} "
                                  f"describes has num_hidden_layers={args.n_layers} and no biases)")
        if tuple(shape) != tuple(expected[name]):
            raise CheckpointError(f"{where}: tensor {name} has shape {tuple(shape)}, {config_path} implies "
                                  f"{tuple(expected[name])}")
    for name in expected:
        if name not in shapes and name != HEAD:
            raise CheckpointError(f"{source}: missing tensor {name}")
    if HEAD not in shapes and not args.tie_embeddings and args.head == "lm":
        raise CheckpointError(f"{source}: missing tensor {HEAD} ({config_path} has tie_word_embeddings "
                              f"false, so the output projection is its own tensor)")
    return [name for name in expected if name in shapes]


def _triarch_tensors(weights: HFWeights, names: list[str], args: LlamaArgs, config_path: Path
                     ) -> dict[str, torch.Tensor]:
    """The weights under triarch's names, float32; a tied model's head must equal its embedding."""
    hf = load_tensors(weights, names)
    if args.tie_embeddings and HEAD in hf:
        check_tied_head(weights, hf.pop(HEAD), hf[EMBEDDING], config_path)
    tensors = from_hf_state_dict(hf, args.n_layers)
    if args.tie_embeddings:
        tensors.pop("output.weight", None)  # a reward model has no LM head to untie
    return tensors


def check_tied_head(weights: HFWeights, head: torch.Tensor, embedding: torch.Tensor, config_path: Path) -> None:
    """A tied model's ``lm_head.weight``, when the folder has one, must equal its embedding."""
    if not torch.equal(head, embedding):
        raise CheckpointError(f"{weights.entries[HEAD].file}: tensor {HEAD} differs from {EMBEDDING}, but "
                              f"{config_path} has tie_word_embeddings true")


def hf_run_config(args: LlamaArgs, name: str) -> dict:
    """A run config (as a dict) for a model of shape ``args``, training settings at their defaults."""
    model = {"vocab_size": args.vocab_size, "dim": args.dim, "n_layers": args.n_layers, "n_heads": args.n_heads,
             "n_kv_heads": args.n_kv_heads, "ffn_hidden": args.ffn_hidden, "max_seq_len": args.max_seq_len,
             "seq_len": min(args.max_seq_len, 2048), "rope_theta": args.rope_theta, "norm_eps": args.norm_eps,
             "tie_embeddings": args.tie_embeddings}
    objective = {"kind": "rm"} if args.head == "score" else {}
    return {"name": name, "model": model, "objective": objective}


def _run_config(args: LlamaArgs, run_dir: Path, config_path: Path) -> TriarchConfig:
    """The run config of the imported model (training settings at their defaults)."""
    try:
        return config_from_dict(hf_run_config(args, run_dir.resolve().name))
    except ConfigError as err:
        raise CheckpointError(f"{config_path}: {err}") from None


ImportedState = tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None]  # weights, AdamW state or None


def _write_run(run_dir: Path, state: ImportedState, cfg: TriarchConfig, source: Path) -> Path:
    """Committed step 0, then ``config.yaml``; on failure what was written is removed again."""
    step_dir = run_dir / "checkpoints" / "step_0"
    tensors, optimizer = state
    try:
        write_model_checkpoint(step_dir, tensors, {"step": 0, "config": cfg.model_dump(mode="json", by_alias=True),
                                                   "layout": "imported", "source": str(source)}, optimizer)
        dump_config(cfg, run_dir / "config.yaml")
    except BaseException:
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
        for name in ("config.yaml", "config.yaml.tmp"):
            (run_dir / name).unlink(missing_ok=True)
        raise
    return step_dir


def checked_hf_folder(hf_dir: Path) -> tuple[LlamaArgs, HFWeights, list[str]]:
    """The folder's model shape, its weight files and the tensors to load, after every check of the config
    and the safetensors headers (no tensor data is read)."""
    config_path = hf_dir / CONFIG_FILE
    try:
        args = args_from_hf_config(read_hf_config(hf_dir))
    except ValueError as err:
        raise CheckpointError(f"{config_path}: {err}") from None
    weights = hf_weights(hf_dir)
    return args, weights, _checked_names(weights, args, config_path)


def import_hf(hf_dir: Path, run_dir: Path) -> Path:
    """Write a committed step-0 checkpoint and a matching ``config.yaml`` into a new or empty ``run_dir``."""
    config_path = hf_dir / CONFIG_FILE
    args, weights, names = checked_hf_folder(hf_dir)
    return import_run(run_dir, args, config_path, lambda: (_triarch_tensors(weights, names, args, config_path), None),
                      hf_dir)


def import_run(run_dir: Path, args: LlamaArgs, config_path: Path, tensors: Callable[[], ImportedState],
               source: Path) -> Path:
    """Claim a new or empty ``run_dir``, then write ``tensors()`` (weights under triarch names, float32, and
    optionally AdamW state as ``write_model_checkpoint`` takes it) as its committed step 0 and a ``config.yaml``
    for a model of shape ``args``; a failure leaves no run directory it created."""
    cfg = _run_config(args, run_dir, config_path)
    with _claimed(run_dir) as created:
        try:
            return _write_run(run_dir, tensors(), cfg, source)
        except BaseException:
            if created:  # leave no empty run directory behind a failed import
                (run_dir / LOCK_NAME).unlink(missing_ok=True)
                with suppress(OSError):  # not empty after all: keep it
                    run_dir.rmdir()
            raise
