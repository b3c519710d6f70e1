"""``triarch submit``: validate a run against the requested nodes, render the sbatch job, submit it through
submitit, and remember where its run directory and logs are.

One task per GPU on GPU clusters (each with its share of the node's CPUs and memory, ``resources``),
``tasks_per_node`` tasks (default one) per node on CPU clusters. The job
asks SLURM for USR2 ``signal_delay_s`` before its time limit, requeues itself on preemption and, through
the batch script's teardown, after a failure while ``max_retries`` allows. With ``elastic`` it accepts any
node count from the smallest that fits TP×PP up to ``nodes``, and the data-parallel size follows.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import math
import re
import shlex
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from triarch.config import ConfigError, TriarchConfig, load_config, validate_for_world
from triarch.launcher.run_dir import usable_run_dir, write_attempt_config
from triarch.launcher.run_lock import LOCK_NAME, RunDirBusy, run_dir_lock
from triarch.slurm.commands import SlurmError, parse_duration_s
from triarch.slurm.job import TrainJob
from triarch.slurm.registry import JobRecord, active_job_for, register
from triarch.slurm.requeue import RequeuePolicy
from triarch.slurm.resources import partition_cpus_per_node, task_resources

LOG_DIR = "slurm"
_SLURM_MEMORY = re.compile(r"[0-9]+[KMGT]?", re.IGNORECASE)


@dataclass(frozen=True)
class SubmitOptions:
    """What ``triarch submit`` takes besides the config (SLURM's own names where there is one)."""

    nodes: int
    gpus_per_node: int = 0
    tasks_per_node: int | None = None
    partition: str | None = None
    time: str = "60"
    account: str | None = None
    qos: str | None = None
    exclusive: bool = False
    constraint: str | None = None
    mem: str | None = None
    cpus_per_task: int | None = None
    cpus_per_node: int | None = None  # the partition's, as sinfo reports them; None when unknown
    job_name: str | None = None
    max_retries: int = 0
    max_timeouts: int = 3
    signal_delay_s: int = 120
    elastic: bool = False
    sweep: dict[str, list[str]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.mem is not None and not _SLURM_MEMORY.fullmatch(self.mem):
            raise ConfigError(f"--mem '{self.mem}' is not a SLURM memory size (a whole number with an optional unit "
                              "K, M, G or T, e.g. 64G; 0 means all of each node's memory)")

    @property
    def ranks_per_node(self) -> int:
        return self.tasks_per_node or self.gpus_per_node or 1

    @property
    def world_size(self) -> int:
        return self.nodes * self.ranks_per_node


@dataclass(frozen=True)
class PlannedRun:
    """One run of a submission (a sweep has several): its config, overrides and run directory."""

    cfg: TriarchConfig
    run_dir: Path
    label: str


def parse_sweep(items: list[str]) -> dict[str, list[str]]:
    """``["train.lr=1e-3,3e-4", "train.seed=1,2"]`` -> {key: values}; one-line errors for bad items."""
    sweep: dict[str, list[str]] = {}
    for item in items:
        key, sep, values = item.partition("=")
        parts = [v for v in values.split(",") if v]
        if not sep or not key or not parts:
            raise ConfigError(f"--sweep '{item}' must look like key=v1,v2")
        repeated = sorted({v for v in parts if parts.count(v) > 1})
        if repeated:  # two array tasks would share one run directory
            raise ConfigError(f"--sweep '{item}' repeats {', '.join(repeated)}: each value must appear once")
        if key in sweep:
            raise ConfigError(f"--sweep {key} is given twice: list all its values in one --sweep")
        sweep[key] = parts
    return sweep


def plan_runs(config: str, overrides: list[str], run_dir: Path | None, options: SubmitOptions) -> list[PlannedRun]:
    """Load and validate every run of the submission against ``options.world_size`` ranks."""
    keys = list(options.sweep)
    combos = list(itertools.product(*(options.sweep[k] for k in keys))) if keys else [()]
    runs = []
    for combo in combos:
        extra = [f"{k}={v}" for k, v in zip(keys, combo, strict=True)]
        cfg = load_config(config, [*overrides, *extra])
        label = ",".join(extra)
        base = run_dir or Path("runs") / cfg.name
        target = base / label.replace("/", "_") if label else base
        runs.append(PlannedRun(check_layout(cfg, options), target, label))
    return runs


def check_layout(cfg: TriarchConfig, options: SubmitOptions) -> TriarchConfig:
    """The config that will be written: validated for the job's world (and, when elastic, for the smallest)."""
    validate_for_world(cfg, options.world_size)
    if not options.elastic:
        return cfg
    par = cfg.parallel
    if par.dp_replicate != 1:
        raise ConfigError(f"--elastic resizes the data-parallel shard group; it needs parallel.dp_replicate 1 "
                          f"(got {par.dp_replicate})")
    return cfg.model_copy(update={"parallel": par.model_copy(update={"dp_shard": -1})})


def time_limit(text: str) -> int | str:
    """``--time`` in whole minutes (what submitit expects), or UNLIMITED/INFINITE as given."""
    if text.upper() in ("UNLIMITED", "INFINITE"):
        return text.upper()
    seconds = parse_duration_s(text)
    if seconds is None or seconds <= 0:
        raise ConfigError(f"--time '{text}' is not a SLURM time limit (minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM "
                          "or D-HH:MM:SS)")
    return math.ceil(seconds / 60)


def min_nodes(cfg: TriarchConfig, options: SubmitOptions) -> int:
    """The fewest nodes an elastic job may restart on: the smallest node count whose world holds whole
    TP×PP replicas and divides the global batch (every rule of the layout holds)."""
    if not options.elastic:
        return options.nodes
    for nodes in range(1, options.nodes + 1):
        try:
            validate_for_world(cfg, nodes * options.ranks_per_node)
        except ConfigError:
            continue
        return nodes
    return options.nodes


def executor_parameters(options: SubmitOptions, runs: list[PlannedRun], python: str, min_node_count: int) -> dict[str, Any]:
    """submitit's SlurmExecutor parameters for the job (the sbatch options and the teardown)."""
    params: dict[str, Any] = {
        "job_name": options.job_name or f"triarch-{runs[0].cfg.name}",
        "nodes": options.nodes,
        "ntasks_per_node": options.ranks_per_node,
        "time": time_limit(options.time),
        "signal_delay_s": options.signal_delay_s,
        "comment": "triarch",
        "srun_args": ["--kill-on-bad-exit=1"],
        "setup": ["export PYTHONUNBUFFERED=1"],
        "teardown": ["triarch_exit=$?",
                     f"{python} -m triarch.slurm.after_job $triarch_exit {options.max_retries} "
                     + " ".join(shlex.quote(str(r.run_dir.resolve())) for r in runs),
                     "exit $?"],
        "additional_parameters": {"requeue": True},
    }
    if options.elastic and min_node_count < options.nodes:
        # a node range; SLURM sizes a range by its task count, so tasks are derived from the nodes granted
        params["additional_parameters"]["nodes"] = f"{min_node_count}-{options.nodes}"
        del params["ntasks_per_node"]
        per_node = options.ranks_per_node
        params["setup"] += [f"export SLURM_NTASKS_PER_NODE={per_node}",
                            f"export SLURM_NTASKS=$((SLURM_JOB_NUM_NODES * {per_node}))",
                            "export SLURM_NPROCS=$SLURM_NTASKS"]
    if options.gpus_per_node:
        params["gpus_per_node"] = options.gpus_per_node
    for key in ("partition", "account", "qos", "constraint"):
        value = getattr(options, key)
        if value is not None:
            params[key] = value
    resources = task_resources(options.gpus_per_node, options.ranks_per_node, cpus_per_node=options.cpus_per_node,
                               cpus_per_task=options.cpus_per_task, mem=options.mem, exclusive=options.exclusive)
    params.update(resources.sbatch)
    params["srun_args"] += resources.srun_args
    params["setup"] += resources.setup
    return params


def with_node_cpus(options: SubmitOptions) -> SubmitOptions:
    """``options`` with the partition's CPUs per node from sinfo, when a GPU job needs them to size its tasks
    and SLURM answers."""
    if not options.gpus_per_node or options.cpus_per_task is not None or options.cpus_per_node is not None:
        return options
    return replace(options, cpus_per_node=partition_cpus_per_node(options.partition))


def make_executor(folder: Path, params: dict[str, Any], python: str | None = None):  # noqa: ANN201 (submitit type)
    """A submitit SlurmExecutor writing logs under ``folder``."""
    import submitit

    try:
        executor = submitit.SlurmExecutor(folder=folder, python=python)
    except RuntimeError as err:  # no srun on PATH
        raise SlurmError(f"cannot submit: {err}") from None
    executor.update_parameters(**params)
    return executor


def render_sbatch(options: SubmitOptions, runs: list[PlannedRun], folder: Path, python: str) -> str:
    """The batch script submitit writes for this submission (``triarch submit --dry-run`` prints it); built
    by submitit's own renderer from the same parameters, so it needs no SLURM on this machine."""
    from submitit.slurm.slurm import _make_sbatch_string

    params = executor_parameters(options, runs, shlex.quote(python), min_nodes(runs[0].cfg, options))
    if len(runs) > 1:
        params["map_count"] = len(runs)
    command = " ".join([shlex.quote(python), "-u -m submitit.core._submit", shlex.quote(str(folder))])
    return _make_sbatch_string(command=command, folder=folder, **params)


def log_folder(runs: list[PlannedRun]) -> Path:
    """Where submitit keeps pickles and logs: inside the run directory (the sweep's parent for sweeps)."""
    base = runs[0].run_dir if len(runs) == 1 else runs[0].run_dir.parent
    return (base / LOG_DIR).resolve()


def submit(config: str, overrides: list[str], run_dir: Path | None, options: SubmitOptions) -> list[JobRecord]:
    """Validate, write each run's config, submit, register; returns one record per run."""
    runs = plan_runs(config, overrides, run_dir, options)
    for run in runs:
        busy = active_job_for(run.run_dir)
        if busy is not None:
            raise SlurmError(f"run directory {run.run_dir} already belongs to job {busy}, which is still queued or "
                             f"running; cancel it first (triarch cancel {busy})")
    folder = log_folder(runs)
    created = [path for path in dict.fromkeys((*(run.run_dir for run in runs), folder, folder.parent))
               if not path.exists()]  # (folder.parent: a sweep's own folder)
    kept = set(folder.iterdir()) if folder.is_dir() else set()
    python = shlex.quote(sys.executable)
    params = executor_parameters(options, runs, python, min_nodes(runs[0].cfg, options))
    executor = make_executor(folder, params)
    configs = [attempt_for(run) for run in runs]
    policy = RequeuePolicy(max_retries=options.max_retries, max_timeouts=options.max_timeouts,
                           signal_delay_s=options.signal_delay_s)
    jobs_in = [TrainJob(str(run.run_dir.resolve()), policy, str(config.resolve()))
               for run, config in zip(runs, configs, strict=True)]
    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured):
            jobs = executor.submit_array(jobs_in) if len(runs) > 1 else [executor.submit(jobs_in[0])]
    except Exception as err:  # submitit wraps sbatch's refusal; keep sbatch's own last line
        _forget_refused(configs, folder, kept, created)
        raise SlurmError(_sbatch_reason(str(err) or captured.getvalue(), options)) from None
    records = []
    for run, job in zip(runs, jobs, strict=True):
        record = JobRecord(job_id=str(job.job_id), run_dir=str(run.run_dir.resolve()), log_dir=str(folder),
                           tasks=options.world_size, label=run.label)
        register(record)
        records.append(record)
    return records


def _forget_refused(configs: list[Path], folder: Path, kept: set[Path], created: list[Path]) -> None:
    """Undo what a refused submission wrote: its attempt configs, submitit's new pickles in ``folder`` (not
    what was there before), and the folders it created when they are empty again. Nothing ran."""
    for config in configs:
        config.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            config.parent.rmdir()  # attempts/, when this was its only attempt
    for path in set(folder.iterdir()) - kept if folder.is_dir() else ():
        if path.is_file():
            path.unlink(missing_ok=True)
    for path in sorted(created, key=lambda p: len(p.resolve().parts), reverse=True):  # innermost first
        with contextlib.suppress(OSError):
            (path / LOCK_NAME).unlink(missing_ok=True)
            path.rmdir()


def attempt_for(run: PlannedRun) -> Path:
    """Check the run directory (usable, not held by a live local run) and write this attempt's config."""
    usable_run_dir(run.run_dir)
    try:
        with run_dir_lock(run.run_dir):
            return write_attempt_config(run.cfg, run.run_dir)
    except RunDirBusy as err:
        raise SlurmError(str(err)) from None


def _sbatch_reason(text: str, options: SubmitOptions) -> str:
    """sbatch's own last error line, with the options it was given (its messages omit the values)."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    errors = [ln for ln in lines if "error" in ln.lower()]
    reason = (errors or lines or ["no reason given"])[-1].removeprefix("sbatch: error: ")
    given = [f"--nodes {options.nodes}", f"--time {options.time}"] + [
        f"--{key.replace('_', '-')} {getattr(options, key)}" for key in
        ("partition", "account", "qos", "constraint", "mem") if getattr(options, key) is not None]
    return f"sbatch refused the job ({' '.join(given)}): {reason}"
