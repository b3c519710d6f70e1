"""``triarch ckpt export --hf``: a committed step -> a Hugging Face Llama folder (safetensors, config, tokenizer).

A reward model's step becomes a one-label ``LlamaForSequenceClassification`` folder.

The export is written into a temporary sibling folder first. A new or empty target is then replaced by a
rename, so it never holds half an export. A non-empty target is refused unless ``force``: then the files an
export owns (weights, index, configs, tokenizer files) are removed and the new ones renamed in, and files
the export does not own stay.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from triarch.checkpointing.commit import CheckpointError, verify
from triarch.checkpointing.hf_folder import folder_entries, listing
from triarch.checkpointing.manager import TRAINER_STATE, StepInfo, list_steps
from triarch.checkpointing.offline import read_full_tensors
from triarch.checkpointing.safe_load import load_plain
from triarch.config import TriarchConfig
from triarch.data_pipeline.fileio import fsync_dir, temp_path
from triarch.models.hf_llama import hf_config_dict, to_hf_state_dict
from triarch.models.llama import LlamaArgs

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# What an export writes, or what a previous export or save_pretrained would leave stale beside it.
_OWNED_NAMES = ("config.json", "generation_config.json", "model.safetensors.index.json",
                "pytorch_model.bin.index.json", "tokenizer.json", "tokenizer.model", "tokenizer_config.json",
                "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja")
_OWNED_PATTERNS = ("*.safetensors", "pytorch_model*.bin")


def pick_step(run_dir: Path, step: int | None) -> StepInfo:
    """The requested committed step of a run, or its newest committed one."""
    committed = [s for s in list_steps(Path(run_dir) / "checkpoints") if s.committed]
    if not committed:
        raise CheckpointError(f"{run_dir} has no committed checkpoint")
    if step is None:
        return committed[-1]
    for info in committed:
        if info.step == step:
            return info
    raise CheckpointError(f"{run_dir} has no committed step {step} (committed: {[s.step for s in committed]})")


def saved_config(info: StepInfo) -> TriarchConfig:
    """The resolved config stored with a checkpoint."""
    state = load_plain(info.path / TRAINER_STATE)
    if "config" not in state:
        raise CheckpointError(f"{info.path} has no saved config")
    return TriarchConfig.model_validate(state["config"])


def _args(cfg: TriarchConfig) -> LlamaArgs:
    from triarch.engine.model_args import llama_args

    return llama_args(cfg)


def export_owned_files(folder: Path) -> list[Path]:
    """Files directly in ``folder`` that an export writes or would leave stale (what ``--force`` removes)."""
    owned = {p for pattern in _OWNED_PATTERNS for p in folder.glob(pattern)}
    owned |= {folder / name for name in _OWNED_NAMES}
    return sorted(p for p in owned if p.is_file() or p.is_symlink())


def _check_target(out: Path, force: bool) -> None:
    """Refuse a file, or a non-empty folder without ``force``."""
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"--hf {out} is a file, not a folder")
    entries = folder_entries(out)
    if entries and not force:
        raise CheckpointError(
            f"{out} is not empty (holds {listing(entries)}); pass --force to replace the export there (removes "
            f"its *.safetensors, index, config.json, generation_config.json and tokenizer files; other files "
            f"stay) or choose a new folder")


def _write_folder(folder: Path, tensors: dict[str, torch.Tensor], config: dict, tokenizer: Path | None) -> None:
    """The export's files, each fsynced."""
    from safetensors.torch import save_file

    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    if tokenizer is not None:
        shutil.copy(tokenizer, folder / "tokenizer.json")
    for path in folder.iterdir():
        with open(path, "rb") as f:
            os.fsync(f.fileno())


def _publish(tmp: Path, out: Path) -> None:
    """Move the finished export into ``out``: one rename when ``out`` is missing or empty."""
    if not folder_entries(out):
        os.replace(tmp, out)  # rename(2) replaces an empty folder
    else:
        for stale in export_owned_files(out):
            stale.unlink()
        for path in sorted(tmp.iterdir()):
            os.replace(path, out / path.name)
        fsync_dir(out)
    fsync_dir(out.parent)


def _write_via_sibling(out: Path, tensors: dict[str, torch.Tensor], config: dict, tokenizer: Path | None) -> None:
    """Write the export into a temporary sibling of ``out``, then publish it; OS errors become one line."""
    out = Path(os.path.abspath(out))  # "." and "dir/" have a name, and so a sibling
    tmp = temp_path(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # a leftover of a killed export with the same pid
        tmp.mkdir()
        _write_folder(tmp, tensors, config, tokenizer)
        _publish(tmp, out)
    except OSError as err:  # a full disk, a read-only folder, a folder where a file goes
        where = f" ({err.filename})" if err.filename else ""
        raise CheckpointError(f"cannot write the export to {out}: {err.strerror or err}{where}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _data_tokens(cfg: TriarchConfig) -> dict:
    """The ``tokenizer`` record of the run's data manifest (``eos_id``, and ``pad_id`` for preference data),
    or nothing when the data is not where the config says."""
    folder = Path(cfg.data.path)
    if (folder / cfg.data.train_split / "manifest.json").is_file():  # a folder with held-out splits
        folder = folder / cfg.data.train_split
    try:
        record = json.loads((folder / "manifest.json").read_text()).get("tokenizer")
    except (OSError, ValueError, AttributeError):
        return {}
    return record if isinstance(record, dict) else {}


def reward_pad_id(cfg: TriarchConfig, pad_id: int | None) -> int:
    """The ``pad_token_id`` of an exported reward model: ``pad_id`` when given, else the data's padding id.

    transformers scores the rightmost token that is not ``pad_token_id``; a sequence ending in EOS would be
    scored one token early if padding were EOS, so a padding id equal to EOS is refused.
    """
    tokens = _data_tokens(cfg)
    eos = tokens.get("eos_id")
    chosen = pad_id if pad_id is not None else tokens.get("pad_id")
    if chosen is None:
        raise CheckpointError(f"exporting a reward model needs its padding token id (transformers scores the last "
                              f"token that is not padding): the data at {cfg.data.path} names none; pass --pad-id")
    if not 0 <= chosen < cfg.model.vocab_size:
        raise CheckpointError(f"--pad-id {chosen} is outside the vocabulary (model.vocab_size {cfg.model.vocab_size})")
    if chosen == eos:
        raise CheckpointError(f"the reward model's padding id {chosen} is its EOS id too: transformers would score "
                              f"the token before each final EOS; pass --pad-id with a token that never ends a sequence")
    return chosen


def export_hf(run_dir: Path, out: Path, *, step: int | None = None, dtype: str = "bf16", force: bool = False,
              pad_id: int | None = None) -> Path:
    """Write ``out/model.safetensors``, ``out/config.json`` and the run's tokenizer (when found).

    A reward model (``objective.kind: rm``) is written as a one-label ``LlamaForSequenceClassification``
    whose ``pad_token_id`` is ``pad_id`` or the data's padding id (:func:`reward_pad_id`).
    A non-empty ``out`` is refused unless ``force``, which removes the files a previous export left there.
    """
    if dtype not in _DTYPES:
        raise CheckpointError(f"--dtype {dtype!r} must be one of {sorted(_DTYPES)}")
    info = pick_step(run_dir, step)
    _check_target(out, force)
    cfg = saved_config(info)
    args = _args(cfg)
    pad = reward_pad_id(cfg, pad_id) if args.head == "score" else pad_id
    if pad is not None and not 0 <= pad < cfg.model.vocab_size:
        raise CheckpointError(f"--pad-id {pad} is outside the vocabulary (model.vocab_size {cfg.model.vocab_size})")
    verify(info.path)  # a damaged shard is one line naming it, not DCP's traceback
    hf = to_hf_state_dict(read_full_tensors(info.path), tie_embeddings=args.tie_embeddings)
    tensors = {k: v.to(_DTYPES[dtype]).contiguous() for k, v in hf.items()}
    config = hf_config_dict(args, dtype="bfloat16" if dtype == "bf16" else "float32", pad_token_id=pad)
    tokenizer = Path(cfg.data.path) / "tokenizer.json"
    _write_via_sibling(out, tensors, config, tokenizer if tokenizer.is_file() else None)
    return out
