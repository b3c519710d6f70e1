"""Hugging Face Llama export of triarch checkpoints (safetensors + config.json + tokenizer)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from triarch.checkpointing.commit import CheckpointError
from triarch.checkpointing.manager import TRAINER_STATE, StepInfo, list_steps
from triarch.checkpointing.offline import read_full_tensors
from triarch.config import TriarchConfig
from triarch.models.hf_llama import hf_config_dict, to_hf_state_dict
from triarch.models.llama import LlamaArgs

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


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
    state = torch.load(info.path / TRAINER_STATE, weights_only=False)
    if "config" not in state:
        raise CheckpointError(f"{info.path} has no saved config")
    return TriarchConfig.model_validate(state["config"])


def _args(cfg: TriarchConfig) -> LlamaArgs:
    from triarch.engine.native import llama_args

    return llama_args(cfg)


def export_hf(run_dir: Path, out: Path, *, step: int | None = None, dtype: str = "bf16") -> Path:
    """Write ``out/model.safetensors``, ``out/config.json`` and the run's tokenizer (when found)."""
    if dtype not in _DTYPES:
        raise CheckpointError(f"--dtype {dtype!r} must be one of {sorted(_DTYPES)}")
    info = pick_step(run_dir, step)
    cfg = saved_config(info)
    args = _args(cfg)
    tensors = read_full_tensors(info.path)
    hf = to_hf_state_dict(tensors, tie_embeddings=args.tie_embeddings)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.to(_DTYPES[dtype]).contiguous() for k, v in hf.items()}, str(out / "model.safetensors"),
              metadata={"format": "pt"})
    config = hf_config_dict(args, dtype="bfloat16" if dtype == "bf16" else "float32")
    (out / "config.json").write_text(json.dumps(config, indent=2))
    tokenizer = Path(cfg.data.path) / "tokenizer.json"
    if tokenizer.is_file():
        shutil.copy(tokenizer, out / "tokenizer.json")
    return out
