"""Host-side checks of an RL run before any rank starts: the prompts fit the model and the rollout, and
the reward model is a reward model of this vocabulary and tokenizer. Each failure is one line."""

from __future__ import annotations

import hashlib
from pathlib import Path

from triarch.checkpointing.init_from import InitSourceError, describe_source, fresh_parameters
from triarch.config import ConfigError, TriarchConfig
from triarch.data_pipeline.errors import DataError
from triarch.rlhf.prompts import PromptSource
from triarch.rlhf.rl_run import prompt_problem

SCORE_WEIGHT = "score.weight"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _source_tokenizer(spec: str, path: Path, hf: bool) -> Path | None:
    """The tokenizer file a reward-model source was trained with, when it can be found."""
    if hf:
        return path / "tokenizer.json" if (path / "tokenizer.json").is_file() else None
    from triarch.checkpointing.commit import CheckpointError
    from triarch.checkpointing.hf_io import saved_config
    from triarch.checkpointing.steps import StepInfo

    try:
        cfg = saved_config(StepInfo(step=0, path=path, committed=True))
    except (CheckpointError, OSError, ValueError, KeyError):  # no readable saved config: shapes were checked
        return None
    folder = Path(cfg.data.path)
    for candidate in (folder / "tokenizer.json", folder / cfg.data.train_split / "tokenizer.json"):
        if candidate.is_file():
            return candidate
    return None


def check_rl_setup(cfg: TriarchConfig) -> None:
    """Raise ConfigError / DataError (one line) when the RL run cannot start."""
    prompts = PromptSource(cfg.data.path, cfg.data.train_split, cfg.train.seed, train_split=cfg.data.train_split)
    problem = prompt_problem(cfg, prompts)
    if problem is not None:
        raise DataError(problem)
    if cfg.reward.kind != "model":
        return
    spec = cfg.reward.model
    try:
        source = describe_source(spec, hashes=False)
    except InitSourceError as err:  # its words name init.from, the policy's key
        raise ConfigError(str(err).replace("init.from", "reward.model")) from None
    if SCORE_WEIGHT not in source.shapes:
        raise ConfigError(f"reward.model {spec} is not a reward model: {source.resolved} has no score head "
                          f"({SCORE_WEIGHT}); train one with 'triarch rm'")
    try:
        fresh_parameters(source, cfg, "score")
    except InitSourceError as err:
        raise ConfigError(f"reward.model {spec} does not fit the policy's model: {err}") from None
    theirs = _source_tokenizer(spec, source.path, source.hf)
    ours = prompts.tokenizer_path
    if theirs is not None and ours.is_file() and _sha256(theirs) != _sha256(ours):
        raise ConfigError(f"reward.model {spec} was trained with another tokenizer ({theirs}) than the prompts in "
                          f"data.path ({ours}): its scores would read other tokens; use a reward model trained on "
                          f"this tokenizer")
