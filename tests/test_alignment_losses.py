"""The alignment losses against direct implementations of the papers' formulas, in float64 Python math."""

from __future__ import annotations

import math

import pytest
import torch

from triarch.labels import IGNORE_INDEX
from triarch.objectives.pair_losses import dpo_losses, last_label_positions, reward_losses, sequence_log_probs
from triarch.objectives.preference import DpoObjective, RewardObjective

LOGPS = [(-12.0, -15.5, -13.0, -14.0), (-40.25, -38.0, -41.0, -37.5), (-3.0, -3.0, -3.0, -3.0), (-7.5, -20.0, -9.0, -9.5)]


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def paper_dpo(pc: float, pr: float, rc: float, rr: float, beta: float, kind: str, eps: float) -> float:
    h = (pc - rc) - (pr - rr)  # log [pi(y_w) ref(y_l) / (pi(y_l) ref(y_w))]
    if kind == "sigmoid":  # Rafailov et al. eq. 7; conservative DPO: the label flipped with probability eps
        return -(1 - eps) * log_sigmoid(beta * h) - eps * log_sigmoid(-beta * h)
    if kind == "ipo":  # Azar et al. eq. 17: (h - 1/(2 tau))^2
        return (h - 1 / (2 * beta)) ** 2
    return max(0.0, 1 - beta * h)  # SLiC hinge with delta = 1, scaled by beta


@pytest.mark.parametrize("kind,eps", [("sigmoid", 0.0), ("sigmoid", 0.2), ("ipo", 0.0), ("hinge", 0.0)])
@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_dpo_losses_equal_the_papers_formulas(kind: str, eps: float, beta: float) -> None:
    pc, pr, rc, rr = (torch.tensor([row[i] for row in LOGPS], dtype=torch.float64) for i in range(4))
    got = dpo_losses(pc, pr, rc, rr, beta=beta, loss_type=kind, label_smoothing=eps)
    want = [paper_dpo(*row, beta, kind, eps) for row in LOGPS]
    assert got.tolist() == pytest.approx(want, abs=1e-6, rel=1e-6)


def test_dpo_with_policy_equal_to_reference_is_log_2_and_zero_rewards() -> None:
    logits = torch.randn(4, 6, 11)
    labels = torch.randint(0, 11, (4, 6))
    labels[:, :2] = IGNORE_INDEX
    ref = sequence_log_probs(logits, labels).double()
    loss, stats = DpoObjective(beta=0.1).loss(logits, {"labels": labels, "ref_logps": ref})
    assert float(loss) / 2 == pytest.approx(math.log(2), abs=1e-7)
    assert stats[:4].tolist() == [0.0, 0.0, 0.0, 0.0]  # rewards chosen/rejected, accuracies, margins


def test_sequence_log_probs_sum_only_counted_tokens() -> None:
    logits = torch.randn(2, 5, 7)
    labels = torch.tensor([[IGNORE_INDEX, 3, 4, IGNORE_INDEX, IGNORE_INDEX], [1, 2, 3, 4, 5 % 7]])
    want = [sum(math.log(torch.softmax(logits[r, i].double(), -1)[labels[r, i]]) for i in range(5)
                if labels[r, i] != IGNORE_INDEX) for r in range(2)]
    assert sequence_log_probs(logits, labels).tolist() == pytest.approx(want, abs=1e-5)
    assert last_label_positions(labels).tolist() == [3, 5]


def test_reward_loss_is_bradley_terry_with_margin() -> None:
    chosen, rejected, margin = torch.tensor([1.5, -0.5, 0.0]), torch.tensor([0.5, 0.25, 0.0]), torch.tensor([0.2, 0.0, 1.0])
    want = [-log_sigmoid(c - r - m) for c, r, m in zip(chosen.tolist(), rejected.tolist(), margin.tolist())]
    assert reward_losses(chosen, rejected, margin).tolist() == pytest.approx(want, abs=1e-6)
    values = torch.zeros(2, 4, 1)
    values[0, 2, 0], values[1, 3, 0] = 2.0, -1.0  # each row's value at its last response token
    labels = torch.tensor([[IGNORE_INDEX, 5, IGNORE_INDEX, IGNORE_INDEX], [IGNORE_INDEX, 1, 2, IGNORE_INDEX]])
    loss, stats = RewardObjective().loss(values, {"labels": labels})
    assert float(loss) == pytest.approx(-log_sigmoid(3.0), abs=1e-6)
    assert stats.tolist() == pytest.approx([1.0, 3.0, 2.0, -1.0])
