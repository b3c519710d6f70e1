"""The formulas of PPO, GRPO and RLOO on per-token tensors (testable against the papers).

Every per-token tensor is (rows, seq) in *label positions*: position ``t`` holds the quantity of the token
predicted there (token ``t + 1``), and ``mask`` (bool) marks the response tokens. Nothing here knows
about parallelism: sums that must cover the whole global batch (whitening, explained variance) take
already-reduced moments from the caller (``Moments``).

- KL to the reference, per token, from log-probs: k1 = log pi - log ref; k3 = (ref / pi) - 1 - log(ref / pi)
  (Schulman 2020, "Approximating KL divergence"): unbiased and non-negative.
- GAE (Schulman et al. 2016): delta_t = r_t + gamma V_{t+1} - V_t, A_t = sum_l (gamma lam)^l delta_{t+l},
  with V = 0 after a sequence's last token; returns = A + V.
- PPO-clip (Schulman et al. 2017): per token -min(rho A, clip(rho, 1 - eps, 1 + eps) A), rho = pi / pi_old;
  value loss 0.5 max((V - R)^2, (V_old + clip(V - V_old, -eps_v, eps_v) - R)^2).
- Adaptive KL controller (Ziegler et al. 2019): beta *= 1 + clip(KL / target - 1, -0.2, 0.2) * n / horizon.
- GRPO (Shao et al. 2024): A_i = (r_i - mean(r_group)) / (std(r_group) + eps), the same for every token of
  sample i; RLOO (Ahmadian et al. 2024): A_i = r_i - mean of the other k - 1 samples' rewards.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

KL_ESTIMATORS = ("k1", "k3")


def kl_per_token(logprobs: Tensor, ref_logprobs: Tensor, estimator: str) -> Tensor:
    """Per-token KL(pi || ref) estimate from the sampled tokens' log-probs."""
    log_ratio = logprobs - ref_logprobs
    if estimator == "k1":
        return log_ratio
    if estimator == "k3":
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"KL estimator must be one of {KL_ESTIMATORS}, got {estimator!r}")


def token_rewards(scores: Tensor, kl: Tensor, mask: Tensor, kl_coef: float) -> Tensor:
    """Per-token rewards: -kl_coef * KL on every response token plus the sequence's score on its last."""
    rewards = -kl_coef * kl * mask
    last = last_positions(mask)
    return rewards.scatter_add(1, last[:, None], scores[:, None].to(rewards.dtype))


def last_positions(mask: Tensor) -> Tensor:
    """Per row, the label position of its last response token (rows without any: 0)."""
    positions = torch.arange(mask.shape[1], device=mask.device)
    return (mask * (positions + 1)).amax(-1).clamp(min=1) - 1


def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """(advantages, returns), zero outside ``mask``; the value after a row's last response token is 0."""
    rewards, values, m = rewards * mask, values * mask, mask.to(values.dtype)
    advantages = torch.zeros_like(values)
    running = torch.zeros_like(values[:, 0])
    next_value = torch.zeros_like(values[:, 0])
    for t in reversed(range(values.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = delta + gamma * lam * running
        running = running * m[:, t]  # outside the response nothing accumulates
        advantages[:, t] = running
        next_value = torch.where(mask[:, t], values[:, t], torch.zeros_like(next_value))
    return advantages, (advantages + values) * m


@dataclass(frozen=True)
class Moments:
    """Count, sum and sum of squares of a masked quantity over the whole global batch."""

    count: float
    total: float
    squares: float

    @classmethod
    def of(cls, x: Tensor, mask: Tensor) -> Moments:
        x = x.double() * mask
        return cls(float(mask.sum()), float(x.sum()), float((x * x).sum()))

    def mean(self) -> float:
        return self.total / max(self.count, 1.0)

    def var(self) -> float:
        """The unbiased variance (n - 1), as torch.var."""
        n = self.count
        return max(self.squares - self.total * self.total / max(n, 1.0), 0.0) / max(n - 1.0, 1.0)


def whiten(x: Tensor, mask: Tensor, moments: Moments, *, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """(x - mean) / std over the masked entries of the global batch (``moments``); zero outside the mask."""
    std = max(moments.var(), 0.0) ** 0.5
    out = (x - moments.mean()) / (std + eps) if shift_mean else x / (std + eps)
    return out * mask


def policy_loss_terms(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, clip: float
                      ) -> tuple[Tensor, Tensor, Tensor]:
    """Per-token (clipped surrogate loss, clipped indicator, approx-KL k3 of old vs new)."""
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip, 1.0 + clip)
    loss = torch.maximum(unclipped, clipped)
    return loss, (clipped > unclipped).float(), (torch.expm1(-log_ratio) + log_ratio).detach()


def value_loss_terms(values: Tensor, old_values: Tensor, returns: Tensor, clip: float) -> tuple[Tensor, Tensor]:
    """Per-token (clipped value loss 0.5 max(...), clipped indicator)."""
    clipped_values = old_values + torch.clamp(values - old_values, -clip, clip)
    plain, clipped = (values - returns) ** 2, (clipped_values - returns) ** 2
    return 0.5 * torch.maximum(plain, clipped), (clipped > plain).float()


def explained_variance(residual: Moments, returns: Moments) -> float:
    """1 - Var(returns - values) / Var(returns), from the moments of the residual and of the returns."""
    var = returns.var()
    return float("nan") if var == 0 else 1.0 - residual.var() / var


class FixedKLController:
    """A constant KL coefficient."""

    def __init__(self, value: float) -> None:
        self.value = value

    def update(self, kl: float, n_steps: int) -> None:
        """Nothing changes."""

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])


class AdaptiveKLController(FixedKLController):
    """Moves the coefficient so the measured KL approaches ``target`` over ``horizon`` samples."""

    def __init__(self, value: float, target: float, horizon: int) -> None:
        super().__init__(value)
        self.target, self.horizon = target, horizon

    def update(self, kl: float, n_steps: int) -> None:
        error = min(max(kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon


def grpo_advantages(rewards: Tensor, group: int, eps: float = 1e-6, *, scale: bool = True) -> Tensor:
    """Group-normalized advantages of (prompts * group,) rewards, samples of a prompt adjacent."""
    r = rewards.view(-1, group)
    centered = r - r.mean(-1, keepdim=True)
    if scale:
        centered = centered / (r.std(-1, keepdim=True) + eps)
    return centered.reshape(-1)


def rloo_advantages(rewards: Tensor, group: int) -> Tensor:
    """Leave-one-out baselines: each sample's reward minus the mean of its group's other samples."""
    if group < 2:
        raise ValueError(f"RLOO needs at least 2 samples per prompt, got {group}")
    r = rewards.view(-1, group)
    return (r - (r.sum(-1, keepdim=True) - r) / (group - 1)).reshape(-1)
