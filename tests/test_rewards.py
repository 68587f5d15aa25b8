"""Tests for rlhf_lightning.algorithms.kl: KL estimators, per-token rewards, the missing-EOS penalty and the
KL controllers, against hand-computed numbers and naive loops."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import ragged_prefix_mask
from rlhf_lightning.algorithms.kl import (
    AdaptiveKLController,
    FixedKLController,
    apply_missing_eos_penalty,
    compute_rewards,
    kl_penalty,
    make_kl_controller,
)


# --------------------------------------------------------------------------- #
# kl_penalty
# --------------------------------------------------------------------------- #
def test_kl_penalty_by_hand():
    logp = torch.log(torch.tensor([[0.5]]))
    logq = torch.log(torch.tensor([[0.25]]))
    ln2 = math.log(2.0)
    # k1 = log p - log q = ln 2 ; k2 = 0.5 (ln 2)^2 ; k3 = (q/p - 1) - log(q/p) = -0.5 + ln 2
    assert kl_penalty(logp, logq, "k1").item() == pytest.approx(ln2, rel=1e-6)
    assert kl_penalty(logp, logq, "k2").item() == pytest.approx(0.5 * ln2**2, rel=1e-6)
    assert kl_penalty(logp, logq, "k3").item() == pytest.approx(ln2 - 0.5, rel=1e-6)
    assert kl_penalty(logp, logq).item() == pytest.approx(ln2, rel=1e-6)  # default k1


def test_kl_penalty_matches_direct_formulas_and_k3_nonnegative():
    gen = torch.Generator().manual_seed(7)
    logp = -5 * torch.rand(4, 9, generator=gen, dtype=torch.float64)
    logq = -5 * torch.rand(4, 9, generator=gen, dtype=torch.float64)
    k1, k2, k3 = (kl_penalty(logp, logq, e) for e in ("k1", "k2", "k3"))
    for b in range(4):
        for t in range(9):
            p, q = float(logp[b, t]), float(logq[b, t])
            assert k1[b, t].item() == pytest.approx(p - q)
            assert k2[b, t].item() == pytest.approx(0.5 * (p - q) ** 2)
            assert k3[b, t].item() == pytest.approx(math.exp(q - p) - 1 - (q - p))
    assert (k3 >= 0).all() and (k2 >= 0).all()
    assert (k1 < 0).any()  # k1 is not a non-negative estimator
    # k3 >= 0 also for tiny and large log-ratios (expm1 keeps it exact near 0)
    lr = torch.tensor([[-30.0, -1e-7, 0.0, 1e-7, 20.0]])
    assert (kl_penalty(torch.zeros_like(lr), lr, "k3") >= 0).all()


def test_kl_estimators_expectation_under_policy():
    # p = policy, q = reference; tokens are drawn from p, so E_p[k1] = E_p[k3] = KL(p || q)
    p = torch.tensor([0.9, 0.05, 0.05], dtype=torch.float64)
    q = torch.tensor([0.3, 0.3, 0.4], dtype=torch.float64)
    kl_pq = float((p * (p.log() - q.log())).sum())
    kl_qp = float((q * (q.log() - p.log())).sum())
    assert abs(kl_pq - kl_qp) > 0.05  # the direction matters for this example
    for est in ("k1", "k3"):
        k = kl_penalty(p.log()[None], q.log()[None], est)[0]
        assert float((p * k).sum()) == pytest.approx(kl_pq)


def test_kl_penalty_errors():
    a = torch.zeros(2, 3)
    for name in ("abs", "mse", "full", "K1", ""):
        with pytest.raises(ValueError):
            kl_penalty(a, a, name)
    with pytest.raises(ValueError):
        kl_penalty(a, torch.zeros(2, 4))


# --------------------------------------------------------------------------- #
# compute_rewards
# --------------------------------------------------------------------------- #
def test_compute_rewards_by_hand():
    score = torch.tensor([1.0, 2.0, 3.0])
    logp = torch.tensor([[-1.0, -1.0, -1.0], [-2.0, -1.0, -0.5], [-1.0, -1.0, -1.0]])
    ref = torch.tensor([[-1.5, -0.5, -9.0], [-2.0, -2.0, -2.0], [-3.0, -3.0, -3.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [0, 0, 0]], dtype=torch.bool)
    # k1 kl: row 0 [0.5, -0.5, (masked) 0] ; row 1 [0, 1, 1.5] ; row 2 all masked -> 0
    # rewards = -0.1 * kl, plus score at the last valid token:
    #   row 0 [-0.05, 0.05 + 1, 0] ; row 1 [0, -0.1, -0.15 + 2] ; row 2 no score
    rewards, kl = compute_rewards(score, logp, ref, mask, kl_coef=0.1)
    torch.testing.assert_close(kl, torch.tensor([[0.5, -0.5, 0.0], [0.0, 1.0, 1.5], [0.0, 0.0, 0.0]]))
    torch.testing.assert_close(rewards, torch.tensor([[-0.05, 1.05, 0.0], [0.0, -0.1, 1.85], [0.0, 0.0, 0.0]]))
    # kl_coef = 0: only the score
    rewards0, _ = compute_rewards(score, logp, ref, mask, kl_coef=0.0)
    torch.testing.assert_close(rewards0, torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 2.0], [0.0, 0.0, 0.0]]))


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_compute_rewards_matches_loop_reference(estimator):
    gen = torch.Generator().manual_seed(8)
    B, T, beta = 5, 6, 0.05
    score = torch.randn(B, generator=gen, dtype=torch.float64)
    logp = -3 * torch.rand(B, T, generator=gen, dtype=torch.float64)
    ref = -3 * torch.rand(B, T, generator=gen, dtype=torch.float64)
    mask = ragged_prefix_mask(B, T, gen)
    rewards, kl = compute_rewards(score, logp, ref, mask, beta, estimator)
    for b in range(B):
        valid = [t for t in range(T) if mask[b, t]]
        for t in range(T):
            if t in valid:
                d = float(logp[b, t] - ref[b, t])
                k = {"k1": d, "k2": 0.5 * d * d, "k3": math.exp(-d) - 1 + d}[estimator]
                r = -beta * k + (float(score[b]) if t == valid[-1] else 0.0)
            else:
                k, r = 0.0, 0.0
            assert kl[b, t].item() == pytest.approx(k)
            assert rewards[b, t].item() == pytest.approx(r)


def test_compute_rewards_detached_and_errors():
    score = torch.randn(2, requires_grad=True)
    logp = torch.randn(2, 3, requires_grad=True)
    ref = torch.randn(2, 3)
    mask = torch.ones(2, 3, dtype=torch.bool)
    rewards, kl = compute_rewards(score, logp, ref, mask, 0.1)
    assert not rewards.requires_grad and not kl.requires_grad
    with pytest.raises(ValueError):
        compute_rewards(torch.randn(3), logp, ref, mask, 0.1)
    with pytest.raises(ValueError):
        compute_rewards(torch.randn(2, 1), logp, ref, mask, 0.1)
    with pytest.raises(ValueError):
        compute_rewards(score, logp, torch.randn(2, 4), mask, 0.1)
    with pytest.raises(ValueError):
        compute_rewards(score, logp, ref, mask, 0.1, estimator="k4")




# --------------------------------------------------------------------------- #
# apply_missing_eos_penalty
# --------------------------------------------------------------------------- #
def test_missing_eos_penalty_hits_only_rows_without_eos():
    scores = torch.tensor([1.0, -0.5, 2.0])
    ends = torch.tensor([True, False, False])
    assert torch.equal(apply_missing_eos_penalty(scores, ends, 1.5), torch.tensor([1.0, -2.0, 0.5]))
    assert apply_missing_eos_penalty(scores, ends, None) is scores


# --------------------------------------------------------------------------- #
# KL controllers
# --------------------------------------------------------------------------- #
def test_fixed_controller_keeps_beta_and_round_trips():
    ctl = FixedKLController(0.05)
    assert ctl.update(100.0, 64) == 0.05 and ctl.value == 0.05
    other = FixedKLController(1.0)
    other.load_state_dict(ctl.state_dict())
    assert other.value == 0.05


def test_adaptive_controller_matches_ziegler_update():
    """β ← β (1 + clip(KL/target − 1, ±0.2) · n / horizon), by hand."""
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=1000.0)
    assert ctl.update(9.0, 100) == pytest.approx(0.1 * (1 + 0.2 * 100 / 1000))  # error 0.5 clipped to 0.2
    beta = ctl.value
    assert ctl.update(5.4, 50) == pytest.approx(beta * (1 - 0.1 * 50 / 1000))  # error -0.1
    assert ctl.update(6.0, 10) == pytest.approx(beta * (1 - 0.1 * 50 / 1000))  # on target: unchanged
    with pytest.raises(ValueError):
        AdaptiveKLController(0.1, target=0.0, horizon=1.0)


def test_make_kl_controller_picks_the_kind():
    assert type(make_kl_controller(0.2)) is FixedKLController
    assert type(make_kl_controller(0.2, adaptive=True, target=3.0, horizon=10.0)) is AdaptiveKLController
