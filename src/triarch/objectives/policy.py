"""The policy and value objectives of PPO / GRPO / RLOO for the engine's step (``objectives.base``).

Both normalize by the global count of completion tokens in the optimizer step (a token mean). Fields, all
(rows, seq) in label positions: ``labels`` (completion tokens, else ``IGNORE_INDEX``), ``old_logprobs``
(the rollout's), ``advantages``, and for a KL loss term ``ref_logprobs``; the critic reads ``old_values``
and ``returns``. Under tensor parallelism the log-probs and the entropy are computed on vocabulary-sharded
logits (loss parallel): full logits never exist on a rank.
"""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor

from triarch.labels import IGNORE_INDEX
from triarch.objectives.base import Fields
from triarch.objectives.rl_math import kl_per_token, policy_loss_terms, value_loss_terms
from triarch.objectives.token_loss import token_log_probs

POLICY_STATS = ("clip_fraction", "approx_kl", "entropy", "ratio", "kl_loss")
VALUE_STATS = ("value_clip_fraction", "value_mean")


def _plain(value: torch.Tensor) -> torch.Tensor:
    return value.full_tensor() if isinstance(value, DTensor) else value


def token_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Per-position entropy of the next-token distribution, (rows, seq) float32, as log S - T / S with
    S = sum exp(z), T = sum exp(z) z, z = logits - max: only sums over the vocabulary, so vocabulary-sharded
    logits reduce with one all-reduce each and differentiate correctly (loss parallel's log_softmax
    backward assumes an NLL loss follows it)."""
    x = logits.float()
    z = x - x.detach().amax(-1, keepdim=True)
    e = z.exp()
    total, weighted = _plain(e.sum(-1)), _plain((e * z).sum(-1))
    return total.log() - weighted / total


class _TokenMean:
    rows_per_example = 1

    def units(self, fields: Fields) -> torch.Tensor:
        return (fields["labels"] != IGNORE_INDEX).sum()

    def units_bound(self, fields: Fields) -> int:
        return fields["labels"].numel()


class PolicyObjective(_TokenMean):
    """Clipped surrogate loss, minus ``entropy_coef`` x entropy, plus ``kl_coef`` x KL to the reference when
    the KL is a loss term (GRPO's form; ``kl_coef`` 0 otherwise)."""

    stat_names = POLICY_STATS

    def __init__(self, clip: float, entropy_coef: float = 0.0, kl_coef: float = 0.0, kl_estimator: str = "k3") -> None:
        self.clip, self.entropy_coef, self.kl_coef, self.kl_estimator = clip, entropy_coef, kl_coef, kl_estimator

    def loss(self, output: torch.Tensor, fields: Fields) -> tuple[torch.Tensor, torch.Tensor]:
        labels = fields["labels"]
        mask = (labels != IGNORE_INDEX).float()
        logprobs = _plain(token_log_probs(output, labels))
        terms, clipped, approx_kl = policy_loss_terms(logprobs, fields["old_logprobs"].float(),
                                                      fields["advantages"].float(), self.clip)
        loss = (terms * mask).sum()
        entropy = token_entropy(output) if self.entropy_coef > 0 else token_entropy(output.detach())
        if self.entropy_coef > 0:
            loss = loss - self.entropy_coef * (entropy * mask).sum()
        kl = torch.zeros_like(logprobs)
        if self.kl_coef > 0:
            kl = kl_per_token(logprobs, fields["ref_logprobs"].float(), self.kl_estimator)
            loss = loss + self.kl_coef * (kl * mask).sum()
        ratio = torch.exp((logprobs - fields["old_logprobs"].float()).detach())
        stats = torch.stack([(clipped * mask).sum(), (approx_kl * mask).sum(), (entropy.detach() * mask).sum(),
                             (ratio * mask).sum(), (kl.detach() * mask).sum()])
        return loss, stats


class ValueObjective(_TokenMean):
    """Clipped value loss of the critic's per-position values against the GAE returns."""

    stat_names = VALUE_STATS

    def __init__(self, clip: float) -> None:
        self.clip = clip

    def loss(self, output: torch.Tensor, fields: Fields) -> tuple[torch.Tensor, torch.Tensor]:
        mask = (fields["labels"] != IGNORE_INDEX).float()
        values = _plain(output).float().squeeze(-1)
        terms, clipped = value_loss_terms(values, fields["old_values"].float(), fields["returns"].float(), self.clip)
        stats = torch.stack([(clipped * mask).sum(), (values.detach() * mask).sum()])
        return (terms * mask).sum(), stats


def token_logprob_fn(output: torch.Tensor, fields: Fields) -> torch.Tensor:
    """Per-token log-probs of ``labels`` for ``Engine.forward_rows(width=seq)``."""
    return _plain(token_log_probs(output, fields["labels"]))


def value_fn(output: torch.Tensor, fields: Fields) -> torch.Tensor:
    """Per-position values of a score-head engine for ``Engine.forward_rows(width=seq)``."""
    return _plain(output).float().squeeze(-1)
