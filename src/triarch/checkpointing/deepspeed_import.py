"""``triarch ckpt import --deepspeed DIR``: a DeepSpeed ZeRO checkpoint of a Hugging Face Llama -> a new run.

``DIR`` is what Hugging Face's Trainer with DeepSpeed (or any program calling ``engine.save_checkpoint``
around a ``LlamaForCausalLM``) writes: the model's ``config.json`` and DeepSpeed's folder of the tag named in
``latest`` (``global_step500/``: ``*_model_states.pt`` and one ``*_optim_states.pt`` per rank, ZeRO stage 1, 2
or 3, any number of ranks). DeepSpeed's own consolidation (``zero_to_fp32``) assembles the fp32 master weights
from every rank's partition; their names and shapes are checked against ``config.json`` like a safetensors
import, and they become the run's committed step 0 with a ``config.yaml`` (training settings at defaults).

Weights only: the AdamW moments of a ZeRO checkpoint are flat partitions of the other program's parameter
groups, whose order triarch cannot know from the files, so a run imported this way starts its optimizer
fresh (as ``--hf`` does). Cost: one process holds the fp32 partitions of all ranks and the assembled weights,
about twice the fp32 model in memory.
"""

from __future__ import annotations

import importlib.util
import os
import pickle
import zipfile
from pathlib import Path

import torch

from triarch.checkpointing.commit import CheckpointError
from triarch.checkpointing.hf_folder import CONFIG_FILE, read_hf_config
from triarch.checkpointing.hf_import import EMBEDDING, HEAD, check_hf_names, import_run
from triarch.models.hf_llama import args_from_hf_config, from_hf_state_dict
from triarch.models.llama import LlamaArgs

INSTALL = "pip install 'triarch[deepspeed]'"


def checkpoint_tag(ds_dir: Path) -> str:
    """The tag folder to import: the one ``latest`` names, else the only ``global_step*`` folder."""
    latest = ds_dir / "latest"
    if latest.is_file():
        tag = latest.read_text(errors="replace").strip()
        if not tag or "/" in tag or not (ds_dir / tag).is_dir():
            raise CheckpointError(f"{latest} names '{tag}', which is not a folder in {ds_dir}")
        return tag
    tags = sorted(p.name for p in ds_dir.glob("global_step*") if p.is_dir())
    if len(tags) != 1:
        found = f"{len(tags)} global_step* folders" if tags else "no global_step* folder"
        raise CheckpointError(f"{ds_dir} is not a DeepSpeed checkpoint folder: no 'latest' file and {found}")
    return tags[0]


def _check_files(tag_dir: Path) -> None:
    if not any(tag_dir.glob("*model_states.pt")):
        raise CheckpointError(f"{tag_dir} holds no *model_states.pt: not a DeepSpeed checkpoint")
    if not any(tag_dir.glob("*optim_states.pt")):
        raise CheckpointError(f"{tag_dir} holds no *optim_states.pt: a ZeRO checkpoint keeps its fp32 weights "
                              f"there (a checkpoint saved without ZeRO is not supported)")


def consolidated_weights(ds_dir: Path, tag: str) -> dict[str, torch.Tensor]:
    """The fp32 weights under the saving program's names, assembled from every rank's ZeRO partition."""
    if importlib.util.find_spec("deepspeed") is None:
        raise CheckpointError(f"importing a DeepSpeed checkpoint needs DeepSpeed, which is not installed: {INSTALL}")
    if not torch.cuda.is_available():  # rather than DeepSpeed's warning that it detected no GPU
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    try:
        lazy = get_fp32_state_dict_from_zero_checkpoint(str(ds_dir), tag=tag, lazy_mode=True)
        return {name: tensor.contiguous().float() for name, tensor in lazy.items()}
    except (OSError, EOFError, RuntimeError, ValueError, KeyError, IndexError, AssertionError, TypeError,
            AttributeError, pickle.UnpicklingError, zipfile.BadZipFile) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{ds_dir / tag}: DeepSpeed could not assemble the weights ({first})") from None


def _triarch_weights(ds_dir: Path, tag: str, args: LlamaArgs, config_path: Path) -> dict[str, torch.Tensor]:
    hf = consolidated_weights(ds_dir, tag)
    names = check_hf_names({k: (tuple(v.shape), ds_dir / tag) for k, v in hf.items()}, args, config_path, ds_dir / tag)
    hf = {name: hf[name] for name in names}
    if args.tie_embeddings and HEAD in hf:
        head = hf.pop(HEAD)
        if not torch.equal(head, hf[EMBEDDING]):
            raise CheckpointError(f"{ds_dir / tag}: {HEAD} differs from {EMBEDDING}, but {config_path} has "
                                  f"tie_word_embeddings true")
    tensors = from_hf_state_dict(hf, args.n_layers)
    if args.tie_embeddings:
        tensors.pop("output.weight", None)
    return tensors


def import_deepspeed(ds_dir: Path, run_dir: Path) -> Path:
    """Write the ZeRO checkpoint in ``ds_dir`` as a new or empty ``run_dir``'s committed step 0."""
    if not ds_dir.is_dir():
        raise CheckpointError(f"--deepspeed {ds_dir} is not a folder")
    tag = checkpoint_tag(ds_dir)
    _check_files(ds_dir / tag)
    config_path = ds_dir / CONFIG_FILE
    if not config_path.is_file():
        raise CheckpointError(f"{ds_dir} has no {CONFIG_FILE}: the model's Hugging Face config (Trainer writes it "
                              f"next to the DeepSpeed folders) says which Llama the weights are")
    try:
        args = args_from_hf_config(read_hf_config(ds_dir))
    except ValueError as err:
        raise CheckpointError(f"{config_path}: {err}") from None
    return import_run(run_dir, args, config_path, lambda: _triarch_weights(ds_dir, tag, args, config_path), ds_dir)
