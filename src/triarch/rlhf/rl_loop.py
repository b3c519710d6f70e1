"""One PPO / GRPO / RLOO iteration on one Topology: roll out on the actor's own shards, score, train.

Every model is an engine (``engine.interface``) sharded like the actor (TP, PP, DP as configured): the actor
(trainable, LM head), the critic (PPO only; trainable, score head), the frozen reference (when a KL term is
on) and the frozen reward model (``reward.kind: model``). An iteration:

1. each DP rank takes its share of the iteration's prompts (``rlhf.prompts``), ``rl.rollout.samples``
   completions each, and generates on the actor (``Engine.generate``); sampling is keyed by the
   row's global index in the run, so the rollout is the same on every layout;
2. scores: the reward model at each completion's last token (or the rule on the decoded text), minus
   ``missing_eos_penalty`` for completions cut at the token limit; per-token log-probs of the reference and
   values of the critic (forward only); results of the last pipeline stage are broadcast to the others;
3. advantages: PPO: per-token rewards (score at the last token, ``-kl_coef * KL`` per token when the KL is
   in the reward), GAE, whitening over the global batch; GRPO/RLOO: one advantage per completion from its
   group's scores, on every completion token;
4. ``rl.epochs`` passes of optimizer steps over fixed minibatches (row ``j`` of the global rollout belongs to
   minibatch ``j % minibatches``, the same rows on every layout): the actor's clipped policy loss, and for
   PPO the critic's clipped value loss;
5. the KL controller sees the iteration's mean per-sequence KL.

Metrics are means over the whole global batch, identical on every rank.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

import torch
import torch.distributed as dist
from torch import Tensor

from triarch.config import TriarchConfig
from triarch.engine.generation import SamplingParams
from triarch.engine.interface import Engine
from triarch.objectives.policy import PolicyObjective, ValueObjective, token_logprob_fn, value_fn
from triarch.objectives.preference import sequence_rewards
from triarch.objectives.rl_math import (
    AdaptiveKLController,
    FixedKLController,
    Moments,
    explained_variance,
    gae,
    grpo_advantages,
    kl_per_token,
    rloo_advantages,
    token_rewards,
    whiten,
)
from triarch.parallel.topology import Topology
from triarch.rlhf.prompts import PromptSource
from triarch.rlhf.rollout import RolloutRows, rollout_rows


@dataclass
class RLModels:
    """The engines of one RL run (``None``: not used by this configuration)."""

    actor: Engine
    critic: Engine | None = None
    reference: Engine | None = None
    reward: Engine | None = None


@dataclass
class IterationResult:
    """What one iteration reports: ``metrics`` (identical on every rank) and the rollout of this rank."""

    metrics: dict[str, float]
    rollout: RolloutRows
    scores: Tensor
    optimizer_steps: int = 0
    extra: dict = field(default_factory=dict)


def kl_controller(cfg: TriarchConfig) -> FixedKLController:
    rl = cfg.rl
    if rl.kl_target is not None:
        return AdaptiveKLController(rl.kl_coef, rl.kl_target, rl.kl_horizon)
    return FixedKLController(rl.kl_coef)


class RLIteration:
    """Runs iterations of ``cfg.objective.kind`` (ppo, grpo or rloo) on ``models``."""

    def __init__(self, cfg: TriarchConfig, topo: Topology, models: RLModels, prompts: PromptSource, *,
                 rule=None) -> None:
        self.cfg, self.topo, self.models, self.prompts = cfg, topo, models, prompts
        self.rule = rule  # (prompt ids, completion ids) -> score, for reward.kind rule
        self.kl = kl_controller(cfg)
        rl = cfg.rl
        self.kind = cfg.objective.kind
        self.rows = rl.rollout.prompts * rl.rollout.samples  # global rows per iteration
        self.minibatches = self.rows // cfg.train.global_batch_size
        self.kl_in_loss = rl.kl_in == "loss"
        self.optimizer_steps = 0

    # ------------------------------------------------------------------------------------------
    def _share(self, values: Tensor | None, like: Tensor) -> Tensor:
        """The last pipeline stage's ``values`` on every stage (same shape and dtype as ``like``)."""
        out = values.to(like.dtype) if values is not None else torch.zeros_like(like)
        if self.topo.pp > 1:  # on the device: the pipeline group is NCCL on GPUs
            group = self.topo.mesh["pp"].get_group()
            out = out.to(self.topo.device)
            dist.broadcast(out, src=dist.get_global_rank(group, self.topo.pp - 1), group=group)
        return out.cpu()

    def _dp_sum(self, values: list[float]) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=self.topo.device)
        if self.topo.dp > 1:
            dist.all_reduce(t, group=self.topo.dp_mesh.get_group())
        return t.tolist()

    def _moments(self, x: Tensor, mask: Tensor) -> Moments:
        m = Moments.of(x.cpu(), mask.cpu())
        return Moments(*self._dp_sum([m.count, m.total, m.squares]))

    # ------------------------------------------------------------------------------------------
    def _my_prompts(self, iteration: int) -> tuple[list[list[int]], Tensor]:
        """This DP rank's rows (each prompt ``samples`` times, adjacent) and their global sampling keys."""
        rl = self.cfg.rl.rollout
        per_rank = rl.prompts // self.topo.dp
        chosen = self.prompts.prompts(iteration, rl.prompts)[self.topo.dp_rank * per_rank:(self.topo.dp_rank + 1)
                                                             * per_rank]
        rows = [tokens for _, tokens in chosen for _ in range(rl.samples)]
        first = self.topo.dp_rank * per_rank * rl.samples
        keys = iteration * self.rows + first + torch.arange(len(rows))
        return rows, keys

    def _scores(self, prompts: list[list[int]], rollout: RolloutRows) -> Tensor:
        """Each completion's score (rows,) float64, penalized when it never reached EOS."""
        m = self.models
        if m.reward is not None:
            raw = m.reward.forward_rows(rollout.input_ids, {"labels": rollout.labels},
                                        lambda out, f: sequence_rewards(out, f["labels"]))
            scores = self._share(raw.cpu() if raw is not None else None,
                                 torch.zeros(len(prompts), dtype=torch.float64))
        else:
            completions = [row[mask].tolist() for row, mask in zip(rollout.labels, rollout.mask)]
            scores = torch.tensor([self.rule(p, c) for p, c in zip(prompts, completions)], dtype=torch.float64)
        penalty = self.cfg.rl.missing_eos_penalty
        if penalty is not None:
            scores = scores - penalty * (~rollout.ended).double()
        return scores

    def _per_token(self, engine: Engine | None, rollout: RolloutRows, fn) -> Tensor | None:
        if engine is None:
            return None
        like = torch.zeros(rollout.input_ids.shape, dtype=torch.float64)
        values = engine.forward_rows(rollout.input_ids, {"labels": rollout.labels}, fn, width=like.shape[1])
        return self._share(values.cpu() if values is not None else None, like)

    def _advantages(self, rollout: RolloutRows, scores: Tensor, kl: Tensor, values: Tensor | None
                    ) -> tuple[Tensor, Tensor | None]:
        """(advantages, returns or None) (rows, seq), zero outside the completions."""
        rl, mask = self.cfg.rl, rollout.mask
        if self.kind == "ppo":
            coef = 0.0 if self.kl_in_loss else self.kl.value
            rewards = token_rewards(scores, kl, mask, coef)
            advantages, returns = gae(rewards, values, mask, rl.gamma, rl.lam)
            if rl.whiten_advantages:
                advantages = whiten(advantages, mask, self._moments(advantages, mask))
            return advantages, returns
        # group advantages need every sample of a prompt: they sit on one DP rank (adjacent rows)
        per_row = scores if self.kl_in_loss else scores - self.kl.value * (kl * mask).sum(-1)
        group = rl.rollout.samples
        per_row = grpo_advantages(per_row, group) if self.kind == "grpo" else rloo_advantages(per_row, group)
        return per_row[:, None] * mask, None

    # ------------------------------------------------------------------------------------------
    def run(self, iteration: int) -> IterationResult:
        """One iteration (collective over every rank)."""
        cfg, m, rl = self.cfg, self.models, self.cfg.rl
        t0 = time.perf_counter()
        prompts, keys = self._my_prompts(iteration)
        params = SamplingParams(max_new_tokens=rl.rollout.max_new_tokens, temperature=rl.rollout.temperature,
                                top_k=rl.rollout.top_k, top_p=rl.rollout.top_p, seed=cfg.train.seed,
                                eos_id=self.prompts.eos_id, pad_id=self.prompts.pad_id)
        generation = m.actor.generate(prompts, params, prompt_index=keys)
        rollout = rollout_rows(prompts, generation, cfg.model.seq_len, self.prompts.pad_id, self.prompts.eos_id)
        if not m.actor.rollout_logprobs_exact:  # the ratio's old log-probs from the forward that trains
            own = self._per_token(m.actor, rollout, token_logprob_fn)
            rollout = replace(rollout, logprobs=(own * rollout.mask).float())
        t_generate = time.perf_counter()
        scores = self._scores(prompts, rollout)
        t_score = time.perf_counter()
        mask = rollout.mask
        ref = self._per_token(m.reference, rollout, token_logprob_fn)
        t_reference = time.perf_counter()
        values = self._per_token(m.critic, rollout, value_fn)
        old_logprobs = rollout.logprobs.double()
        kl_k1 = (old_logprobs - ref) * mask if ref is not None else torch.zeros_like(old_logprobs)
        kl = kl_per_token(old_logprobs, ref, rl.kl_estimator) * mask if ref is not None else kl_k1
        advantages, returns = self._advantages(rollout, scores, kl, values)
        t_values = time.perf_counter()
        stats = self._train(rollout, advantages, returns, values, ref)
        t_train = time.perf_counter()
        metrics = self._metrics(rollout, scores, kl_k1, values, returns, stats)
        self.kl.update(metrics["kl"], self.rows)
        metrics.update({"generate_s": t_generate - t0, "score_s": t_score - t_generate,
                        "reference_s": t_reference - t_score, "values_s": t_values - t_reference,
                        "train_s": t_train - t_values, "iteration_s": t_train - t0})
        return IterationResult(metrics, rollout, scores, self.optimizer_steps, stats)

    def _train(self, rollout: RolloutRows, advantages: Tensor, returns: Tensor | None, values: Tensor | None,
               ref: Tensor | None) -> dict[str, list[float]]:
        rl, m = self.cfg.rl, self.models
        policy = PolicyObjective(rl.clip, rl.entropy_coef, self.kl.value if self.kl_in_loss else 0.0,
                                 rl.kl_estimator)
        value = ValueObjective(rl.value_clip)
        local = rollout.input_ids.shape[0]
        out: dict[str, list[float]] = {}
        for _epoch in range(rl.epochs):
            for b in range(self.minibatches):
                rows = torch.arange(b, local, self.minibatches)
                fields = {"labels": rollout.labels[rows], "old_logprobs": rollout.logprobs[rows],
                          "advantages": advantages[rows].float()}
                if self.kl_in_loss and ref is not None:
                    fields["ref_logprobs"] = ref[rows].float()
                self.optimizer_steps += 1
                result = m.actor.train_step(rollout.input_ids[rows], step=self.optimizer_steps, objective=policy,
                                            fields=fields)
                _append(out, {"policy_loss": result.loss, "grad_norm": result.grad_norm, "lr": result.lr,
                              **result.stats})
                if m.critic is not None:
                    critic = m.critic.train_step(rollout.input_ids[rows], step=self.optimizer_steps, objective=value,
                                                 fields={"labels": rollout.labels[rows],
                                                         "old_values": values[rows].float(),
                                                         "returns": returns[rows].float()})
                    _append(out, {"value_loss": critic.loss, "critic_grad_norm": critic.grad_norm, **critic.stats})
        return out

    def _metrics(self, rollout: RolloutRows, scores: Tensor, kl: Tensor, values: Tensor | None,
                 returns: Tensor | None, stats: dict[str, list[float]]) -> dict[str, float]:
        mask = rollout.mask
        lengths = rollout.response_lengths.double()
        seq_kl = kl.sum(-1)
        sums = self._dp_sum([float(len(scores)), float(scores.sum()), float((scores ** 2).sum()),
                             float(seq_kl.sum()), float(lengths.sum()), float(rollout.ended.double().sum())])
        n, total, squares, kl_sum, length_sum, ended = sums
        mean = total / n
        out = {"reward_mean": mean, "reward_std": max(squares / n - mean * mean, 0.0) ** 0.5 * (n / max(n - 1, 1)) ** 0.5,
               "kl": kl_sum / n, "kl_coef": self.kl.value, "response_length": length_sum / n, "eos_fraction": ended / n,
               "generated_tokens": length_sum}
        if values is not None and returns is not None:
            out["explained_variance"] = explained_variance(self._moments(returns - values, mask),
                                                           self._moments(returns, mask))
        for name, series in stats.items():
            out[name] = sum(series) / len(series)
        out["loss"] = out.pop("policy_loss")
        return out


def _append(out: dict[str, list[float]], values: dict[str, float]) -> None:
    for k, v in values.items():
        out.setdefault(k, []).append(v)
