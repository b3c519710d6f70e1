"""``triarch ppo|grpo|rloo``: the RL run of one rank, with the same guarantees as pretraining.

Builds the models on one Topology (``rlhf.rl_loop``), each from its source: the actor from ``init.from``
(the SFT model), the frozen reference from the same weights, the frozen reward model from
``reward.model``, the critic from the reward model or the policy (``rl.critic_init``). ``train.steps``
iterations run; each logs one line of ``metrics.jsonl``. A checkpoint (``checkpoint.interval`` in
iterations, at the end, and on a stop request) holds the actor (``model.*``, ``optim.*``: exportable and
usable as ``init.from`` like any run), the critic (``critic.*``), both LR schedules, the KL controller, the
optimizer-step count and the sources of the frozen models; the prompt position is the iteration itself and
sampling is keyed by position, so a resumed run (on any layout) continues the same trajectory.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch.distributed as dist

from triarch.checkpointing.init_from import load_initial_weights, resolve_init_source, start_weights
from triarch.checkpointing.manager import CheckpointManager
from triarch.config import ConfigError, TriarchConfig, dump_config
from triarch.data_pipeline.errors import DataError
from triarch.engine.build import build_engine
from triarch.parallel.topology import Topology
from triarch.rlhf.prompts import PromptSource
from triarch.rlhf.rl_loop import RLIteration, RLModels
from triarch.training.data_checks import agree
from triarch.training.loggers import MetricsLogger
from triarch.training.metrics import window_peak_memory
from triarch.training.mfu import (
    device_peak_flops,
    flops_per_token,
    mfu,
    raise_cpu_peak,
    recompute_flops_per_token,
)
from triarch.training.run_control import RunControl

log = logging.getLogger("triarch.train")


def rule_reward(tokenizer_path: Path):
    """``reward.rule: judge`` on decoded text: (prompt ids, completion ids) -> score."""
    from tokenizers import Tokenizer

    from triarch.rlhf.judge import judge

    tokenizer = Tokenizer.from_file(str(tokenizer_path))

    def score(prompt: list[int], completion: list[int]) -> float:
        return judge(tokenizer.decode(prompt), tokenizer.decode(completion))

    return score


def open_prompts(cfg: TriarchConfig, topo: Topology) -> PromptSource:
    """The prompt source, checked against the model on every rank together (one line on failure)."""
    problem, prompts = None, None
    try:
        prompts = PromptSource(cfg.data.path, cfg.data.train_split, cfg.train.seed, train_split=cfg.data.train_split)
        problem = prompt_problem(cfg, prompts)
    except DataError as err:
        problem = str(err)
    agree(problem, topo.host_group)
    return prompts


def prompt_problem(cfg: TriarchConfig, prompts: PromptSource) -> str | None:
    """Why these prompts cannot be rolled out by this model, or None."""
    if prompts.vocab_size > cfg.model.vocab_size:
        return (f"data.path '{cfg.data.path}' uses a tokenizer of {prompts.vocab_size} tokens, more than "
                f"model.vocab_size ({cfg.model.vocab_size})")
    longest, new = prompts.max_prompt_len, cfg.rl.rollout.max_new_tokens
    if longest + new > cfg.model.seq_len:
        return (f"data.path '{cfg.data.path}' holds prompts of up to {longest} tokens: with "
                f"rl.rollout.max_new_tokens={new} they need {longest + new} positions, more than model.seq_len "
                f"({cfg.model.seq_len}); raise model.seq_len or prepare shorter prompts")
    if len(prompts.dataset) < cfg.rl.rollout.prompts:
        return (f"data.path '{cfg.data.path}' holds {len(prompts.dataset)} prompts, fewer than one iteration's "
                f"rl.rollout.prompts ({cfg.rl.rollout.prompts})")
    return None


def build_models(cfg: TriarchConfig, topo: Topology) -> RLModels:
    """The engines (random weights; the caller loads each one's source)."""
    kind = cfg.objective.kind
    actor = build_engine(cfg, topo)
    reference = build_engine(cfg, topo, trainable=False) if cfg.rl.kl_coef > 0 else None
    reward = build_engine(cfg, topo, trainable=False, head="score") if cfg.reward.kind == "model" else None
    critic = build_engine(cfg, topo, head="score") if kind == "ppo" else None
    return RLModels(actor=actor, critic=critic, reference=reference, reward=reward)


def train_rl(cfg: TriarchConfig, topo: Topology, run_dir: Path, control: RunControl | None, *,
             publish_config: bool):
    """Run ``cfg.train.steps`` RL iterations on this rank; returns a :class:`training.trainer.TrainSummary`."""
    from triarch.training.trainer import TrainSummary

    rank0 = dist.get_rank() == 0
    prompts = open_prompts(cfg, topo)
    models = build_models(cfg, topo)
    if rank0:
        log.info("%s on layout %s: actor%s%s%s, %d optimizer steps per iteration", cfg.objective.kind,
                 topo.describe(), " + critic" if models.critic else "", " + reference" if models.reference else "",
                 " + reward model" if models.reward else "", cfg.rl.epochs * (cfg.rl.rollout.prompts *
                                                                           cfg.rl.rollout.samples //
                                                                           cfg.train.global_batch_size))
    ck = cfg.checkpoint
    manager = CheckpointManager(run_dir, keep=ck.keep, keep_every=ck.keep_every, async_save=False,
                                host_group=topo.host_group)
    if control is not None:
        control.groups_ready()
    others = {"critic": models.critic} if models.critic is not None else {}
    loop = RLIteration(cfg, topo, models, prompts,
                       rule=rule_reward(prompts.tokenizer_path) if cfg.reward.kind == "rule" else None)
    start, first_loss = 0, float("nan")
    resume_from = manager.resume_point()
    if resume_from is not None:
        saved = manager.load(resume_from, models.actor, others=others)
        saved_kind = ((saved.get("config") or {}).get("objective") or {}).get("kind", "pretrain")
        if saved_kind != cfg.objective.kind:
            raise ConfigError(f"{run_dir} holds a {saved_kind} run (step {saved['step']}); objective.kind "
                              f"{cfg.objective.kind} cannot resume it: use a new --run-dir")
        start, first_loss = saved["step"], saved.get("first_loss", first_loss)
        init_from, reward_from = saved.get("init_from"), saved.get("reward_from")
        loop.kl.load_state_dict(saved["kl"])
        loop.optimizer_steps = saved["optimizer_steps"]
        for engine in (models.actor, *others.values()):
            engine.set_schedule_step(loop.optimizer_steps)
        if rank0:
            log.info("resumed from %s (iteration %d, saved with layout %s)", resume_from.path, start,
                     saved.get("layout"))
    else:
        init_from = start_weights(models.actor, cfg, topo.host_group)
        reward_from = resolve_init_source(cfg.reward.model, topo.host_group) if models.reward is not None else None
        if models.critic is not None:
            critic_from = reward_from if cfg.rl.critic_init == "reward" else init_from
            if critic_from is not None:
                load_initial_weights(models.critic, critic_from, topo.host_group)
    if models.reference is not None and init_from is not None:
        load_initial_weights(models.reference, init_from, topo.host_group)
    if models.reward is not None:
        load_initial_weights(models.reward, reward_from, topo.host_group)
    if publish_config and rank0:
        dump_config(cfg, run_dir / "config.yaml")
    peak = device_peak_flops(topo.device, cfg.train.precision, cfg.train.tf32)
    train_flops = flops_per_token(cfg.model)
    hardware_flops = train_flops + recompute_flops_per_token(cfg.model, cfg.train.activation_checkpoint)
    rows = cfg.rl.rollout.prompts * cfg.rl.rollout.samples
    final_loss, last = first_loss, start
    with MetricsLogger(run_dir, enabled=rank0, total_steps=cfg.train.steps, tensorboard=cfg.logging.tensorboard,
                       progress=cfg.logging.progress, start_step=start) as logger:
        for iteration in range(start, cfg.train.steps):
            step = iteration + 1
            began = time.perf_counter()
            result = loop.run(iteration)
            elapsed = time.perf_counter() - began
            metrics = result.metrics
            if step == 1:
                first_loss = metrics["loss"]
            final_loss, last = metrics["loss"], step
            trained_tokens = cfg.rl.epochs * rows * cfg.model.seq_len
            allocated, reserved = window_peak_memory(topo.device, topo.host_group)
            train_tokens_per_s = trained_tokens / max(metrics["train_s"], 1e-9)  # MFU of the training phase
            peak = raise_cpu_peak(peak, train_tokens_per_s * hardware_flops / topo.world_size)
            logger.log(step, {**metrics, "step_time_s": elapsed,
                              "tokens_per_s": (rows * cfg.model.seq_len) / elapsed,
                              "generate_fraction": metrics["generate_s"] / elapsed,
                              "mfu": mfu(train_tokens_per_s, train_flops, peak, topo.world_size),
                              "hfu": mfu(train_tokens_per_s, hardware_flops, peak, topo.world_size),
                              "mfu_source": peak.source,
                              "peak_mem_bytes": allocated, "peak_mem_reserved_bytes": reserved})
            if control is not None:
                control.progress()
            exiting = step == cfg.train.exit_at_step
            stopping = control is not None and control.should_stop(step) and step < cfg.train.steps
            if (ck.interval and (step % ck.interval == 0 or step == cfg.train.steps or exiting)) or stopping:
                manager.save(step, models.actor, {
                    "world_size": topo.world_size, "layout": topo.describe(), "first_loss": first_loss,
                    "config": cfg.model_dump(mode="json", by_alias=True), "init_from": init_from,
                    "reward_from": reward_from, "kl": loop.kl.state_dict(), "optimizer_steps": loop.optimizer_steps,
                    "data": {"consumed_prompts": step * cfg.rl.rollout.prompts}}, others=others)
            if exiting:
                log.info("stopping after iteration %d (train.exit_at_step)", step)
                break
            if stopping:
                log.info("saved iteration %d after %s; stopping", step, control.stop_reason)
                break
        manager.wait()
    stop_reason = control.stop_reason if control is not None and last < cfg.train.steps else None
    return TrainSummary(last, first_loss, final_loss, None, None, run_dir, stop_reason, start, cfg.train.steps)

