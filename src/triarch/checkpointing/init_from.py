"""``init.from``: a new run starts from another run's weights, or a Hugging Face folder's. Weights only.

A source is a run directory (its newest committed checkpoint that verifies, as resume picks one), one
checkpoint folder ``RUN_DIR/checkpoints/step_N`` (committed, verified), or ``hf:PATH`` (a Hugging Face
Llama folder, read in memory through the checks of ``triarch ckpt import --hf``; no run directory is
written). The step, LR schedule, optimizer state and data position start fresh. A run checkpoint loads
through DCP, so each rank reads only the shards its parameters hold, in any TP/PP/DP layout; from a HF
folder each rank reads the tensors of its own parameters one at a time and copies out its shard.

Between the source and this run's model:
- source with an LM head, this run a reward model (head ``score``): the trunk loads, ``output.weight`` is
  ignored and ``score.weight`` keeps its fresh initialization;
- source a reward model (``score.weight``), this run needs an LM head: refused;
- any tensor missing, extra or of another shape, or another head split: refused, naming the tensor, both
  shapes and the config key to change.

Every refusal is one :class:`InitSourceError` line (a ConfigError: ``triarch train`` exits 2), decided from
metadata alone (DCP ``.metadata``, safetensors headers, the saved config), identically on every rank and
before any collective that could wait for a rank that failed. :func:`check_init_source` makes the same
checks on the host before any rank starts (file sizes instead of hashes), so a refused run writes nothing.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.tensor import DTensor

from triarch.checkpointing.commit import COMMIT_FILE, CheckpointError, read_commit, verify, verify_files
from triarch.checkpointing.hf_folder import CONFIG_FILE, load_tensors
from triarch.checkpointing.hf_import import EMBEDDING, HEAD, check_tied_head, checked_hf_folder
from triarch.checkpointing.manager import TRAINER_STATE, CheckpointManager
from triarch.checkpointing.offline import MODEL_PREFIX, tensor_metadata
from triarch.checkpointing.safe_load import load_plain
from triarch.checkpointing.steps import STEP_PATTERN, list_steps
from triarch.config import ConfigError, TriarchConfig
from triarch.engine.interface import Engine
from triarch.engine.model_args import llama_args
from triarch.models.hf_llama import SCORE, hf_names
from triarch.models.llama import Llama, LlamaArgs
from triarch.parallel.init import local_indices

log = logging.getLogger("triarch.train")

HF_PREFIX = "hf:"
LM_HEAD = "output.weight"
EMBEDDING_NAME = "tok_embeddings.weight"
# LlamaArgs fields that decide tensor shapes or how they are read -> their config key
_SHAPE_KEYS = {"vocab_size": "model.vocab_size", "dim": "model.dim", "n_layers": "model.n_layers",
               "n_heads": "model.n_heads", "n_kv_heads": "model.n_kv_heads", "ffn_hidden": "model.ffn_hidden",
               "tie_embeddings": "model.tie_embeddings"}
_KEEP_ANY = 2  # CheckpointManager's minimum; nothing is saved or deleted through the source's manager


class InitSourceError(ConfigError):
    """``init.from`` names no usable source, or one that does not fit this run's model (one line)."""


@dataclass(frozen=True)
class InitSource:
    """A resolved ``init.from``: what it names, and the shapes of the weights it holds."""

    spec: str  # init.from as written
    resolved: str  # stable: the absolute step folder, or ``hf:`` + the absolute HF folder
    path: Path  # the step folder or the HF folder
    hf: bool
    shapes: dict[str, tuple[int, ...]]  # triarch parameter name -> full shape
    args: LlamaArgs | None  # the source's model shape, when its config says


def model_shapes(args: LlamaArgs) -> dict[str, tuple[int, ...]]:
    """Full shape of every parameter of a whole (unsplit) model, by canonical name (tied weights once)."""
    with torch.device("meta"):
        model = Llama(args)
    return {name: tuple(p.shape) for name, p in model.named_parameters()}


# ---------------------------------------------------------------------------------------------- resolve
def _fail(spec: str, message: str) -> InitSourceError:
    return InitSourceError(f"init.from {spec}: {message}")


def _problem(step_dir: Path, group: dist.ProcessGroup | None, *, hashes: bool) -> str | None:
    """Why a committed step cannot be used: checked by every rank together (``group``), or here alone."""
    if group is not None:
        return CheckpointManager(step_dir.parent, keep=_KEEP_ANY, host_group=group).verify_step(step_dir)
    try:
        if hashes:
            verify(step_dir)
        else:
            verify_files(step_dir, (read_commit(step_dir) or {}).get("files", {}), hashes=False)
    except (CheckpointError, OSError) as err:
        return str(err)
    return None


def _newest_usable(spec: str, run_dir: Path, group: dist.ProcessGroup | None, *, hashes: bool) -> Path:
    """The run's newest committed step that verifies (a partial or damaged one never counts)."""
    if group is not None:  # resume's own choice, agreed by every rank; rank 0 warns about each step skipped
        info = CheckpointManager(run_dir, keep=_KEEP_ANY, host_group=group).newest_usable()
        if info is None:
            raise _fail(spec, f"{run_dir} has no usable committed checkpoint")
        return info.path
    for info in reversed(list_steps(run_dir / "checkpoints")):
        if info.committed and _problem(info.path, None, hashes=hashes) is None:
            return info.path
    raise _fail(spec, f"{run_dir} has no usable committed checkpoint")


def _step_folder(spec: str, group: dist.ProcessGroup | None, *, hashes: bool) -> Path:
    """The checkpoint folder a run directory or step folder ``spec`` names."""
    path = Path(spec).expanduser().resolve()
    if not path.exists():
        raise _fail(spec, f"{path} does not exist (init.from takes a run directory, a checkpoint folder "
                          f"RUN_DIR/checkpoints/step_N, or hf:PATH)")
    if not path.is_dir():
        raise _fail(spec, f"{path} is a file, not a run directory or checkpoint folder")
    if STEP_PATTERN.match(path.name) or (path / ".metadata").exists() or (path / COMMIT_FILE).exists():
        if read_commit(path) is None:
            raise _fail(spec, f"{path} is not committed (no {COMMIT_FILE}): an unfinished save never counts")
        problem = _problem(path, group, hashes=hashes)
        if problem is not None:
            raise _fail(spec, f"{path} is unusable ({problem})")
        return path
    if (path / "checkpoints").is_dir():
        return _newest_usable(spec, path, group, hashes=hashes)
    if (path / CONFIG_FILE).is_file():
        raise _fail(spec, f"{path} looks like a Hugging Face folder; write init.from=hf:{spec}")
    raise _fail(spec, f"{path} is neither a run directory (it has no checkpoints folder) nor a checkpoint "
                      f"folder (step_N)")


def _saved_args(step_dir: Path) -> LlamaArgs | None:
    """The model shape in a checkpoint's saved config (None when it has none that validates)."""
    try:
        state = load_plain(step_dir / TRAINER_STATE)
        return llama_args(TriarchConfig.model_validate(state["config"]))
    except (CheckpointError, ValueError, KeyError, TypeError):
        return None


def describe_source(spec: str, group: dist.ProcessGroup | None = None, *, hashes: bool = True) -> InitSource:
    """Resolve ``init.from`` and read the shapes of its weights (metadata only). With ``group`` every rank
    verifies its share of a run checkpoint's files together; without, this process checks them
    (``hashes=False``: sizes only, the host's quick check)."""
    if spec.startswith(HF_PREFIX):
        folder = spec[len(HF_PREFIX):]
        if not folder:
            raise _fail(spec, "names no folder (write hf:PATH)")
        path = Path(folder).expanduser().resolve()
        if not path.is_dir():
            raise _fail(spec, f"{path} is not a folder" if path.exists() else f"{path} does not exist")
        try:
            args, _, _ = checked_hf_folder(path)
        except CheckpointError as err:
            raise _fail(spec, str(err)) from None
        return InitSource(spec, HF_PREFIX + str(path), path, True, model_shapes(args), args)
    step_dir = _step_folder(spec, group, hashes=hashes)
    try:
        metas = tensor_metadata(step_dir)
    except CheckpointError as err:
        raise _fail(spec, str(err)) from None
    shapes = {k[len(MODEL_PREFIX):]: tuple(m.size) for k, m in metas.items() if k.startswith(MODEL_PREFIX)}
    if not shapes:
        raise _fail(spec, f"{step_dir} holds no model weights")
    return InitSource(spec, str(step_dir), step_dir, False, shapes, _saved_args(step_dir))


def resolve_init_source(source: str, host_group: dist.ProcessGroup | None = None) -> str:
    """The stable name of what ``source`` loads: the absolute checkpoint folder (a run directory resolves
    to its newest usable committed step), or ``hf:`` + the absolute HF folder. Passing it back as
    ``init.from`` loads exactly the same weights (what a run records, e.g. for DPO's reference)."""
    return describe_source(source, host_group).resolved


# ---------------------------------------------------------------------------------------------- check
def _yaml(value: object) -> str:
    """A config value as an override spells it (``true``, not ``True``)."""
    return str(value).lower() if isinstance(value, bool) else str(value)


def _config_hint(source: InitSource, ours: LlamaArgs) -> str:
    """Which config keys to change so this run's model matches the source."""
    if source.args is None:
        return f"; {', '.join(_SHAPE_KEYS.values())} must match the source's"
    changes = [f"{key}={_yaml(getattr(source.args, field))} (this run has {_yaml(getattr(ours, field))})"
               for field, key in _SHAPE_KEYS.items() if getattr(source.args, field) != getattr(ours, field)]
    return f"; set {', '.join(changes)} to match it" if changes else ""


def fresh_parameters(source: InitSource, cfg: TriarchConfig, head: str | None = None) -> frozenset[str]:
    """Check ``source`` against this run's model (with ``head`` when it is not the objective's, e.g. a PPO
    critic); the parameters that keep their fresh initialization (the score head of a reward model or
    critic started from a language model). Raises :class:`InitSourceError`."""
    ours_args = llama_args(cfg, head)
    ours, theirs = model_shapes(ours_args), source.shapes
    if SCORE in theirs and SCORE not in ours:
        raise InitSourceError(f"init.from {source.spec} is a reward model (score head); objective.kind "
                              f"{cfg.objective.kind} needs a language-model head")
    fresh, ignored = set(), set()
    if SCORE in ours and SCORE not in theirs:
        fresh, ignored = {SCORE}, {LM_HEAD}
    hint = _config_hint(source, ours_args)
    if ours_args.tie_embeddings and LM_HEAD in theirs:
        if source.args is not None and not source.args.tie_embeddings and SCORE not in ours:
            raise _fail(source.spec, f"{source.resolved} has its own {LM_HEAD}, this run ties it to the "
                                     f"embedding{hint}")
        ignored.add(LM_HEAD)  # a tied source's head (the engine may hold it apart) loads into this run's head
    for name, shape in ours.items():
        if name in fresh:
            continue
        if name not in theirs:
            raise _fail(source.spec, f"{source.resolved} has no tensor {name} (shape {shape} here){hint}")
        if theirs[name] != shape:
            raise _fail(source.spec, f"tensor {name} is {theirs[name]} in {source.resolved}, {shape} in this "
                                     f"run's model{hint}")
    extra = sorted(set(theirs) - set(ours) - ignored)
    if extra:
        raise _fail(source.spec, f"{source.resolved} has tensor {extra[0]} {theirs[extra[0]]}, which this run's "
                                 f"model lacks{hint}")
    if source.args is not None and (source.args.n_heads, source.args.n_kv_heads) != (ours_args.n_heads,
                                                                                    ours_args.n_kv_heads):
        raise _fail(source.spec, f"the same shapes split into other attention heads{hint}")
    return frozenset(fresh)


def check_init_source(cfg: TriarchConfig, run_dir: Path) -> None:
    """Before any rank starts: refuse an ``init.from`` that names nothing usable or does not fit the model
    (one line). A run directory holding a committed checkpoint resumes and ignores ``init.from``."""
    if cfg.init.from_ is None or any(s.committed for s in list_steps(Path(run_dir) / "checkpoints")):
        return
    fresh_parameters(describe_source(cfg.init.from_, hashes=False), cfg)


# ---------------------------------------------------------------------------------------------- load
def _load_checkpoint(params: dict[str, torch.Tensor], source: InitSource, group: dist.ProcessGroup, *,
                     tied: bool) -> None:
    """DCP reads each rank's shards of the named parameters in place (every rank calls this)."""
    # A tied model's head, where the engine holds it as a parameter of its own, loads from the source's
    # output.weight, or from its embedding when the source has none (a second read: one key, two targets).
    aliased = tied and LM_HEAD not in source.shapes
    reads = [{MODEL_PREFIX + name: p.detach() for name, p in params.items() if not (aliased and name == LM_HEAD)}]
    if aliased:  # every rank reads twice (an empty read where it holds no head): DCP reads are collective
        reads.append({MODEL_PREFIX + EMBEDDING_NAME: p.detach() for name, p in params.items() if name == LM_HEAD})
    try:
        for state in reads:
            dcp.load(state, checkpoint_id=str(source.path), process_group=group)
    except (Exception, CheckpointException) as err:  # DCP gathers every rank's failure into one error
        text = str(err).strip()
        reason = text.splitlines()[-1] if text else type(err).__name__
        raise _fail(source.spec, f"loading {source.path} failed: {reason}") from None


@torch.no_grad()
def _copy_local(param: torch.Tensor, full: torch.Tensor) -> None:
    """Copy this rank's part of the full value ``full`` into ``param`` (a DTensor shard or a plain tensor)."""
    for dim, index in enumerate(local_indices(param)):
        full = full.index_select(dim, index)
    local = param.to_local() if isinstance(param, DTensor) else param
    local.copy_(full.to(local.dtype))


def _read_hf(params: dict[str, torch.Tensor], source: InitSource) -> str | None:
    """Read the folder one tensor at a time (so a rank holds at most one full tensor beyond its shards),
    each rank only the tensors of its own parameters; the problem found, if any."""
    try:
        args, weights, _ = checked_hf_folder(source.path)
        hf_of = {**hf_names(args.n_layers), SCORE: SCORE}
        if args.tie_embeddings:  # a tied head is the embedding (lm_head.weight, if present, must equal it)
            hf_of[LM_HEAD] = EMBEDDING
        for name, param in params.items():
            value = load_tensors(weights, [hf_of[name]])[hf_of[name]]
            if hf_of[name] == EMBEDDING and args.tie_embeddings and HEAD in weights.entries:
                check_tied_head(weights, load_tensors(weights, [HEAD])[HEAD], value, source.path / CONFIG_FILE)
            _copy_local(param, value)
    except CheckpointError as err:
        return str(err)
    return None


def _load_hf(params: dict[str, torch.Tensor], source: InitSource, group: dist.ProcessGroup) -> None:
    """Every rank reads its parameters' tensors from the HF folder; a problem on any rank ends them all."""
    problem = _read_hf(params, source)
    found: list[str | None] = [problem]
    if dist.get_world_size(group) > 1:
        found = [None] * dist.get_world_size(group)
        dist.all_gather_object(found, problem, group=group)
    first = next((p for p in found if p is not None), None)
    if first is not None:
        raise _fail(source.spec, first)


def _load(engine: Engine, source: str, host_group: dist.ProcessGroup) -> tuple[InitSource, frozenset[str]]:
    described = describe_source(source, host_group)
    fresh = fresh_parameters(described, engine.cfg, engine.args.head)
    params = {name: p for name, p in engine.model_state().items() if name not in fresh}
    if described.hf:
        _load_hf(params, described, host_group)
    else:
        _load_checkpoint(params, described, host_group, tied=engine.cfg.model.tie_embeddings)
    engine.state_loaded()
    return described, fresh


def _summary(source: InitSource, fresh: frozenset[str]) -> str:
    kept = f"; {', '.join(sorted(fresh))} keeps its fresh initialization" if fresh else ""
    ignored = f" ({LM_HEAD} of the source ignored)" if fresh and LM_HEAD in source.shapes else ""
    return f"init.from: weights of {source.resolved}{kept}{ignored}"


def load_initial_weights(engine: Engine, source: str, host_group: dist.ProcessGroup) -> str:
    """Load the weights ``source`` names into ``engine``'s chunks, whatever its layout (collective: every
    rank calls it). Returns one line saying what was loaded."""
    return _summary(*_load(engine, source, host_group))


def start_weights(engine: Engine, cfg: TriarchConfig, host_group: dist.ProcessGroup) -> str | None:
    """The weights of a run that starts without a checkpoint of its own: ``init.from`` when set (rank 0 logs
    what was loaded), else the random initialization (a warning for sft, rm and dpo). Returns the resolved
    source (:func:`resolve_init_source`) for the checkpoints to record, or None."""
    rank0 = dist.get_rank() == 0
    if cfg.init.from_ is None:
        if cfg.objective.kind != "pretrain" and rank0:
            log.warning("starting %s from random weights (no init.from)", cfg.objective.kind)
        return None
    source, fresh = _load(engine, cfg.init.from_, host_group)
    if rank0:
        log.info("%s", _summary(source, fresh))
    return source.resolved
