"""The step loop one rank runs: data -> engine step -> metrics, with periodic held-out evaluation."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from triarch.checkpointing.init_from import start_weights
from triarch.checkpointing.manager import CheckpointManager
from triarch.config import ConfigError, TriarchConfig, dump_config, validate_for_world
from triarch.data_pipeline.errors import DataError
from triarch.data_pipeline.stream.dali_stage import loader_stage
from triarch.engine.build import build_engine
from triarch.engine.interface import Engine
from triarch.parallel.topology import Topology
from triarch.profiling import scopes
from triarch.profiling.scopes import scope
from triarch.profiling.session import NoProfiler, StepProfiler
from triarch.training.data_checks import agree, integrity_problem, next_batch, placeholder_batch
from triarch.training.loggers import MetricsLogger
from triarch.training.metrics import ThroughputMeter, synchronize, window_peak_memory
from triarch.training.mfu import device_peak_flops, flops_per_token, recompute_flops_per_token
from triarch.training.run_control import RunControl
from triarch.training.stage import Stage, build_objective, build_reference, open_stream

log = logging.getLogger("triarch.train")


@dataclass(frozen=True)
class TrainSummary:
    """What a finished run reports (rank 0 prints it)."""

    steps: int
    first_loss: float
    final_loss: float
    first_eval_loss: float | None
    final_eval_loss: float | None
    run_dir: Path
    stop_reason: str | None = None
    start_step: int = 0  # where this attempt resumed
    target_steps: int = 0  # train.steps


def build_topology(cfg: TriarchConfig, device: torch.device, host: dist.ProcessGroup | None = None) -> Topology:
    """The run's Topology over the already-initialized default process group."""
    p = cfg.parallel
    return Topology.build(device, pp=p.pp, dp_replicate=p.dp_replicate, dp_shard=p.dp_shard, tp=p.tp, host=host)


class Evaluator:
    """Mean loss (and the objective's statistics) over a fixed set of held-out global batches (the same
    ones every time)."""

    def __init__(self, cfg: TriarchConfig, topo: Topology, stream: Any) -> None:
        size = cfg.train.global_batch_size
        self.stream, self.split = stream, cfg.data.eval_split
        self.group = topo.host_group
        available = self.stream.windows_per_epoch[0]
        self.n_batches = max(1, min(cfg.train.eval_batches, available // size))
        if available < size:
            log.warning("eval split has %d examples, fewer than one global batch (%d); repeating", available, size)

    def __call__(self, engine: Engine, stage: Stage) -> tuple[float, dict[str, float]]:
        problem = None
        try:  # every rank reads its batches first and agrees on their checks: none waits in a collective
            batches = [self.stream.batch_for_step(i) for i in range(self.n_batches)]
        except DataError as err:
            problem = str(err)
        agree(problem or self.stream.integrity_error(), self.group)
        losses, stats = [], []
        for b in batches:
            loss, values = engine.eval_step(b["input_ids"], stage.fields(b, self.split), stage.objective,
                                            position_ids=b.get("position_ids"))
            losses.append(loss)
            stats.append(values)
        means = {f"eval_{k}": sum(s[k] for s in stats) / len(stats) for k in stats[0]}
        return sum(losses) / len(losses), means


def _streams(cfg: TriarchConfig, topo: Topology) -> tuple[Any, Evaluator | None]:
    """The training stream and the evaluator; a data error on any rank (a missing or truncated shard) ends
    every rank together."""
    problem, data, evaluator = None, None, None
    try:
        data = open_stream(cfg, topo, cfg.data.train_split, training=True)
        if cfg.train.eval_interval > 0:
            evaluator = Evaluator(cfg, topo, open_stream(cfg, topo, cfg.data.eval_split, training=False))
    except DataError as err:
        problem = str(err)
    if problem is None and data.vocab_size > cfg.model.vocab_size:
        problem = (f"data.path '{cfg.data.path}' uses a tokenizer of {data.vocab_size} tokens, more than "
                   f"model.vocab_size ({cfg.model.vocab_size})")
    agree(problem, topo.host_group)
    return data, evaluator


def train(cfg: TriarchConfig, run_dir: Path, device: torch.device, control: RunControl | None = None, *,
          publish_config: bool = False) -> TrainSummary:
    """Train ``cfg.train.steps`` steps on this rank (the process group must exist). With ``control``, a stop
    request (a signal on any rank) ends every rank after the same step with a committed checkpoint.

    On resume the learning rate is a pure function of the step and the current config (a longer
    ``train.steps`` stretches the schedule from the resumed step on), and the data position is the count
    of sequences consumed so far, whatever global batch size earlier attempts used. With
    ``publish_config`` rank 0 writes the config as the run's ``config.yaml`` once the run is accepted
    (the resume checks passed), so a refused attempt leaves the run's config untouched."""
    cfg = validate_for_world(cfg, dist.get_world_size())
    topo = build_topology(cfg, device, control.host_group if control is not None else None)
    if cfg.objective.is_rl:
        from triarch.rlhf.rl_run import train_rl

        return train_rl(cfg, topo, run_dir, control, publish_config=publish_config)
    data, evaluator = _streams(cfg, topo)
    streams = [data] + ([evaluator.stream] if evaluator is not None else [])
    try:
        return _train(cfg, run_dir, device, control, topo, data, evaluator, streams, publish_config)
    finally:  # background hash threads end before the process does, whatever happened
        for stream in streams:
            stream.close()


def _train(cfg: TriarchConfig, run_dir: Path, device: torch.device, control: RunControl | None, topo: Topology,
           data: Any, evaluator: Evaluator | None, streams: list[Any], publish_config: bool) -> TrainSummary:
    """The step loop of :func:`train`."""
    rank0 = dist.get_rank() == 0
    trn = cfg.train
    engine = build_engine(cfg, topo)
    if rank0:
        log.info("layout %s, %d parameters on rank 0, %d micro-batches per step",
                 topo.describe(), engine.local_parameter_count(), engine.n_microbatches)
    ck = cfg.checkpoint
    manager = CheckpointManager(run_dir, keep=ck.keep, keep_every=ck.keep_every, async_save=ck.async_save and ck.interval > 0,
                                host_group=topo.host_group)
    if control is not None:
        control.groups_ready()
    start_step, first_eval, first_loss = 0, None, float("nan")
    init_from: str | None = None
    resume_from = manager.resume_point()
    if resume_from is not None:
        saved = manager.load(resume_from, engine)
        saved_kind = ((saved.get("config") or {}).get("objective") or {}).get("kind", "pretrain")
        if saved_kind != cfg.objective.kind:
            raise ConfigError(f"{run_dir} holds a {saved_kind} run (step {saved['step']}); objective.kind "
                              f"{cfg.objective.kind} cannot resume it: use a new --run-dir")
        if "data" in saved:
            data.load_state_dict(saved["data"])
        start_step, first_eval, first_loss = saved["step"], saved.get("first_eval_loss"), saved.get("first_loss", first_loss)
        engine.set_schedule_step(start_step)
        init_from = saved.get("init_from")  # a resumed run ignores init.from and keeps what it started from
        if rank0:
            log.info("resumed from %s (step %d, saved with layout %s)", resume_from.path, start_step, saved.get("layout"))
    else:  # init.from's weights (checked on the host already), or random ones
        init_from = start_weights(engine, cfg, topo.host_group)
    eval_streams = {cfg.data.train_split: data} | ({cfg.data.eval_split: evaluator.stream} if evaluator else {})
    stage = Stage(build_objective(cfg), build_reference(cfg, topo, run_dir, eval_streams, init_from, topo.host_group))
    if publish_config and rank0:
        dump_config(cfg, run_dir / "config.yaml")
    consumed_at_start = data.consumed_sequences  # sequences consumed before this attempt's first step
    meter = ThroughputMeter(flops_per_token(cfg.model), device_peak_flops(device, trn.precision, trn.tf32),
                           topo.world_size, recompute_flops_per_token(cfg.model, trn.activation_checkpoint))
    tokens_per_step = trn.global_batch_size * stage.rows_per_example * cfg.model.seq_len

    def consumed(step: int) -> int:  # the trained position after ``step`` (a prefetching stage reads ahead)
        return consumed_at_start + (step - start_step) * trn.global_batch_size

    def consumed_tokens(step: int) -> int:
        return consumed(step) * stage.rows_per_example * cfg.model.seq_len

    final_loss = first_loss
    final_eval = first_eval
    last_step = start_step
    with MetricsLogger(run_dir, enabled=rank0, total_steps=trn.steps, tensorboard=cfg.logging.tensorboard,
                       progress=cfg.logging.progress, start_step=start_step) as logger:
        if evaluator is not None and start_step == 0:
            first_eval, eval_stats = evaluator(engine, stage)
            final_eval = first_eval
            logger.log_eval(0, {"eval_loss": first_eval, **eval_stats})
        batches = iter(loader_stage(data.batches(trn.steps - start_step), cfg.data.loader))
        profiler = _profiler(cfg, run_dir, topo, start_step, tokens_per_step, meter)
        for step in range(start_step + 1, trn.steps + 1):
            with profiler.step(step):
                with scope(scopes.CHECKPOINT):
                    manager.poll()
                start = time.perf_counter()
                with scope(scopes.DATA):
                    batch, problem = next_batch(batches, streams)
                if batch is None:
                    batch = placeholder_batch(data)
                result = engine.train_step(batch["input_ids"], step=step, objective=stage.objective,
                                           fields=stage.fields(batch, cfg.data.train_split),
                                           position_ids=batch.get("position_ids"),
                                           stop_requested=control is not None and control.stop_requested,
                                           data_error=problem is not None)
                if result.data_error:  # some rank's data failed a check: every rank ends here, none stepped
                    agree(problem, topo.host_group)
                synchronize(device)
                elapsed = time.perf_counter() - start
                meter.update(tokens_per_step, elapsed)
                profiler.record(step, elapsed)
                if step == 1:
                    first_loss = result.loss
                final_loss, last_step = result.loss, step
                if step % cfg.logging.log_interval == 0 or step == trn.steps:
                    allocated, reserved = window_peak_memory(device, topo.host_group)
                    logger.log(step, {"loss": result.loss, "lr": result.lr, "grad_norm": result.grad_norm,
                                      **meter.window().as_metrics(), "peak_mem_bytes": allocated,
                                      "peak_mem_reserved_bytes": reserved, "consumed_tokens": consumed_tokens(step),
                                      **result.stats})
                if evaluator is not None and (step % trn.eval_interval == 0 or step == trn.steps):
                    with scope(scopes.EVALUATION):
                        final_eval, eval_stats = evaluator(engine, stage)
                    logger.log_eval(step, {"eval_loss": final_eval, **eval_stats})
                    if control is not None:
                        control.progress()
                interval = cfg.checkpoint.interval
                profiled = profiler.is_last(step)
                exiting = step == trn.exit_at_step or profiled
                stopping = control is not None and control.should_stop(step, agreed=result.stop) and step < trn.steps
                if (interval and (step % interval == 0 or step == trn.steps or exiting)) or stopping:
                    with scope(scopes.CHECKPOINT):
                        agree(integrity_problem(streams, wait=True), topo.host_group)  # never save after damaged data
                        manager.save(step, engine, {
                            "world_size": topo.world_size, "layout": topo.describe(),
                            "data": {**data.state_dict(), "consumed_sequences": consumed(step)},
                            "consumed_tokens": consumed_tokens(step), "first_loss": first_loss,
                            "first_eval_loss": first_eval, "config": cfg.model_dump(mode="json", by_alias=True),
                            "init_from": init_from})
                    if control is not None:
                        control.progress()
            if exiting:
                why = "the last profiled step" if profiled else "train.exit_at_step"
                log.info("stopping after step %d (%s)", step, why)
                break
            if stopping:
                manager.wait()  # committed before anyone requeues the job
                log.info("saved step %d after %s; stopping", step, control.stop_reason)
                break
        manager.wait()
        agree(integrity_problem(streams, wait=True), topo.host_group)  # no run ends well on damaged data
    stop_reason = control.stop_reason if control is not None and last_step < trn.steps else None
    return TrainSummary(last_step, first_loss, final_loss, first_eval, final_eval, run_dir, stop_reason,
                        start_step, trn.steps)


def _profiler(cfg: TriarchConfig, run_dir: Path, topo: Topology, start_step: int, tokens_per_step: int,
              meter: ThroughputMeter) -> NoProfiler | StepProfiler:
    """The loop's profiler: a profiling session when ``profile.enabled`` (``triarch profile``)."""
    prof = cfg.profile
    if not prof.enabled:
        return NoProfiler()
    first = start_step + prof.warmup + 1
    if first + prof.steps - 1 > cfg.train.steps:
        raise ConfigError(f"profile.warmup={prof.warmup} + profile.steps={prof.steps} from step {start_step} "
                          f"go past train.steps={cfg.train.steps}: raise train.steps or profile fewer steps")
    facts = {"layout": topo.describe(), "tokens_per_step": tokens_per_step, "flops_per_token": meter.flops_per_token,
             "recompute_flops_per_token": meter.recompute_flops_per_token, "peak": meter.peak,
             "world_size": topo.world_size}
    return StepProfiler(run_dir, first, prof.steps, topo.device, topo.host_group, facts)
