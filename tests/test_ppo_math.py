"""PPO, GRPO and RLOO formulas against direct implementations on fixed tensors (``objectives.rl_math``)."""

from __future__ import annotations

import math

import pytest
import torch

from triarch.objectives.rl_math import (
    AdaptiveKLController,
    FixedKLController,
    Moments,
    explained_variance,
    gae,
    grpo_advantages,
    kl_per_token,
    policy_loss_terms,
    rloo_advantages,
    token_rewards,
    value_loss_terms,
    whiten,
)

GEN = torch.Generator().manual_seed(0)
ROWS, SEQ = 3, 9
# response tokens at label positions: row 0 -> 2..6, row 1 -> 4..8, row 2 -> 1..3
SPANS = [(2, 7), (4, 9), (1, 4)]
MASK = torch.zeros(ROWS, SEQ, dtype=torch.bool)
for _r, (_a, _b) in enumerate(SPANS):
    MASK[_r, _a:_b] = True
REWARDS = torch.randn(ROWS, SEQ, generator=GEN, dtype=torch.float64)
VALUES = torch.randn(ROWS, SEQ, generator=GEN, dtype=torch.float64)


def test_gae_equals_the_textbook_sum_per_row() -> None:
    gamma, lam = 0.97, 0.9
    adv, ret = gae(REWARDS, VALUES, MASK, gamma, lam)
    for r, (a, b) in enumerate(SPANS):
        rew, val = REWARDS[r, a:b].tolist(), VALUES[r, a:b].tolist() + [0.0]
        deltas = [rew[t] + gamma * val[t + 1] - val[t] for t in range(b - a)]
        for t in range(b - a):
            expected = sum((gamma * lam) ** l * deltas[t + l] for l in range(b - a - t))
            assert adv[r, a + t].item() == pytest.approx(expected, abs=1e-12)
            assert ret[r, a + t].item() == pytest.approx(expected + val[t], abs=1e-12)
    assert not adv[~MASK].any() and not ret[~MASK].any()


def test_gae_with_gamma_lambda_one_is_reward_to_go_minus_value() -> None:
    adv, _ = gae(REWARDS, VALUES, MASK, 1.0, 1.0)
    for r, (a, b) in enumerate(SPANS):
        for t in range(a, b):
            assert adv[r, t].item() == pytest.approx(REWARDS[r, t:b].sum().item() - VALUES[r, t].item(), abs=1e-12)


def test_whitening_uses_the_masked_global_moments() -> None:
    x = torch.randn(ROWS, SEQ, generator=GEN, dtype=torch.float64)
    selected = x[MASK]
    out = whiten(x, MASK, Moments.of(x, MASK))
    assert out[MASK].tolist() == pytest.approx(((selected - selected.mean()) / (selected.std() + 1e-8)).tolist())
    assert not out[~MASK].any()
    kept_mean = whiten(x, MASK, Moments.of(x, MASK), shift_mean=False)
    assert kept_mean[MASK].tolist() == pytest.approx((selected / (selected.std() + 1e-8)).tolist())
    halves = [Moments.of(x[:1], MASK[:1]), Moments.of(x[1:], MASK[1:])]  # as if two DP ranks
    merged = Moments(*(sum(getattr(h, f) for h in halves) for f in ("count", "total", "squares")))
    assert merged.var() == pytest.approx(selected.var().item()) and merged.mean() == pytest.approx(selected.mean().item())


def test_clipped_policy_loss_and_indicators() -> None:
    old = torch.tensor([-1.0, -1.0, -1.0, -1.0])
    new = old + torch.tensor([0.5, -0.5, 0.05, 0.5]).log1p()  # ratios 1.5, 0.5, 1.05, 1.5
    adv = torch.tensor([1.0, -1.0, 2.0, -1.0])
    loss, clipped, approx_kl = policy_loss_terms(new, old, adv, clip=0.2)
    ratio = torch.tensor([1.5, 0.5, 1.05, 1.5])
    direct = [max(-a * r, -a * min(max(r, 0.8), 1.2)) for a, r in zip(adv.tolist(), ratio.tolist())]
    assert loss.tolist() == pytest.approx(direct, rel=1e-6)
    assert clipped.tolist() == [1.0, 1.0, 0.0, 0.0]  # positive A above 1.2, negative A below 0.8 are clipped
    assert approx_kl.tolist() == pytest.approx([1 / r - 1 + math.log(r) for r in ratio.tolist()], rel=1e-5)


def test_clipped_value_loss() -> None:
    values, old, returns = torch.tensor([1.0, 1.0, 0.3]), torch.tensor([0.5, 0.5, 0.2]), torch.tensor([2.0, 0.0, 0.3])
    loss, clipped = value_loss_terms(values, old, returns, clip=0.2)
    direct = []
    for v, o, r in zip(values.tolist(), old.tolist(), returns.tolist()):
        vc = o + min(max(v - o, -0.2), 0.2)
        direct.append(0.5 * max((v - r) ** 2, (vc - r) ** 2))
    assert loss.tolist() == pytest.approx(direct)
    assert clipped.tolist() == [1.0, 0.0, 0.0]


def test_kl_estimators_and_token_rewards() -> None:
    logp, ref = torch.tensor([-1.0, -2.0, -0.5]), torch.tensor([-1.5, -1.0, -0.5])
    assert kl_per_token(logp, ref, "k1").tolist() == pytest.approx([0.5, -1.0, 0.0])
    k3 = [math.exp(r - p) - 1 - (r - p) for p, r in zip(logp.tolist(), ref.tolist())]
    assert kl_per_token(logp, ref, "k3").tolist() == pytest.approx(k3)
    assert all(v >= 0 for v in kl_per_token(logp, ref, "k3").tolist())
    with pytest.raises(ValueError, match="k2"):
        kl_per_token(logp, ref, "k2")
    kl = torch.ones(ROWS, SEQ)
    scores = torch.tensor([1.0, 2.0, 3.0])
    rewards = token_rewards(scores, kl, MASK, kl_coef=0.1)
    for r, (a, b) in enumerate(SPANS):
        expected = [0.0] * SEQ
        for t in range(a, b):
            expected[t] = -0.1
        expected[b - 1] += scores[r].item()
        assert rewards[r].tolist() == pytest.approx(expected)


def test_adaptive_kl_controller_follows_the_proportional_rule() -> None:
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    ctl.update(kl=9.0, n_steps=256)  # error clipped to 0.2
    assert ctl.value == pytest.approx(0.1 * (1 + 0.2 * 256 / 10000))
    ctl.update(kl=5.4, n_steps=256)  # error -0.1
    assert ctl.value == pytest.approx(0.1 * (1 + 0.2 * 256 / 10000) * (1 - 0.1 * 256 / 10000))
    restored = AdaptiveKLController(0.5, target=6.0, horizon=10000)
    restored.load_state_dict(ctl.state_dict())
    assert restored.value == ctl.value
    fixed = FixedKLController(0.05)
    fixed.update(kl=100.0, n_steps=10)
    assert fixed.value == 0.05


def test_grpo_and_rloo_advantages() -> None:
    rewards = torch.tensor([1.0, 2.0, 4.0, 0.0, 0.0, 3.0])
    grpo = grpo_advantages(rewards, 3)
    for g in range(2):
        r = rewards[3 * g:3 * g + 3]
        assert grpo[3 * g:3 * g + 3].tolist() == pytest.approx(((r - r.mean()) / (r.std() + 1e-6)).tolist())
    assert grpo_advantages(rewards, 3, scale=False).tolist() == pytest.approx([-4 / 3, -1 / 3, 5 / 3, -1, -1, 2])
    rloo = rloo_advantages(rewards, 3)
    direct = [rewards[i].item() - (rewards[3 * (i // 3):3 * (i // 3) + 3].sum().item() - rewards[i].item()) / 2
              for i in range(6)]
    assert rloo.tolist() == pytest.approx(direct)
    with pytest.raises(ValueError, match="at least 2"):
        rloo_advantages(rewards, 1)


def test_explained_variance() -> None:
    returns = torch.randn(ROWS, SEQ, generator=GEN, dtype=torch.float64)
    values = returns + 0.1 * torch.randn(ROWS, SEQ, generator=GEN, dtype=torch.float64)
    ev = explained_variance(Moments.of(returns - values, MASK), Moments.of(returns, MASK))
    direct = 1 - (returns - values)[MASK].var() / returns[MASK].var()
    assert ev == pytest.approx(direct.item())
