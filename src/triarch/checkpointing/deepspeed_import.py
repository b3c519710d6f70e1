"""``triarch ckpt import --deepspeed DIR``: a DeepSpeed ZeRO checkpoint of a Hugging Face Llama -> a new run.

``DIR`` is what Hugging Face's Trainer with DeepSpeed (or any program calling ``engine.save_checkpoint``
around a ``LlamaForCausalLM``) writes: the model's ``config.json`` and DeepSpeed's folder of the tag named in
``latest`` (``global_step500/``: ``*_model_states.pt`` and one ``*_optim_states.pt`` per rank, ZeRO stage 1, 2
or 3, any number of ranks). DeepSpeed's own consolidation (``zero_to_fp32``) assembles the fp32 master weights
from every rank's partition; their names and shapes are checked against ``config.json`` like a safetensors
import, and they become the run's committed step 0 with a ``config.yaml`` (training settings at defaults).

The Adam moments (``exp_avg``, ``exp_avg_sq``) and step count come along when the saving optimizer was Adam(W):
DeepSpeed's consolidation assembles them from the flat partitions exactly as it assembles the weights (the
parameter order per group is recorded in ``*_model_states.pt``), and they become the run's ``optim.*`` state, so
a resumed run continues the other program's AdamW; the learning-rate schedule starts fresh. Without Adam state
(another optimizer, frozen parameters) the run's AdamW starts fresh, as after ``--hf``, and the import says so.
Cost: one process memory-maps every rank's partitions and holds the assembled weights and moments, about three
times the fp32 model.
"""

from __future__ import annotations

import importlib.util
import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from triarch.checkpointing.commit import CheckpointError
from triarch.checkpointing.hf_folder import CONFIG_FILE, read_hf_config
from triarch.checkpointing.hf_import import EMBEDDING, HEAD, ImportedState, check_hf_names, import_run
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


MOMENTS = ("exp_avg", "exp_avg_sq")
_READ_ERRORS = (OSError, EOFError, RuntimeError, ValueError, KeyError, IndexError, AssertionError, TypeError,
                AttributeError, pickle.UnpicklingError, zipfile.BadZipFile)


def _deepspeed_consolidation() -> Any:
    if importlib.util.find_spec("deepspeed") is None:
        raise CheckpointError(f"importing a DeepSpeed checkpoint needs DeepSpeed, which is not installed: {INSTALL}")
    if not torch.cuda.is_available():  # rather than DeepSpeed's warning that it detected no GPU
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from deepspeed.utils import zero_to_fp32

    return zero_to_fp32


def _adam_groups(optimizer_state: dict, stage: int) -> tuple[dict[str, list[torch.Tensor]], list[torch.Tensor]] | str:
    """One rank's flat partitions of exp_avg and exp_avg_sq per parameter group, and each group's step; or why
    there are none (a reason)."""
    inner = optimizer_state.get("base_optimizer_state" if stage <= 2 else "optimizer_state_dict")
    state = inner.get("state") if isinstance(inner, dict) else None
    if not state:
        return "the checkpoint holds no optimizer state"
    groups = [state[g] for g in sorted(state)]
    missing = [m for m in (*MOMENTS, "step") if any(m not in g for g in groups)]
    if missing:
        return f"its optimizer state has no {missing[0]} (not Adam)"
    return {m: [g[m] for g in groups] for m in MOMENTS}, [torch.as_tensor(g["step"]).float() for g in groups]


def consolidated_state(ds_dir: Path, tag: str) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]],
                                                         dict[str, torch.Tensor], str | None]:
    """The fp32 weights under the saving program's names, assembled from every rank's ZeRO partition by
    DeepSpeed's own consolidation (``zero_to_fp32``), and the same assembly of the Adam moments: (weights,
    {moment: tensors}, per-parameter step, None), or (weights, {}, {}, why the optimizer state is not imported)."""
    zero_to_fp32 = _deepspeed_consolidation()
    folder = str(ds_dir / tag)
    try:
        model_states = zero_to_fp32.parse_model_states(zero_to_fp32.get_model_state_files(folder))
        files = zero_to_fp32.get_optim_files(folder)
        ranks = [torch.load(f, map_location="cpu", mmap=True, weights_only=False)["optimizer_state_dict"]
                 for f in files]
        stage, world = int(ranks[0]["zero_stage"]), ranks[0]["partition_count"]
        world = max(world) if isinstance(world, list) else int(world)
        if world != len(files):
            raise ValueError(f"{len(files)} *optim_states.pt files for a ZeRO world of {world}")
        paddings = ranks[0].get("param_alignment_paddings")

        def assemble(flat_groups: list[list[torch.Tensor]], frozen_too: bool) -> dict[str, torch.Tensor]:
            if stage <= 2:
                lazy = zero_to_fp32._get_fp32_state_dict_from_zero2_checkpoint(
                    world, flat_groups, model_states, not frozen_too, paddings)
            else:
                lazy = zero_to_fp32._get_fp32_state_dict_from_zero3_checkpoint(world, flat_groups, model_states,
                                                                               not frozen_too)
            return {name: t.contiguous().float() for name, t in lazy.items()}

        fp32_key = "single_partition_of_fp32_groups" if stage <= 2 else "fp32_flat_groups"
        weights = assemble([r[fp32_key] for r in ranks], frozen_too=True)
        adam = [_adam_groups(r, stage) for r in ranks]
        if isinstance(adam[0], str):
            return weights, {}, {}, adam[0]
        moments = {m: assemble([a[0][m] for a in adam], frozen_too=False) for m in MOMENTS}
        step_of = {name: adam[0][1][g] for g, shapes in enumerate(model_states[0].param_shapes) for name in shapes}
        return weights, moments, step_of, None
    except _READ_ERRORS as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{ds_dir / tag}: DeepSpeed could not assemble the checkpoint ({first})") from None


def _to_triarch(hf: dict[str, torch.Tensor], names: list[str], args: LlamaArgs) -> dict[str, torch.Tensor]:
    tensors = from_hf_state_dict({name: hf[name] for name in names if name in hf}, args.n_layers)
    if args.tie_embeddings:
        tensors.pop("output.weight", None)
    return tensors


def _triarch_state(ds_dir: Path, tag: str, args: LlamaArgs, config_path: Path) -> ImportedState:
    hf, moments, steps, reason = consolidated_state(ds_dir, tag)
    names = check_hf_names({k: (tuple(v.shape), ds_dir / tag) for k, v in hf.items()}, args, config_path, ds_dir / tag)
    if args.tie_embeddings and HEAD in names:
        if not torch.equal(hf[HEAD], hf[EMBEDDING]):
            raise CheckpointError(f"{ds_dir / tag}: {HEAD} differs from {EMBEDDING}, but {config_path} has "
                                  f"tie_word_embeddings true")
        names = [n for n in names if n != HEAD]
    weights = _to_triarch(hf, names, args)
    if reason is None:
        frozen = [n for n in names if n not in moments["exp_avg"]]
        if frozen:
            reason = f"{frozen[0]} has no optimizer state (frozen in the saving program)"
    if reason is not None:
        print(f"optimizer state not imported: {reason}; the run's AdamW starts fresh")
        return weights, None
    optimizer: dict[str, torch.Tensor] = {}
    for moment in MOMENTS:
        for name, value in _to_triarch(moments[moment], names, args).items():
            optimizer[f"{name}.{moment}"] = value
    for name, value in _to_triarch({n: steps[n] for n in names}, names, args).items():
        optimizer[f"{name}.step"] = value
    print(f"optimizer state imported: AdamW moments and step ({int(steps[names[0]])}) of {len(weights)} parameters")
    return weights, optimizer


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
    return import_run(run_dir, args, config_path, lambda: _triarch_state(ds_dir, tag, args, config_path), ds_dir)
