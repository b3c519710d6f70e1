"""Aligned models against their base on held-out prompts: completions, the rule judge, the reward model, lengths
and the KL to the base (the figures of ``triarch align-report``; ``rlhf.report`` writes them up).

Every model continues the same prompts (a prepared preference split's ``prompt`` column, first ``count``
distinct ones in storage order) with the same decoding: greedy by default, ``max_new_tokens`` at most, stopping
at the data tokenizer's EOS. For each completion:

- ``judge``: ``rlhf.judge.judge(prompt text, completion text)``, both decoded with the data's tokenizer (the EOS
  dropped): the independent "human" score;
- ``rm``: the reward model's scalar at the completion's last token (its EOS, or the last token generated), as
  PPO scores a rollout (without ``missing_eos_penalty``);
- ``tokens`` (the EOS included, as ``response_length`` counts in an RL run) and ``words`` (whitespace-separated,
  as the judge counts them);
- ``kl``: ``sum_t log p_model(y_t | x, y_<t) - log p_base(y_t | x, y_<t)`` over the completion's tokens (EOS
  included), both log-probs from a forward pass over (prompt + completion) at temperature 1: the log-ratio
  of the model to the base on the model's own completion (the base's is 0 by construction).

The evaluation runs in this process (one rank; a world of one when no process group exists) in fp32,
whatever precision or layout the models trained with: the base (kept for the KL), the reward model (kept for
the scores) and one evaluated model at a time.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from triarch.config import ConfigError, TriarchConfig, config_from_dict, validate_for_world

log = logging.getLogger("triarch.align")

SCORE_WEIGHT = "score.weight"
RL_KINDS = ("ppo", "grpo", "rloo")
TOKENIZER_FILE = "tokenizer.json"


class EvaluationError(ConfigError):
    """A problem with the evaluation's input, reported as one line (exit 2)."""


# ---------------------------------------------------------------------------------------------- sources
@dataclass(frozen=True)
class ModelSource:
    """One model to load: ``name`` in the report, ``spec`` as given, the resolved weights (``init.from`` spec
    of a committed step folder or ``hf:PATH``), its saved config, and what it is."""

    name: str
    spec: str
    label: str  # how the command line named it, for messages: "--model sft=runs/tiny_sft"
    weights: str
    config: TriarchConfig
    is_reward: bool
    tokenizer: Path | None  # the tokenizer it was trained with, when it can be found

    @property
    def kind(self) -> str:
        return self.config.objective.kind

    @property
    def run_dir(self) -> Path | None:
        """The run directory holding the weights (a step folder's grandparent), for its metrics.jsonl."""
        if self.weights.startswith("hf:"):
            return None
        return Path(self.weights).parent.parent


def _training_tokenizer(cfg: TriarchConfig) -> Path | None:
    folder = Path(cfg.data.path)
    return next((p for p in (folder / TOKENIZER_FILE, folder / cfg.data.train_split / TOKENIZER_FILE)
                 if p.is_file()), None)


def resolve_model(name: str, spec: str, label: str) -> ModelSource:
    """Resolve a run directory, a committed step folder or ``hf:PATH`` (``label``: how the command line named
    it, the start of every error message)."""
    from triarch.checkpointing.commit import CheckpointError
    from triarch.checkpointing.hf_io import saved_config
    from triarch.checkpointing.init_from import InitSourceError, describe_source
    from triarch.checkpointing.steps import StepInfo

    if not spec.startswith("hf:") and not Path(spec).exists():
        raise EvaluationError(f"{label}: {spec} does not exist (give a run directory, a checkpoint folder "
                              "RUN_DIR/checkpoints/step_N or hf:PATH)")
    try:
        source = describe_source(spec, hashes=False)
    except InitSourceError as err:
        raise EvaluationError(str(err).replace(f"init.from {spec}", label, 1)) from None
    if source.hf:
        from triarch.checkpointing.hf_import import hf_run_config

        cfg = config_from_dict(hf_run_config(source.args, source.path.name))
        tokenizer = source.path / TOKENIZER_FILE if (source.path / TOKENIZER_FILE).is_file() else None
    else:
        try:
            cfg = saved_config(StepInfo(step=0, path=source.path, committed=True))
        except (CheckpointError, OSError, ValueError) as err:
            raise EvaluationError(f"{label}: cannot read the saved config ({err})") from None
        tokenizer = _training_tokenizer(cfg)
    return ModelSource(name, spec, label, source.resolved if source.hf else str(source.path), cfg,
                       SCORE_WEIGHT in source.shapes, tokenizer)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def check_sources(base: ModelSource, models: Sequence[ModelSource], reward: ModelSource, prompts: EvalPrompts,
                  max_new_tokens: int) -> None:
    """Language models where generation is asked, a reward model as the scorer, all of one vocabulary and of
    the data's tokenizer, every prompt plus ``max_new_tokens`` within every model's context."""
    for m in (base, *models):
        if m.is_reward:
            raise EvaluationError(f"{m.label} is a reward model (score head): it scores sequences and cannot "
                                  "generate; give a language model (an sft, dpo, ppo, ... run)")
    if not reward.is_reward:
        raise EvaluationError(f"{reward.label} is not a reward model (no score head; objective.kind "
                              f"{reward.kind}); train one with 'triarch rm'")
    vocab = base.config.model.vocab_size
    ours = _sha256(prompts.tokenizer_path)
    longest = max(len(p) for p in prompts.ids)
    for m in (base, *models, reward):
        model = m.config.model
        if model.vocab_size != vocab:
            raise EvaluationError(f"{m.label} has a vocabulary of {model.vocab_size} tokens, the base {vocab}: "
                                  "the KL to the base needs one vocabulary")
        if prompts.vocab_size > model.vocab_size:
            raise EvaluationError(f"the data's tokenizer has {prompts.vocab_size} tokens, more than {m.label}'s "
                                  f"model.vocab_size ({model.vocab_size})")
        if m.tokenizer is not None and _sha256(m.tokenizer) != ours:
            raise EvaluationError(f"{m.label} was trained with another tokenizer ({m.tokenizer}) than the "
                                  f"prompts' ({prompts.tokenizer_path})")
        if longest + max_new_tokens > model.max_seq_len:
            raise EvaluationError(f"prompts of up to {longest} tokens with --max-new-tokens {max_new_tokens} need "
                                  f"{longest + max_new_tokens} positions, more than {m.label}'s "
                                  f"model.max_seq_len ({model.max_seq_len})")


# ---------------------------------------------------------------------------------------------- prompts
@dataclass(frozen=True)
class EvalPrompts:
    """The held-out prompts: token ids, their decoded text, and the data's tokenizer facts."""

    ids: list[list[int]]
    texts: list[str]
    tokenizer_path: Path
    eos_id: int
    pad_id: int
    vocab_size: int
    split: str


def load_prompts(path: str | Path, split: str, count: int) -> EvalPrompts:
    """The first ``count`` distinct prompts of ``split`` of a prepared preference folder (storage order)."""
    from tokenizers import Tokenizer

    from triarch.rlhf.prompts import PromptSource

    root = Path(path)
    if not root.is_dir():
        raise EvaluationError(f"--data {path}: no such folder (give a prepare-preferences output folder)")
    if split != "train" and not (root / split).is_dir():
        have = sorted(p.name for p in root.iterdir() if (p / "manifest.json").is_file())
        raise EvaluationError(f"--data {path} has no split {split!r} (it has: {', '.join(have) or 'none'})")
    source = PromptSource(path, split, seed=0, train_split="train")
    seen: set[tuple[int, ...]] = set()
    ids: list[list[int]] = []
    for i in range(len(source.dataset)):
        row = tuple(int(t) for t in source.dataset.record(i)["prompt"].tolist())
        if row and row not in seen:
            seen.add(row)
            ids.append(list(row))
            if len(ids) == count:
                break
    if not ids:
        raise EvaluationError(f"{source.folder} holds no prompts")
    tokenizer = Tokenizer.from_file(str(source.tokenizer_path))
    texts = [tokenizer.decode(p) for p in ids]
    return EvalPrompts(ids, texts, source.tokenizer_path, source.eos_id, source.pad_id, source.vocab_size, split)


# ---------------------------------------------------------------------------------------------- results
@dataclass(frozen=True)
class Sample:
    """One completion of one prompt by one model."""

    prompt: int  # index into EvalPrompts
    completion_ids: list[int]
    text: str
    ended: bool  # stopped at EOS
    tokens: int
    words: int
    judge: float
    rm: float
    kl: float


@dataclass
class ModelResult:
    """Every sample of one model and their means."""

    name: str
    source: str
    kind: str
    samples: list[Sample] = field(default_factory=list)

    def mean(self, key: str) -> float:
        values = [float(getattr(s, key)) for s in self.samples]
        return sum(values) / len(values) if values else float("nan")

    def values(self, key: str) -> list[float]:
        return [float(getattr(s, key)) for s in self.samples]

    def summary(self) -> dict[str, float | str | int]:
        return {"name": self.name, "kind": self.kind, "source": self.source, "prompts": len(self.samples),
                "judge": self.mean("judge"), "rm": self.mean("rm"), "tokens": self.mean("tokens"),
                "words": self.mean("words"), "kl": self.mean("kl"), "eos_fraction": self.mean("ended")}


# ---------------------------------------------------------------------------------------------- evaluation
def _engine_config(source: ModelSource, seed: int) -> TriarchConfig:
    """The model's shape in a one-rank, fp32, forward-only config (one micro-batch per call)."""
    data = {"name": f"align-report-{source.name}", "model": source.config.model.model_dump(mode="json"),
            "train": {"micro_batch_size": 1, "global_batch_size": 1, "precision": "fp32", "seed": seed,
                      "warmup_steps": 0, "compile": False},
            "parallel": {"tp": 1, "pp": 1, "dp_replicate": 1, "dp_shard": 1}}
    return validate_for_world(config_from_dict(data), 1)


class _Models:
    """Builds and loads engines on one single-rank Topology."""

    def __init__(self, seed: int) -> None:
        import torch.distributed as dist

        from triarch.launcher.distributed import init_distributed, pick_device
        from triarch.parallel.topology import Topology

        device = pick_device("auto")
        self.owns_group = not dist.is_initialized()
        init_distributed(device)
        if dist.get_world_size() != 1:
            raise EvaluationError("the evaluation runs in one process; start it without a launcher")
        self.topo = Topology.build(device, pp=1, dp_replicate=1, dp_shard=1, tp=1)
        self.seed = seed

    def load(self, source: ModelSource, head: str | None = None):
        from triarch.checkpointing.init_from import load_initial_weights
        from triarch.engine.build import build_engine

        engine = build_engine(_engine_config(source, self.seed), self.topo, trainable=False, head=head)
        load_initial_weights(engine, source.weights, self.topo.host_group)
        return engine

    def close(self) -> None:
        from triarch.launcher.distributed import shutdown_distributed

        if self.owns_group:
            shutdown_distributed()


def _batches(n: int, size: int) -> list[range]:
    return [range(lo, min(lo + size, n)) for lo in range(0, n, size)]


@torch.no_grad()
def _evaluate_one(engine, base, reward, source: ModelSource, prompts: EvalPrompts, params, batch_size: int,
                  decode: Callable[[list[int]], str]) -> ModelResult:
    from triarch.objectives.policy import token_logprob_fn
    from triarch.objectives.preference import sequence_rewards
    from triarch.rlhf.judge import judge
    from triarch.rlhf.rollout import rollout_rows

    result = ModelResult(source.name, source.spec, source.kind)
    width = max(len(p) for p in prompts.ids) + params.max_new_tokens
    for rows in _batches(len(prompts.ids), batch_size):
        batch = [prompts.ids[i] for i in rows]
        generation = engine.generate(batch, params, torch.tensor(list(rows)))
        rollout = rollout_rows(batch, generation, width, prompts.pad_id, prompts.eos_id)
        fields = {"labels": rollout.labels}
        own = engine.forward_rows(rollout.input_ids, fields, token_logprob_fn, width=width).cpu()
        ref = own if engine is base else base.forward_rows(rollout.input_ids, fields, token_logprob_fn,
                                                           width=width).cpu()
        scores = reward.forward_rows(rollout.input_ids, fields,
                                     lambda out, f: sequence_rewards(out, f["labels"])).cpu()
        mask = rollout.mask
        kl = ((own - ref) * mask).sum(-1)
        for j, (i, ids) in enumerate(zip(rows, generation.completions())):
            ended = bool(rollout.ended[j])
            text = decode(ids[:-1] if ended else ids)
            result.samples.append(Sample(prompt=i, completion_ids=ids, text=text, ended=ended, tokens=len(ids),
                                         words=len(text.split()), judge=judge(prompts.texts[i], text),
                                         rm=float(scores[j]), kl=float(kl[j])))
    return result


def evaluate(base: ModelSource, models: Sequence[ModelSource], reward: ModelSource, prompts: EvalPrompts, *,
             max_new_tokens: int, temperatures: Sequence[float] = (0.0,), seed: int = 0,
             batch_size: int = 32) -> list[list[ModelResult]]:
    """For each temperature (0: greedy), the base's and each model's results on ``prompts`` (base first). Runs
    in this process; each model is loaded once."""
    from tokenizers import Tokenizer

    from triarch.engine.generation import SamplingParams

    tokenizer = Tokenizer.from_file(str(prompts.tokenizer_path))

    def decode(ids: list[int]) -> str:
        return tokenizer.decode(ids, skip_special_tokens=True)

    decodings = [SamplingParams(max_new_tokens=max_new_tokens, temperature=t, seed=seed, eos_id=prompts.eos_id,
                                pad_id=prompts.pad_id) for t in temperatures]
    for params in decodings:
        params.check()
    loader = _Models(seed)
    try:
        base_engine = loader.load(base)
        reward_engine = loader.load(reward, head="score")
        results: list[list[ModelResult]] = [[] for _ in decodings]
        for source in [base, *models]:
            engine = base_engine if source is base else loader.load(source)
            for params, out in zip(decodings, results):
                out.append(_evaluate_one(engine, base_engine, reward_engine, source, prompts, params, batch_size,
                                         decode))
                log.info("%s (temperature %g): judge %.3f, reward model %.3f, %.1f tokens, KL to the base %.3f",
                         source.name, params.temperature, out[-1].mean("judge"), out[-1].mean("rm"),
                         out[-1].mean("tokens"), out[-1].mean("kl"))
            if engine is not base_engine:
                engine.close()
        return results
    finally:
        loader.close()
