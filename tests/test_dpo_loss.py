"""dpo_loss (rlhf_lightning.algorithms.losses) against hand-computed numbers and a naive per-row loop."""

from __future__ import annotations

import math

import pytest
import torch

from rlhf_lightning.algorithms.losses import DPO_LOSS_TYPES, dpo_loss

# Two pairs. Row 0: h = (-1 - -3) - (-2 - -2.5) = 2 - 0.5 = 1.5; row 1: h = (-4 - -2) - (-1 - -1) = -2.
PC, PR = torch.tensor([-1.0, -4.0]), torch.tensor([-3.0, -2.0])
RC, RR = torch.tensor([-2.0, -1.0]), torch.tensor([-2.5, -1.0])


def test_sigmoid_by_hand():
    losses, chosen, rejected = dpo_loss(PC, PR, RC, RR, beta=0.1)
    # -log sigmoid(0.15) = log(1 + e^-0.15) = 0.620957; -log sigmoid(-0.2) = log(1 + e^0.2) = 0.798139
    assert losses.tolist() == pytest.approx([0.620957, 0.798139], abs=1e-6)
    assert chosen.tolist() == pytest.approx([0.1, -0.3])  # 0.1 * (-1 + 2), 0.1 * (-4 + 1)
    assert rejected.tolist() == pytest.approx([-0.05, -0.1])  # 0.1 * (-3 + 2.5), 0.1 * (-2 + 1)


def test_label_smoothing_by_hand():
    losses, _, _ = dpo_loss(PC, PR, RC, RR, beta=0.1, label_smoothing=0.1)
    # 0.9 * log(1 + e^-0.15) + 0.1 * log(1 + e^0.15) = 0.635957
    assert losses[0].item() == pytest.approx(0.635957, abs=1e-6)


def test_ipo_by_hand():
    losses, _, _ = dpo_loss(PC, PR, RC, RR, beta=0.1, loss_type="ipo")
    # (1.5 - 1 / 0.2)^2 = 12.25; (-2 - 5)^2 = 49
    assert losses.tolist() == pytest.approx([12.25, 49.0])


def test_hinge_by_hand():
    losses, _, _ = dpo_loss(PC, PR, RC, RR, beta=0.5, loss_type="hinge")
    # relu(1 - 0.75) = 0.25; relu(1 + 1) = 2
    assert losses.tolist() == pytest.approx([0.25, 2.0])


@pytest.mark.parametrize("loss_type", DPO_LOSS_TYPES)
def test_matches_naive_loop(loss_type):
    g = torch.Generator().manual_seed(0)
    pc, pr, rc, rr = (torch.randn(7, generator=g, dtype=torch.float64) * 3 for _ in range(4))
    beta, eps = 0.3, (0.2 if loss_type == "sigmoid" else 0.0)
    losses, chosen, rejected = dpo_loss(pc, pr, rc, rr, beta, loss_type, eps)
    for i in range(7):
        h = (pc[i] - pr[i] - rc[i] + rr[i]).item()
        if loss_type == "sigmoid":
            want = -(1 - eps) * math.log(1 / (1 + math.exp(-beta * h))) - eps * math.log(1 / (1 + math.exp(beta * h)))
        elif loss_type == "ipo":
            want = (h - 1 / (2 * beta)) ** 2
        else:
            want = max(0.0, 1 - beta * h)
        assert losses[i].item() == pytest.approx(want, rel=1e-9, abs=1e-12)
        assert chosen[i].item() == pytest.approx(beta * (pc[i] - rc[i]).item())
        assert rejected[i].item() == pytest.approx(beta * (pr[i] - rr[i]).item())


def test_gradients_reach_the_policy_only_and_rewards_are_detached():
    pc, pr = PC.clone().requires_grad_(), PR.clone().requires_grad_()
    losses, chosen, rejected = dpo_loss(pc, pr, RC, RR, beta=0.1)
    assert not chosen.requires_grad and not rejected.requires_grad
    losses.sum().backward()
    # d/dpc of -log sigmoid(beta h) = -beta (1 - sigmoid(beta h)); d/dpr is its opposite
    want = -0.1 * (1 - torch.sigmoid(torch.tensor([0.15, -0.2])))
    assert pc.grad.tolist() == pytest.approx(want.tolist(), abs=1e-7)
    assert pr.grad.tolist() == pytest.approx((-want).tolist(), abs=1e-7)


def test_at_the_reference_sigmoid_loss_is_log_two():
    x = torch.tensor([-5.0, -7.0])
    losses, chosen, _ = dpo_loss(x, x - 1, x, x - 1, beta=2.0)
    assert losses.tolist() == pytest.approx([math.log(2)] * 2)
    assert chosen.tolist() == [0.0, 0.0]


@pytest.mark.parametrize("kwargs, match", [
    ({"loss_type": "kto"}, "loss_type='kto'"),
    ({"beta": 0.0}, "beta=0.0 must be > 0"),
    ({"label_smoothing": 0.7}, "label_smoothing=0.7"),
    ({"label_smoothing": 0.1, "loss_type": "ipo"}, "sigmoid"),
])
def test_bad_settings(kwargs, match):
    kwargs = {"beta": 0.1} | kwargs
    with pytest.raises(ValueError, match=match):
        dpo_loss(PC, PR, RC, RR, **kwargs)


def test_bad_shapes():
    with pytest.raises(ValueError, match="ref_rejected_logps"):
        dpo_loss(PC, PR, RC, RR[:1], beta=0.1)
    with pytest.raises(ValueError, match=r"\(B,\)"):
        dpo_loss(PC[None], PR[None], RC[None], RR[None], beta=0.1)
