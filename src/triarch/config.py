"""Typed, validated run configuration: YAML files plus dotted command-line overrides.

Every rule raises :class:`ConfigError` with a one-line message naming the values and the rule.
Rules that need the world size live in :func:`validate_for_world` and run before any process group.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class ConfigError(ValueError):
    """A configuration problem, reported to the user as one line."""


class _ConfigLoader(yaml.SafeLoader):
    """YAML as configs mean it: a key given twice in one mapping is an error (YAML keeps the last silently),
    and dates stay text (``name: 2024-01-01`` is a run name, not a ``datetime.date``)."""

    yaml_implicit_resolvers = {first: [(tag, regexp) for tag, regexp in resolvers
                                       if tag != "tag:yaml.org,2002:timestamp"]
                               for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, str | int | float | bool) and key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key '{key}' is given twice in one mapping (line {key_node.start_mark.line + 1})",
                    key_node.start_mark)
            seen.add(key) if isinstance(key, str | int | float | bool) else None
        return super().construct_mapping(node, deep=deep)


def parse_yaml(text: str) -> Any:
    """``text`` read as YAML by the config's rules (:class:`_ConfigLoader`)."""
    return yaml.load(text, Loader=_ConfigLoader)  # noqa: S506 (a SafeLoader subclass)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


PositiveInt = Field(gt=0)


class ModelConfig(_Section):
    """Llama-family decoder shape."""

    name: str = "custom"
    vocab_size: int = Field(4096, gt=0)
    dim: int = Field(256, gt=0)
    n_layers: int = Field(4, gt=0)
    n_heads: int = Field(4, gt=0)
    n_kv_heads: int | None = Field(None, gt=0)
    ffn_hidden: int = Field(704, gt=0)
    seq_len: int = Field(256, gt=0)
    max_seq_len: int = Field(4096, gt=0)
    rope_theta: float = Field(10000.0, gt=0)
    norm_eps: float = Field(1e-5, gt=0)
    tie_embeddings: bool = False
    init_std: float = Field(0.02, gt=0)

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @model_validator(mode="after")
    def _check_shape(self) -> "ModelConfig":
        if self.dim % self.n_heads:
            raise ValueError(f"model.dim ({self.dim}) must be divisible by model.n_heads ({self.n_heads})")
        if self.n_heads % self.kv_heads:
            raise ValueError(
                f"model.n_heads ({self.n_heads}) must be divisible by model.n_kv_heads ({self.kv_heads})"
            )
        if (self.dim // self.n_heads) % 2:
            raise ValueError(f"head dim (model.dim / model.n_heads = {self.dim // self.n_heads}) must be even for rotary embeddings")
        if self.seq_len > self.max_seq_len:
            raise ValueError(f"model.seq_len ({self.seq_len}) exceeds model.max_seq_len ({self.max_seq_len})")
        return self


class ParallelConfig(_Section):
    """Layout: pp x dp_replicate x dp_shard x tp ranks (tp innermost). dp_shard=-1 fills the world.

    ``dp_grad_sync`` says when data-parallel gradients are reduced during gradient accumulation:
    ``every_microbatch`` reduce-scatters after each micro-batch, so only sharded gradients are held;
    ``last_microbatch`` skips the sync until the last micro-batch, saving n_micro - 1 reductions but holding
    the unsharded fp32 gradient of the whole stage (4 bytes per parameter / tp) between micro-batches;
    ``auto`` is every_microbatch when gradients are sharded (dp_shard > 1), else last_microbatch (a
    replicated gradient is full-size either way). With pp > 1, torch's pipeline schedules always reduce
    after the last micro-batch.

    ``fsdp_offload: cpu`` (native engine) is FSDP2's CPU offload policy: this rank's shards of the parameters,
    gradients and AdamW state live in host memory; each block's all-gather copies its shards to the device for
    forward and backward, gradients are reduced on the device and copied back, and the optimizer steps on the
    CPU. It lowers device memory to the gathered blocks and activations at the cost of host<->device copies
    and a CPU optimizer step (the deepspeed engine's counterpart: ``deepspeed.offload_*``).
    """

    tp: int = Field(1, gt=0)
    pp: int = Field(1, gt=0)
    dp_replicate: int = Field(1, gt=0)
    dp_shard: int = Field(-1, ge=-1)
    sequence_parallel: bool = True
    virtual_stages: int = Field(1, gt=0)
    schedule: Literal["1f1b", "interleaved_1f1b", "gpipe", "zero_bubble"] = "1f1b"
    dp_grad_sync: Literal["auto", "every_microbatch", "last_microbatch"] = "auto"
    fsdp_offload: Literal["none", "cpu"] = "none"

    @model_validator(mode="after")
    def _check(self) -> "ParallelConfig":
        if self.dp_shard == 0:
            raise ValueError("parallel.dp_shard (0) must be positive, or -1 to fill the world")
        if self.virtual_stages > 1 and self.schedule in ("1f1b", "gpipe"):
            raise ValueError(
                f"parallel.virtual_stages ({self.virtual_stages}) needs parallel.schedule "
                f"interleaved_1f1b or zero_bubble, not {self.schedule}"
            )
        return self


class TrainConfig(_Section):
    """Optimisation and step loop. ``exit_at_step`` ends this process after that step (saving a checkpoint
    when checkpointing is on); starting the run again continues it, as after a time limit. ``tf32`` lets
    float32 matmuls on CUDA use TF32 tensor cores (false: full FP32, and fp32 MFU against the plain FP32
    peak); it does nothing on CPU. ``precision: fp8`` runs the block matmuls in float8 with scales from
    ``fp8_recipe``: ``tensorwise`` (current scaling, one scale per tensor) and ``rowwise`` on the native engine
    (torchao); ``tensorwise``, ``delayed`` and ``mxfp8`` (Blackwell) on the megatron engine (Transformer Engine)."""

    steps: int = Field(100, gt=0)
    micro_batch_size: int = Field(4, gt=0)
    global_batch_size: int = Field(8, gt=0)
    precision: Literal["fp32", "bf16", "fp8"] = "fp32"
    fp8_recipe: Literal["tensorwise", "rowwise", "delayed", "mxfp8"] = "tensorwise"
    tf32: bool = True
    seed: int = Field(1234, ge=0)
    lr: float = Field(3e-4, gt=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    warmup_steps: int = Field(10, ge=0)
    decay: Literal["cosine", "linear", "constant"] = "cosine"
    decay_steps: int | None = Field(None, ge=0)
    weight_decay: float = Field(0.1, ge=0)
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.95, ge=0, lt=1)
    eps: float = Field(1e-8, gt=0)
    grad_clip: float = Field(1.0, ge=0)
    activation_checkpoint: Literal["none", "full", "selective"] = "none"
    compile: bool = False
    device: Literal["auto", "cpu", "cuda"] = "auto"
    eval_interval: int = Field(0, ge=0)
    eval_batches: int = Field(4, gt=0)
    exit_at_step: int | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _check(self) -> "TrainConfig":
        if self.global_batch_size % self.micro_batch_size:
            raise ValueError(
                f"train.global_batch_size ({self.global_batch_size}) must be divisible by "
                f"train.micro_batch_size ({self.micro_batch_size})"
            )
        decay = self.decay_steps if self.decay_steps is not None else max(self.steps - self.warmup_steps, 0)
        if self.warmup_steps + decay > self.steps:
            raise ValueError(
                f"learning-rate schedule (train.warmup_steps {self.warmup_steps} + train.decay_steps {decay}) "
                f"is longer than the run (train.steps {self.steps})"
            )
        return self

    @property
    def resolved_decay_steps(self) -> int:
        return self.decay_steps if self.decay_steps is not None else self.steps - self.warmup_steps


class BlendEntry(_Section):
    """One prepared dataset of a weighted blend."""

    path: str
    weight: float = Field(1.0, gt=0)


class DataConfig(_Section):
    """Where the prepared token shards live and how the stream reads them.

    ``blend`` (optional) lists several prepared folders with weights for training; ``path`` is then only
    used for evaluation. Paths may be local or fsspec URLs (``s3://bucket/prefix``). ``document_masks``
    gives the model per-document position ids, so rotary positions restart and attention stays inside each
    document packed into a row. ``verify_shards``: which shards are hashed in the background when first read
    (``local``: local ones, and remote ones up to 64 MiB; ``all``; ``off``); sizes and token ids are always
    checked (``data_pipeline.stream.shard_check``).
    """

    path: str = "data/pydocs"
    blend: list[BlendEntry] = []
    train_split: str = "train"
    eval_split: str = "validation"
    num_workers: int = Field(0, ge=0)
    shuffle_block: int | None = Field(None, gt=0)
    loader: Literal["default", "dali"] = "default"
    document_masks: bool = False
    verify_shards: Literal["local", "all", "off"] = "local"

    def train_datasets(self) -> list[tuple[str, float]]:
        """(path, weight) pairs the training stream blends."""
        return [(b.path, b.weight) for b in self.blend] or [(self.path, 1.0)]


class CheckpointConfig(_Section):
    """Checkpoint cadence (interval 0 disables saving); keep the last ``keep`` plus every ``keep_every``-th."""

    interval: int = Field(0, ge=0)
    keep: int = Field(2, ge=2)
    keep_every: int = Field(0, ge=0)
    async_save: bool = True


class LoggingConfig(_Section):
    """Metrics outputs."""

    log_interval: int = Field(1, gt=0)
    tensorboard: bool = True
    progress: Literal["auto", "on", "off"] = "auto"

    @field_validator("progress", mode="before")
    @classmethod
    def _yaml_booleans(cls, value: Any) -> Any:
        # YAML reads bare on/off as booleans
        return {True: "on", False: "off"}.get(value, value) if isinstance(value, bool) else value


class ProfileConfig(_Section):
    """``triarch profile`` (docs/profiling.md): after ``warmup`` steps of this attempt, ``steps`` steps run
    under torch.profiler; each rank writes its trace and step breakdown to ``RUN_DIR/profile/`` and the
    attempt ends after the last profiled step (saving a checkpoint when ``checkpoint.interval`` is set)."""

    enabled: bool = False
    warmup: int = Field(2, ge=0)
    steps: int = Field(3, gt=0)


class DeepSpeedConfig(_Section):
    """What is DeepSpeed's own on ``engine: deepspeed`` (docs/engine.md): the ZeRO stage (``parallel.dp_shard``
    is the ZeRO data-parallel degree), offload of optimizer state (stages 1-3) and parameters (stage 3) to CPU
    or NVMe (``nvme_path``, an existing folder), overlap and bucket sizes, and ``config_file``: an existing
    DeepSpeed JSON merged under these keys (its values for keys triarch sets must agree, or be "auto")."""

    zero_stage: Literal[1, 2, 3] = 2
    offload_optimizer: Literal["none", "cpu", "nvme"] = "none"
    offload_params: Literal["none", "cpu", "nvme"] = "none"
    nvme_path: str | None = Field(None, min_length=1)
    overlap_comm: bool = False
    reduce_bucket_size: int = Field(500_000_000, gt=0)
    allgather_bucket_size: int = Field(500_000_000, gt=0)
    config_file: str | None = Field(None, min_length=1)
    # torch_adamw: torch's fused AdamW steps the (offloaded) partitions, nothing compiles; deepspeed_cpu_adam:
    # DeepSpeed's AVX CPU Adam for offloaded state (JIT-compiled once per CPU model, about 90 s)
    optimizer: Literal["torch_adamw", "deepspeed_cpu_adam"] = "torch_adamw"


class FaultConfig(_Section):
    """Failure detection. A rank whose step loop makes no progress for ``hang_timeout_s`` (0 turns the
    watchdog off) makes every live rank dump its Python stacks and the job exit with a report naming the
    stuck rank; before the first step finishes the limit is ``startup_timeout_s`` (compilation, loading).
    Collectives time out after ``startup_timeout_s`` until the first step, ``collective_timeout_s`` after.
    The limits must exceed the longest step, evaluation or synchronous checkpoint save."""

    # at most 2e6 s (23 days): a process group's timeout in milliseconds must fit a C int
    hang_timeout_s: float = Field(900.0, ge=0, le=2e6)
    startup_timeout_s: float = Field(1800.0, gt=0, le=2e6)
    collective_timeout_s: float = Field(900.0, gt=0, le=2e6)
    heartbeat_interval_s: float | None = Field(None, gt=0)

    @property
    def beat_interval_s(self) -> float:
        """How often each rank writes its heartbeat (a tenth of the hang limit, at most 10 s)."""
        if self.heartbeat_interval_s is not None:
            return self.heartbeat_interval_s
        return min(10.0, max(0.2, self.hang_timeout_s / 10)) if self.hang_timeout_s else 10.0


class ObjectiveConfig(_Section):
    """What the run optimizes, and so its loss and batch layout (``docs/alignment.md``).

    ``pretrain``: next-token loss on packed token shards. ``sft``: the same loss on prepared SFT shards,
    counted on response tokens only. ``rm``: a Bradley-Terry reward model (a scalar head) on a prepared
    preference set, loss -log sigmoid(r_chosen - r_rejected [- margin]). ``dpo``: direct preference
    optimization against a frozen reference (the ``init.from`` weights), ``loss_type`` spelled as trl
    spells it; ``label_smoothing`` is the conservative-DPO noise rate (sigmoid only); ``reference``
    computes the reference log-probs each step (``online``) or once into the run directory
    (``precompute``). For ``rm``/``dpo``, ``train.micro_batch_size`` and ``train.global_batch_size``
    count pairs, and every pair's two rows stay in one micro-batch.
    """

    kind: Literal["pretrain", "sft", "rm", "dpo", "ppo", "grpo", "rloo"] = "pretrain"
    beta: float = Field(0.1, gt=0)
    loss_type: Literal["sigmoid", "ipo", "hinge"] = "sigmoid"
    label_smoothing: float = Field(0.0, ge=0, lt=0.5)
    reference: Literal["online", "precompute"] = "online"
    margin: bool = False

    @model_validator(mode="after")
    def _smoothing_is_for_sigmoid(self) -> "ObjectiveConfig":
        if self.label_smoothing > 0 and self.loss_type != "sigmoid":
            raise ValueError(f"objective.label_smoothing ({self.label_smoothing}) applies to loss_type sigmoid only, "
                             f"not {self.loss_type}")
        return self

    @property
    def uses_pairs(self) -> bool:
        """True for the objectives that read preference pairs."""
        return self.kind in ("rm", "dpo")

    @property
    def is_rl(self) -> bool:
        """True for the objectives that learn from their own rollouts (``rl`` and ``reward`` sections)."""
        return self.kind in RL_KINDS


RL_KINDS = ("ppo", "grpo", "rloo")


class RolloutConfig(_Section):
    """What one RL iteration generates: ``prompts`` (global, per iteration) x ``samples`` completions each,
    of at most ``max_new_tokens``, sampled at ``temperature`` with ``top_k`` / ``top_p`` (0 / 1.0: off)."""

    prompts: int = Field(16, gt=0)
    samples: int = Field(1, gt=0)
    max_new_tokens: int = Field(32, gt=0)
    temperature: float = Field(1.0, gt=0)
    top_k: int = Field(0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)


class RLConfig(_Section):
    """PPO, GRPO and RLOO (``docs/alignment.md``). Each iteration generates ``rollout.prompts *
    rollout.samples`` rows, then takes ``epochs`` passes over them in optimizer steps of
    ``train.global_batch_size`` rows (row ``j`` of the rollout belongs to minibatch ``j % minibatches``), so
    an iteration is ``epochs * rows / global_batch_size`` optimizer steps of the actor (and of the critic,
    for ppo); ``train.steps`` counts iterations and the LR schedule counts optimizer steps.

    ``clip`` / ``value_clip``: PPO's ratio and value clipping; ``entropy_coef``: entropy bonus; ``gamma`` /
    ``lam``: GAE; ``kl_coef`` with ``kl_estimator`` k1 or k3, applied in the per-token reward (``kl_in:
    reward``, PPO's classic form) or as a loss term (``loss``, GRPO's); ``kl_target`` turns on the adaptive
    controller (horizon ``kl_horizon`` samples); ``missing_eos_penalty`` is subtracted from the score of a
    completion cut at ``max_new_tokens``; ``critic_init``: the critic starts from the reward model
    (``reward``) or from the policy with a fresh value head (``policy``)."""

    rollout: RolloutConfig = RolloutConfig()
    epochs: int = Field(1, gt=0, le=100)  # passes over each rollout (a stop waits for the iteration's end)
    clip: float = Field(0.2, gt=0)
    value_clip: float = Field(0.2, gt=0)
    entropy_coef: float = Field(0.0, ge=0)
    gamma: float = Field(1.0, ge=0, le=1)
    lam: float = Field(0.95, ge=0, le=1)
    whiten_advantages: bool = True
    kl_coef: float = Field(0.05, ge=0)
    kl_estimator: Literal["k1", "k3"] = "k1"
    kl_in: Literal["reward", "loss"] = "reward"
    kl_target: float | None = Field(None, gt=0)
    kl_horizon: int = Field(10000, gt=0)
    missing_eos_penalty: float | None = None
    critic_init: Literal["reward", "policy"] = "reward"


class RewardConfig(_Section):
    """Where an RL iteration's scores come from: a frozen reward model (``kind: model``, ``model`` names a
    reward-model run directory, checkpoint folder or ``hf:PATH``) or a rule on the decoded text (``kind:
    rule``; ``rule: judge`` is ``rlhf.judge``)."""

    kind: Literal["model", "rule"] = "model"
    model: str | None = Field(None, min_length=1)
    rule: Literal["judge"] = "judge"


class InitConfig(_Section):
    """Where a new run's weights come from: ``from`` names a run directory (its newest committed
    checkpoint), one checkpoint folder (``RUN_DIR/checkpoints/step_N``) or ``hf:PATH`` (a Hugging Face
    Llama folder). Weights only: the step, LR schedule, optimizer and data position start fresh. A run that
    resumes ignores it and takes its own newest checkpoint; DPO's reference is always these weights."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, populate_by_name=True)

    from_: str | None = Field(None, alias="from", min_length=1)


class TriarchConfig(_Section):
    """The whole resolved configuration of one run."""

    # the run directory's name under runs/ (and the SLURM job's): letters, digits, '.', '_', '-'; not '.' or '..'
    name: str = Field("run", pattern=r"^[A-Za-z0-9._-]+$")
    engine: Literal["native", "megatron", "deepspeed"] = "native"
    model: ModelConfig = ModelConfig()
    parallel: ParallelConfig = ParallelConfig()
    train: TrainConfig = TrainConfig()
    data: DataConfig = DataConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    logging: LoggingConfig = LoggingConfig()
    fault: FaultConfig = FaultConfig()
    profile: ProfileConfig = ProfileConfig()
    deepspeed: DeepSpeedConfig = DeepSpeedConfig()
    objective: ObjectiveConfig = ObjectiveConfig()
    init: InitConfig = InitConfig()
    rl: RLConfig = RLConfig()
    reward: RewardConfig = RewardConfig()

    @model_validator(mode="after")
    def _profile_rules(self) -> "TriarchConfig":
        if self.profile.enabled and self.objective.is_rl:
            raise ValueError(f"profile.enabled profiles the step loop of pretrain, sft, rm and dpo runs; "
                             f"objective.kind {self.objective.kind} (rollout iterations) is not profiled yet")
        return self

    @model_validator(mode="after")
    def _rl_rules(self) -> "TriarchConfig":
        if not self.objective.is_rl:
            return self
        kind, rl = self.objective.kind, self.rl
        if self.reward.kind == "model" and self.reward.model is None:
            raise ValueError(f"reward.kind model needs reward.model (a reward-model run directory, checkpoint "
                             f"folder or hf:PATH) for objective.kind {kind}, or set reward.kind=rule")
        if kind in ("grpo", "rloo") and rl.rollout.samples < 2:
            raise ValueError(f"objective.kind {kind} compares several completions per prompt: "
                             f"rl.rollout.samples must be >= 2, got {rl.rollout.samples}")
        if kind == "ppo" and rl.critic_init == "reward" and self.reward.kind != "model":
            raise ValueError("rl.critic_init reward needs a reward model (reward.kind model); "
                             "set rl.critic_init=policy")
        if rl.rollout.max_new_tokens >= self.model.seq_len:
            raise ValueError(f"rl.rollout.max_new_tokens ({rl.rollout.max_new_tokens}) leaves no room for a "
                             f"prompt in model.seq_len ({self.model.seq_len})")
        rows = rl.rollout.prompts * rl.rollout.samples
        if rows % self.train.global_batch_size:
            raise ValueError(f"a rollout of rl.rollout.prompts*samples ({rl.rollout.prompts}*{rl.rollout.samples} "
                             f"= {rows}) rows must split into optimizer steps of train.global_batch_size "
                             f"({self.train.global_batch_size}) rows")
        return self

    @field_validator("name", mode="before")
    @classmethod
    def _number_names_are_text(cls, name: Any) -> Any:
        return str(name) if isinstance(name, int) and not isinstance(name, bool) else name  # name=2024 (YAML: int)

    @field_validator("name")
    @classmethod
    def _name_is_one_folder(cls, name: str) -> str:
        if name in (".", ".."):
            raise ValueError(f"name '{name}' is a folder, not a run name: use letters, digits, '.', '_', '-'")
        return name


# ----------------------------------------------------------------------------------------------
# Loading


def _section_fields(model_cls: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """Names of the fields valid at ``loc`` (the parent of an offending key)."""
    cls: Any = model_cls
    for part in loc:
        field = cls.model_fields.get(part) if isinstance(part, str) else None
        if field is None or not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)):
            return []
        cls = field.annotation
    return [field.alias or name for name, field in cls.model_fields.items()]


def _one_line(err: ValidationError) -> str:
    first = err.errors()[0]
    loc = tuple(first["loc"])
    dotted = ".".join(str(p) for p in loc)
    if first["type"] == "extra_forbidden":
        valid = _section_fields(TriarchConfig, loc[:-1])
        close = difflib.get_close_matches(str(loc[-1]), valid, n=1)
        parent = ".".join(str(p) for p in loc[:-1])
        hint = f" (did you mean '{parent + '.' if parent else ''}{close[0]}'?)" if close else ""
        return f"unknown config key '{dotted}'{hint}"
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "value_error":
        return msg
    return f"{dotted} = {first.get('input')!r}: {msg}"


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split ``a.b.c=value`` into its key path and a YAML-typed value."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like section.key=value")
    key, raw = text.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override '{text}' has an empty key part")
    try:
        value = parse_yaml(raw) if raw != "" and key != "name" else raw  # a run name is text as typed
        if isinstance(value, dict) and not raw.lstrip().startswith("{"):
            value = raw  # "init.from=hf:" is text; a mapping on the command line is written {a: 1}
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set each dotted override into the nested dict ``data`` (in place) and return it."""
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override '{text}': '{part}' is not a section")
            node = child
        node[path[-1]] = value
    return data


def config_from_dict(data: dict[str, Any]) -> TriarchConfig:
    """Validate a nested dict into a config, turning pydantic errors into one ConfigError line."""
    try:
        return TriarchConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_one_line(err)) from None


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> TriarchConfig:
    """Read a YAML config (or defaults when ``path`` is None), apply overrides, validate."""
    data: dict[str, Any] = {}
    if path is not None:
        data = read_config_file(Path(path))
    return config_from_dict(apply_overrides(data, overrides or []))


def read_config_file(p: Path) -> dict[str, Any]:
    """The mapping a YAML config file holds (``name`` defaults to the file's stem); one-line errors for a
    missing, unreadable, binary, non-UTF-8, empty or non-mapping file."""
    if p.is_dir():
        raise ConfigError(f"config file '{p}' is a folder; give a YAML file")
    if not p.is_file():
        raise ConfigError(f"config file '{p}' does not exist")
    try:
        raw = p.read_bytes()
    except OSError as err:
        raise ConfigError(f"config file '{p}' cannot be read: {err.strerror or err}") from None
    if b"\0" in raw:
        raise ConfigError(f"config file '{p}' is binary, not a YAML text file")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"config file '{p}' is not UTF-8 text (byte {err.start}); save it as UTF-8") from None
    try:
        loaded = parse_yaml(text)
    except yaml.YAMLError as err:
        lines = str(err).splitlines()
        reason = next((ln for ln in lines if "given twice" in ln), lines[0])
        raise ConfigError(f"config file '{p}' is not valid YAML: {reason}") from None
    if loaded is None or loaded == {}:
        raise ConfigError(f"config file '{p}' is empty; a run needs at least a model and a data path "
                          "(see examples/tiny.yaml)")
    if not isinstance(loaded, dict):
        raise ConfigError(f"config file '{p}' must hold a mapping at the top level, not a {type(loaded).__name__}")
    loaded.setdefault("name", p.stem)
    return loaded


def dump_config(cfg: TriarchConfig, path: str | Path) -> None:
    """Write the resolved config as YAML (temp file + rename)."""
    p = Path(path)
    tmp = p.with_suffix(p.suffix + ".tmp")
    tmp.write_text(yaml.safe_dump(cfg.model_dump(mode="json", by_alias=True), sort_keys=False))
    tmp.replace(p)


# ----------------------------------------------------------------------------------------------
# Rules that need the world size


def resolve_dp_shard(cfg: TriarchConfig, world_size: int) -> int:
    """The data-parallel shard degree, filling the world when ``parallel.dp_shard`` is -1."""
    par = cfg.parallel
    fixed = par.tp * par.pp * par.dp_replicate
    if par.dp_shard != -1:
        return par.dp_shard
    if world_size % fixed:
        raise ConfigError(
            f"world size ({world_size}) is not divisible by parallel.tp*pp*dp_replicate "
            f"({par.tp}*{par.pp}*{par.dp_replicate} = {fixed})"
        )
    return world_size // fixed


def validate_for_world(cfg: TriarchConfig, world_size: int) -> TriarchConfig:
    """Check every rule that involves the layout; return a copy with dp_shard resolved."""
    if world_size <= 0:
        raise ConfigError(f"world size ({world_size}) must be positive")
    par, mdl, trn = cfg.parallel, cfg.model, cfg.train
    dp_shard = resolve_dp_shard(cfg, world_size)
    product = par.tp * par.pp * par.dp_replicate * dp_shard
    if product != world_size:
        raise ConfigError(
            f"parallel.tp*pp*dp_replicate*dp_shard ({par.tp}*{par.pp}*{par.dp_replicate}*{dp_shard} = {product}) "
            f"must equal the world size ({world_size})"
        )
    if mdl.n_heads % par.tp:
        raise ConfigError(f"model.n_heads ({mdl.n_heads}) must be divisible by parallel.tp ({par.tp})")
    if mdl.kv_heads % par.tp and par.tp % mdl.kv_heads:
        raise ConfigError(
            f"model.n_kv_heads ({mdl.kv_heads}) and parallel.tp ({par.tp}) must divide one another "
            "(KV heads split across TP ranks, or each KV head replicated on tp / n_kv_heads ranks)"
        )
    if mdl.ffn_hidden % par.tp:
        raise ConfigError(f"model.ffn_hidden ({mdl.ffn_hidden}) must be divisible by parallel.tp ({par.tp})")
    if mdl.vocab_size % par.tp:
        raise ConfigError(f"model.vocab_size ({mdl.vocab_size}) must be divisible by parallel.tp ({par.tp})")
    if par.tp > 1 and par.sequence_parallel and mdl.seq_len % par.tp:
        raise ConfigError(
            f"model.seq_len ({mdl.seq_len}) must be divisible by parallel.tp ({par.tp}) with sequence parallel"
        )
    if mdl.tie_embeddings and par.pp > 1:
        raise ConfigError(
            f"model.tie_embeddings needs the embedding and the head on one stage; it cannot be used with "
            f"parallel.pp ({par.pp})"
        )
    chunks = par.pp * par.virtual_stages
    if mdl.n_layers % chunks:
        raise ConfigError(
            f"model.n_layers ({mdl.n_layers}) must be divisible by parallel.pp*virtual_stages "
            f"({par.pp}*{par.virtual_stages} = {chunks})"
        )
    dp = par.dp_replicate * dp_shard
    if trn.global_batch_size % (trn.micro_batch_size * dp):
        raise ConfigError(
            f"train.global_batch_size ({trn.global_batch_size}) must be divisible by "
            f"train.micro_batch_size*dp ({trn.micro_batch_size}*{dp} = {trn.micro_batch_size * dp})"
        )
    n_micro = trn.global_batch_size // (trn.micro_batch_size * dp)
    if par.pp > 1 and n_micro < par.pp:
        raise ConfigError(
            f"micro-batches per step ({n_micro}) must be at least the pipeline stages (parallel.pp {par.pp}) "
            f"for {par.schedule}; raise train.global_batch_size or lower train.micro_batch_size"
        )
    if par.pp > 1 and par.virtual_stages > 1 and n_micro % par.pp:
        raise ConfigError(
            f"micro-batches per step ({n_micro}) must be a multiple of parallel.pp ({par.pp}) "
            f"for interleaved schedules"
        )
    if cfg.objective.is_rl and cfg.rl.rollout.prompts % dp:
        raise ConfigError(f"rl.rollout.prompts ({cfg.rl.rollout.prompts}) must be divisible by the data-parallel "
                          f"size ({dp}): each data-parallel rank generates its own prompts")
    from triarch.engine.build import check_engine_config

    check_engine_config(cfg.model_copy(update={"parallel": par.model_copy(update={"dp_shard": dp_shard})}))
    return cfg.model_copy(update={"parallel": par.model_copy(update={"dp_shard": dp_shard})})
