"""Tests for rlhf_lightning.algorithms.losses and the TD and GAE estimators of
rlhf_lightning.algorithms.advantages: hand-computed examples, naive loop references,
edge cases and autograd behaviour."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import ragged_prefix_mask
from rlhf_lightning.algorithms.advantages import gae, td_targets
from rlhf_lightning.algorithms.kl import kl_penalty
from rlhf_lightning.algorithms.losses import (
    LOSS_AGG_MODES,
    aggregate_loss,
    kl_loss,
    pairwise_reward_loss,
    ppo_policy_loss,
    tis_weights,
    value_loss,
)
from rlhf_lightning.algorithms.ops import BatchCounts, masked_mean


def softplus_neg(x: float) -> float:
    """-log sigmoid(x) = log(1 + exp(-x)), computed stably in plain Python."""
    return math.log1p(math.exp(-x)) if x >= 0 else -x + math.log1p(math.exp(x))


# --------------------------------------------------------------------------- #
# pairwise_reward_loss
# --------------------------------------------------------------------------- #
def test_pairwise_reward_loss_by_hand():
    r_w = torch.tensor([2.0, 0.0])
    r_l = torch.tensor([0.0, 0.0])
    # -log sig(2) = log(1 + e^-2) = 0.126928 ; -log sig(0) = ln 2 = 0.693147 ; mean 0.410038
    loss, stats = pairwise_reward_loss(r_w, r_l)
    assert loss.item() == pytest.approx(0.4100375, abs=1e-6)
    assert stats["accuracy"].item() == pytest.approx(0.5)  # the tie counts as wrong
    assert stats["margin_mean"].item() == pytest.approx(1.0)
    assert stats["chosen_mean"].item() == pytest.approx(1.0)
    assert stats["rejected_mean"].item() == pytest.approx(0.0)
    assert stats["reward_abs_mean"].item() == pytest.approx(0.5)  # (2 + 0 + 0 + 0) / 4
    assert all(not v.requires_grad and v.dim() == 0 for v in stats.values())

    # centering: mean((r_w + r_l)^2) = (4 + 0) / 2 = 2; times 0.1 -> + 0.2
    loss_c, _ = pairwise_reward_loss(r_w, r_l, center_coef=0.1)
    assert loss_c.item() == pytest.approx(0.4100375 + 0.2, abs=1e-6)

    # float margin 1: -log sig(1) = 0.313262 ; -log sig(-1) = 1.313262 ; mean 0.813262
    loss_m, _ = pairwise_reward_loss(r_w, r_l, margin=1.0)
    assert loss_m.item() == pytest.approx(0.8132617, abs=1e-6)
    # tensor margin [1, 0]: (0.313262 + 0.693147) / 2 = 0.503204
    loss_t, _ = pairwise_reward_loss(r_w, r_l, margin=torch.tensor([1.0, 0.0]))
    assert loss_t.item() == pytest.approx(0.5032045, abs=1e-6)


def test_pairwise_reward_loss_matches_loop_reference():
    gen = torch.Generator().manual_seed(0)
    r_w = 3 * torch.randn(16, generator=gen, dtype=torch.float64)
    r_l = 3 * torch.randn(16, generator=gen, dtype=torch.float64)
    margin = torch.rand(16, generator=gen, dtype=torch.float64)
    loss, stats = pairwise_reward_loss(r_w, r_l, center_coef=0.05, margin=margin)
    bt = sum(softplus_neg(float(a - b - m)) for a, b, m in zip(r_w, r_l, margin, strict=False)) / 16
    center = sum(float(a + b) ** 2 for a, b in zip(r_w, r_l, strict=False)) / 16
    assert loss.item() == pytest.approx(bt + 0.05 * center)
    accuracy = sum(float(a) > float(b) for a, b in zip(r_w, r_l, strict=True)) / 16
    assert stats["accuracy"].item() == pytest.approx(accuracy)
    assert stats["margin_mean"].item() == pytest.approx(sum(float(a - b) for a, b in zip(r_w, r_l, strict=False)) / 16)


def test_pairwise_reward_loss_is_numerically_stable():
    r_w = torch.tensor([0.0, 1000.0], requires_grad=True)
    r_l = torch.tensor([1000.0, 0.0], requires_grad=True)
    loss, _ = pairwise_reward_loss(r_w, r_l)
    # terms: -log sig(-1000) = 1000 ; -log sig(1000) = 0 -> mean 500
    assert loss.item() == pytest.approx(500.0)
    loss.backward()
    assert torch.isfinite(r_w.grad).all() and torch.isfinite(r_l.grad).all()
    torch.testing.assert_close(r_w.grad, torch.tensor([-0.5, 0.0]))


def _train_free_rewards(center_coef: float, offset: float) -> tuple[float, float, float]:
    gen = torch.Generator().manual_seed(1)
    B = 8
    r_w = (offset + 1.0 + torch.randn(B, generator=gen, dtype=torch.float64)).requires_grad_(True)
    r_l = (offset + torch.randn(B, generator=gen, dtype=torch.float64)).requires_grad_(True)
    start = (r_w + r_l).abs().mean().item()
    opt = torch.optim.SGD([r_w, r_l], lr=0.5)
    for _ in range(30):
        opt.zero_grad()
        loss, _ = pairwise_reward_loss(r_w, r_l, center_coef=center_coef)
        loss.backward()
        opt.step()
    end = (r_w + r_l).abs().mean().item()
    margin = (r_w - r_l).mean().item()
    return start, end, margin


def test_centering_gradient_drives_sum_towards_zero():
    start, end, margin = _train_free_rewards(center_coef=1.0, offset=500.0)
    assert start > 900
    assert end < 0.01 * start
    assert margin > 1.0  # preference ordering is still learned
    # without centering the BT loss is shift-invariant: the offset of +500 stays
    start0, end0, margin0 = _train_free_rewards(center_coef=0.0, offset=500.0)
    assert end0 == pytest.approx(start0, rel=1e-6)
    assert margin0 > 1.0


def test_pairwise_reward_loss_errors():
    a = torch.zeros(3)
    with pytest.raises(ValueError):
        pairwise_reward_loss(a, torch.zeros(4))
    with pytest.raises(ValueError):
        pairwise_reward_loss(torch.zeros(3, 1), torch.zeros(3, 1))
    with pytest.raises(ValueError):
        pairwise_reward_loss(torch.zeros(0), torch.zeros(0))
    with pytest.raises(ValueError):
        pairwise_reward_loss(a, a, center_coef=-0.1)
    with pytest.raises(ValueError):
        pairwise_reward_loss(a, a, margin=torch.zeros(2))


# --------------------------------------------------------------------------- #
# td_targets
# --------------------------------------------------------------------------- #
def td_loop_reference(rewards, values, mask, gamma):
    B, T = rewards.shape
    out = torch.zeros(B, T, dtype=torch.float64)
    for b in range(B):
        n = int(mask[b].sum())
        for t in range(n):
            next_v = float(values[b, t + 1]) if t + 1 < n else 0.0
            out[b, t] = float(rewards[b, t]) + gamma * next_v
    return out


def test_td_targets_by_hand():
    rewards = torch.tensor([[1.0, 2.0, 3.0, 0.0], [4.0, 4.0, 4.0, 4.0]])
    values = torch.tensor([[10.0, 20.0, 30.0, 40.0], [1.0, 1.0, 1.0, 1.0]])
    mask = torch.tensor([[1, 1, 1, 0], [0, 0, 0, 0]], dtype=torch.bool)
    # row 0, gamma 0.5: [1 + 0.5*20, 2 + 0.5*30, 3 + 0 (episode ends), 0] = [11, 17, 3, 0]
    # row 1 has no valid token -> zeros
    out = td_targets(rewards, values, mask, gamma=0.5)
    torch.testing.assert_close(out, torch.tensor([[11.0, 17.0, 3.0, 0.0], [0.0, 0.0, 0.0, 0.0]]))


@pytest.mark.parametrize("gamma", [0.0, 0.9, 1.0])
def test_td_targets_match_loop_reference(gamma):
    gen = torch.Generator().manual_seed(2)
    B, T = 5, 7
    rewards = torch.randn(B, T, generator=gen, dtype=torch.float64)
    values = torch.randn(B, T, generator=gen, dtype=torch.float64)
    mask = ragged_prefix_mask(B, T, gen)
    torch.testing.assert_close(td_targets(rewards, values, mask, gamma),
                               td_loop_reference(rewards, values, mask, gamma))


def test_td_targets_are_detached_and_gradient_only_via_current_value():
    gen = torch.Generator().manual_seed(3)
    B, T = 3, 5
    rewards = torch.randn(B, T, generator=gen)
    values = torch.randn(B, T, generator=gen, requires_grad=True)
    mask = ragged_prefix_mask(B, T, gen)
    targets = td_targets(rewards, values, mask, gamma=0.9)
    assert not targets.requires_grad and targets.grad_fn is None
    # hand-rolled MSE (not value_loss, which detaches its target itself)
    n = mask.sum()
    loss = 0.5 * (((values - targets) ** 2) * mask).sum() / n
    loss.backward()
    expected = torch.where(mask, (values.detach() - targets) / n, torch.zeros(()))
    torch.testing.assert_close(values.grad, expected)


# --------------------------------------------------------------------------- #
# gae
# --------------------------------------------------------------------------- #
def gae_loop_reference(rewards, values, mask, gamma, lam):
    B, T = rewards.shape
    adv = torch.zeros(B, T, dtype=torch.float64)
    ret = torch.zeros(B, T, dtype=torch.float64)
    for b in range(B):
        n = int(mask[b].sum())
        last = 0.0
        for t in reversed(range(n)):
            next_v = float(values[b, t + 1]) if t + 1 < n else 0.0
            delta = float(rewards[b, t]) + gamma * next_v - float(values[b, t])
            last = delta + gamma * lam * last
            adv[b, t] = last
            ret[b, t] = last + float(values[b, t])
    return adv, ret


def test_gae_by_hand():
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.0, 1.0, 5.0]])
    values = torch.tensor([[0.5, 0.2, 0.4], [0.5, 0.5, 9.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.bool)
    # row 0, gamma 0.9, lam 0.8 (gamma*lam = 0.72):
    #   delta = [0 + 0.9*0.2 - 0.5, 0 + 0.9*0.4 - 0.2, 1 + 0 - 0.4] = [-0.32, 0.16, 0.6]
    #   A2 = 0.6 ; A1 = 0.16 + 0.72*0.6 = 0.592 ; A0 = -0.32 + 0.72*0.592 = 0.10624
    #   returns = A + V = [0.60624, 0.792, 1.0]
    adv, ret = gae(rewards[:1], values[:1], mask[:1], gamma=0.9, lam=0.8)
    torch.testing.assert_close(adv, torch.tensor([[0.10624, 0.592, 0.6]]))
    torch.testing.assert_close(ret, torch.tensor([[0.60624, 0.792, 1.0]]))
    # row 1, gamma = lam = 1; V beyond the last valid token is 0 (the 9 is padding):
    #   delta = [0 + 0.5 - 0.5, 1 + 0 - 0.5] = [0, 0.5] ; A = [0.5, 0.5] ; returns = [1, 1] (reward-to-go)
    adv, ret = gae(rewards[1:], values[1:], mask[1:], gamma=1.0, lam=1.0)
    torch.testing.assert_close(adv, torch.tensor([[0.5, 0.5, 0.0]]))
    torch.testing.assert_close(ret, torch.tensor([[1.0, 1.0, 0.0]]))


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.0), (0.99, 1.0), (0.5, 0.5), (0.0, 0.7)])
def test_gae_matches_loop_reference(gamma, lam):
    gen = torch.Generator().manual_seed(4)
    B, T = 5, 8
    rewards = torch.randn(B, T, generator=gen, dtype=torch.float64)
    values = torch.randn(B, T, generator=gen, dtype=torch.float64)
    mask = ragged_prefix_mask(B, T, gen)
    adv, ret = gae(rewards, values, mask, gamma, lam)
    adv_ref, ret_ref = gae_loop_reference(rewards, values, mask, gamma, lam)
    torch.testing.assert_close(adv, adv_ref)
    torch.testing.assert_close(ret, ret_ref)


def test_gae_special_cases():
    gen = torch.Generator().manual_seed(5)
    B, T = 4, 6
    rewards = torch.randn(B, T, generator=gen, dtype=torch.float64)
    values = torch.randn(B, T, generator=gen, dtype=torch.float64)
    mask = ragged_prefix_mask(B, T, gen)
    # lam = 0 -> advantages are the TD errors: td_targets - V
    adv, _ = gae(rewards, values, mask, gamma=0.9, lam=0.0)
    delta = torch.where(mask, td_targets(rewards, values, mask, 0.9) - values, torch.zeros(()).double())
    torch.testing.assert_close(adv, delta)
    # gamma = lam = 1 -> returns are the reward-to-go over valid tokens
    _, ret = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    r = torch.where(mask, rewards, torch.zeros(()).double())
    rtg = r.flip(1).cumsum(1).flip(1) * mask
    torch.testing.assert_close(ret, rtg)
    # with lam = 1 the returns do not depend on the values at all
    _, ret2 = gae(rewards, values + 3.0, mask, gamma=1.0, lam=1.0)
    torch.testing.assert_close(ret2, rtg)


def test_gae_detached_and_empty_rows():
    values = torch.randn(2, 4, requires_grad=True)
    rewards = torch.randn(2, 4, requires_grad=True)
    mask = torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0]], dtype=torch.bool)
    adv, ret = gae(rewards, values, mask, 0.99, 0.95)
    assert not adv.requires_grad and not ret.requires_grad
    assert (adv[1] == 0).all() and (ret[1] == 0).all() and (adv[0, 2:] == 0).all()
    adv, ret = gae(rewards, values, torch.zeros_like(mask), 0.99, 0.95)
    assert (adv == 0).all() and (ret == 0).all()
    # value loss against GAE returns: gradient only through V(s_t)
    _, ret = gae(rewards, values, mask, 0.99, 0.95)
    n = mask.sum()
    (0.5 * (((values - ret) ** 2) * mask).sum() / n).backward()
    torch.testing.assert_close(values.grad, torch.where(mask, (values.detach() - ret) / n, torch.zeros(())))


def test_gae_and_td_errors():
    x = torch.zeros(2, 3)
    m = torch.ones(2, 3, dtype=torch.bool)
    for bad in (-0.1, 1.1, float("nan")):
        with pytest.raises(ValueError):
            gae(x, x, m, gamma=bad, lam=0.9)
        with pytest.raises(ValueError):
            gae(x, x, m, gamma=0.9, lam=bad)
        with pytest.raises(ValueError):
            td_targets(x, x, m, gamma=bad)
    with pytest.raises(ValueError):
        gae(x, torch.zeros(2, 4), m, 0.9, 0.9)
    with pytest.raises(ValueError):
        td_targets(x, x, torch.ones(3, 3, dtype=torch.bool), 0.9)
    with pytest.raises(ValueError):
        gae(torch.zeros(6), torch.zeros(6), torch.ones(6, dtype=torch.bool), 0.9, 0.9)


# --------------------------------------------------------------------------- #
# value_loss
# --------------------------------------------------------------------------- #
def test_value_loss_by_hand():
    values = torch.tensor([[1.0, 2.0, 3.0]], requires_grad=True)
    returns = torch.tensor([[0.0, 2.0, 5.0]])
    mask = torch.tensor([[1, 1, 0]], dtype=torch.bool)
    # squared errors at valid tokens [1, 0] -> 0.5 * mean = 0.25
    loss, stats = value_loss(values, returns, mask)
    assert loss.item() == pytest.approx(0.25)
    assert stats["clipfrac"].item() == 0.0
    loss.backward()
    # d/dV 0.5 * mean((V - R)^2) = (V - R) / n = [1/2, 0, 0 (masked)]
    torch.testing.assert_close(values.grad, torch.tensor([[0.5, 0.0, 0.0]]))

    # clipping that does not bind: old = [0.5, 2, 0], c = 0.2 -> V_clip = [0.7, 2, .]
    # clipped errors [0.49, 0] <= unclipped [1, 0] -> same loss, clipfrac 0
    loss, stats = value_loss(values, returns, mask, old_values=torch.tensor([[0.5, 2.0, 0.0]]), clip_range=0.2)
    assert loss.item() == pytest.approx(0.25)
    assert stats["clipfrac"].item() == 0.0


def test_value_loss_clipping_binds():
    values = torch.tensor([[1.0, 1.0]], requires_grad=True)
    old = torch.tensor([[0.0, 0.0]])
    returns = torch.tensor([[2.0, 0.0]])
    mask = torch.ones(1, 2, dtype=torch.bool)
    # token 0: unclipped (1-2)^2 = 1, V_clip = 0.5 -> (0.5-2)^2 = 2.25 -> max 2.25 (clipped side)
    # token 1: unclipped (1-0)^2 = 1, V_clip = 0.5 -> 0.25 -> max 1 (unclipped side)
    # loss = 0.5 * (2.25 + 1) / 2 = 0.8125 ; clipfrac = 1/2
    loss, stats = value_loss(values, returns, mask, old_values=old, clip_range=0.5)
    assert loss.item() == pytest.approx(0.8125)
    assert stats["clipfrac"].item() == pytest.approx(0.5)
    loss.backward()
    # token 0 is clipped: V_clip is constant in V -> zero gradient; token 1: (V - R) / n = 0.5
    torch.testing.assert_close(values.grad, torch.tensor([[0.0, 0.5]]))


def test_value_loss_matches_loop_reference():
    gen = torch.Generator().manual_seed(6)
    B, T, c = 5, 6, 0.3
    values = torch.randn(B, T, generator=gen, dtype=torch.float64)
    old = values + 0.5 * torch.randn(B, T, generator=gen, dtype=torch.float64)
    returns = torch.randn(B, T, generator=gen, dtype=torch.float64)
    mask = ragged_prefix_mask(B, T, gen)
    terms, clipped, plain = [], 0, []
    for b in range(B):
        for t in range(T):
            if not mask[b, t]:
                continue
            v, o, r = float(values[b, t]), float(old[b, t]), float(returns[b, t])
            vc = min(max(v, o - c), o + c)
            l1, l2 = (v - r) ** 2, (vc - r) ** 2
            terms.append(max(l1, l2))
            plain.append(l1)
            clipped += l2 > l1
    loss, stats = value_loss(values, returns, mask, old_values=old, clip_range=c)
    assert loss.item() == pytest.approx(0.5 * sum(terms) / len(terms))
    assert stats["clipfrac"].item() == pytest.approx(clipped / len(terms))
    assert 0 < clipped < len(terms)
    loss_plain, _ = value_loss(values, returns, mask)
    assert loss_plain.item() == pytest.approx(0.5 * sum(plain) / len(plain))


def test_value_loss_all_masked_and_errors():
    values = torch.randn(2, 3, requires_grad=True)
    returns = torch.randn(2, 3)
    none = torch.zeros(2, 3, dtype=torch.bool)
    loss, stats = value_loss(values, returns, none, old_values=returns, clip_range=0.2)
    assert loss.item() == 0.0 and stats["clipfrac"].item() == 0.0
    loss.backward()
    assert torch.isfinite(values.grad).all() and (values.grad == 0).all()
    m = torch.ones(2, 3, dtype=torch.bool)
    with pytest.raises(ValueError):
        value_loss(values, returns, m, clip_range=0.2)  # no old_values
    with pytest.raises(ValueError):
        value_loss(values, returns, m, old_values=returns, clip_range=0.0)
    with pytest.raises(ValueError):
        value_loss(values, torch.randn(2, 4), m)
    with pytest.raises(ValueError):
        value_loss(values, returns, m, old_values=torch.randn(3, 3), clip_range=0.2)


# --------------------------------------------------------------------------- #
# ppo_policy_loss
# --------------------------------------------------------------------------- #
def test_ppo_policy_loss_by_hand():
    # eps = 0.2. Per token (ratio rho, advantage A) -> min(rho A, clip(rho) A), clipped?
    #   (1.1, +1) -> min(1.1, 1.1)  =  1.1  no
    #   (1.5, +1) -> min(1.5, 1.2)  =  1.2  yes (gradient cut)
    #   (0.5, +1) -> min(0.5, 0.8)  =  0.5  no
    #   (0.5, -1) -> min(-0.5, -0.8) = -0.8 yes (gradient cut)
    #   (1.5, -1) -> min(-1.5, -1.2) = -1.5 no
    #   (100, +5) -> masked out
    # loss = -(1.1 + 1.2 + 0.5 - 0.8 - 1.5) / 5 = -0.1 ; clipfrac = 2/5 ; ratio_mean = 5.1/5 = 1.02
    ratios = torch.tensor([[1.1, 1.5, 0.5, 0.5, 1.5, 100.0]], dtype=torch.float64)
    adv = torch.tensor([[1.0, 1.0, 1.0, -1.0, -1.0, 5.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1, 1, 0]], dtype=torch.bool)
    old = torch.full((1, 6), -2.0, dtype=torch.float64)
    logp = (old + ratios.log()).requires_grad_(True)
    loss, stats = ppo_policy_loss(logp, old, adv, mask, clip_eps=0.2)
    assert loss.item() == pytest.approx(-0.1)
    assert stats["clipfrac"].item() == pytest.approx(0.4)
    assert stats["ratio_mean"].item() == pytest.approx(1.02)
    kl = sum(0.5 * math.log(r) ** 2 for r in (1.1, 1.5, 0.5, 0.5, 1.5)) / 5
    assert stats["approx_kl"].item() == pytest.approx(kl)
    assert all(not v.requires_grad and v.dim() == 0 for v in stats.values())
    loss.backward()
    # d/dlogp of -rho A / n is -A rho / n for active unclipped tokens; 0 for clipped and masked ones
    expected = torch.tensor([[-1.1 / 5, 0.0, -0.5 / 5, 0.0, 1.5 / 5, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(logp.grad, expected)


def test_ppo_policy_loss_unclipped_equals_surrogate():
    gen = torch.Generator().manual_seed(9)
    B, T = 4, 6
    old = -3 * torch.rand(B, T, generator=gen, dtype=torch.float64)
    logp = (old + 0.05 * (2 * torch.rand(B, T, generator=gen, dtype=torch.float64) - 1)).requires_grad_(True)
    adv = torch.randn(B, T, generator=gen, dtype=torch.float64)
    mask = ragged_prefix_mask(B, T, gen)
    loss, stats = ppo_policy_loss(logp, old, adv, mask, clip_eps=0.2)  # |log rho| <= 0.05: nothing clipped
    rho = (logp - old).exp()
    surrogate = -(adv * rho * mask).sum() / mask.sum()
    torch.testing.assert_close(loss, surrogate)
    assert stats["clipfrac"].item() == 0.0
    (g,) = torch.autograd.grad(loss, logp)
    (g_ref,) = torch.autograd.grad(surrogate, logp)
    torch.testing.assert_close(g, g_ref)


def test_ppo_policy_loss_matches_loop_reference():
    gen = torch.Generator().manual_seed(10)
    B, T, eps = 5, 7, 0.2
    old = -3 * torch.rand(B, T, generator=gen, dtype=torch.float64)
    logp = old + 0.6 * torch.randn(B, T, generator=gen, dtype=torch.float64)
    adv = torch.randn(B, T, generator=gen, dtype=torch.float64)
    mask = ragged_prefix_mask(B, T, gen)
    objs, nclip, ratios = [], 0, []
    for b in range(B):
        for t in range(T):
            if not mask[b, t]:
                continue
            rho, a = math.exp(float(logp[b, t] - old[b, t])), float(adv[b, t])
            unclipped, clipped = rho * a, min(max(rho, 1 - eps), 1 + eps) * a
            objs.append(min(unclipped, clipped))
            nclip += clipped < unclipped
            ratios.append(rho)
    loss, stats = ppo_policy_loss(logp, old, adv, mask, eps)
    assert loss.item() == pytest.approx(-sum(objs) / len(objs))
    assert stats["clipfrac"].item() == pytest.approx(nclip / len(objs))
    assert stats["ratio_mean"].item() == pytest.approx(sum(ratios) / len(ratios))
    assert 0 < nclip < len(objs)


def test_ppo_policy_loss_treats_old_logprobs_and_advantages_as_constants():
    old = torch.randn(2, 3, requires_grad=True)
    adv = torch.randn(2, 3, requires_grad=True)
    logp = (old.detach() + 0.1).requires_grad_(True)
    loss, _ = ppo_policy_loss(logp, old, adv, torch.ones(2, 3, dtype=torch.bool), 0.2)
    loss.backward()
    assert old.grad is None and adv.grad is None
    assert logp.grad is not None and logp.grad.abs().sum() > 0


def test_ppo_policy_loss_empty_rows_and_all_masked():
    logp = torch.tensor([[-1.0, -2.0], [80.0, float("inf")]], requires_grad=True)
    old = torch.tensor([[-1.0, -2.0], [-80.0, 0.0]])
    adv = torch.tensor([[1.0, -1.0], [3.0, 3.0]])
    mask = torch.tensor([[1, 1], [0, 0]], dtype=torch.bool)
    # row 1 is padding with a huge/inf log-ratio; it must not leak. Row 0: rho = 1 -> -(1 - 1)/2 = 0
    loss, stats = ppo_policy_loss(logp, old, adv, mask, 0.2)
    assert loss.item() == pytest.approx(0.0)
    assert all(torch.isfinite(v) for v in stats.values())
    loss.backward()
    assert torch.isfinite(logp.grad).all()
    torch.testing.assert_close(logp.grad, torch.tensor([[-0.5, 0.5], [0.0, 0.0]]))

    logp.grad = None
    loss, stats = ppo_policy_loss(logp, old, adv, torch.zeros_like(mask), 0.2)
    assert loss.item() == 0.0 and all(v.item() == 0.0 for v in stats.values())
    loss.backward()
    assert torch.isfinite(logp.grad).all() and (logp.grad == 0).all()


def test_ppo_policy_loss_errors():
    x = torch.zeros(2, 3)
    m = torch.ones(2, 3, dtype=torch.bool)
    for bad in (0.0, 1.0, -0.1, 1.5, float("nan")):
        with pytest.raises(ValueError):
            ppo_policy_loss(x, x, x, m, clip_eps=bad)
    with pytest.raises(ValueError):
        ppo_policy_loss(x, torch.zeros(2, 4), x, m, 0.2)
    with pytest.raises(ValueError):
        ppo_policy_loss(x, x, x, torch.ones(3, 3, dtype=torch.bool), 0.2)


# --------------------------------------------------------------------------- #
# aggregate_loss
# --------------------------------------------------------------------------- #
#: The generation budget passed to every loss for Dr. GRPO's aggregation (longer than the tests' widths).
BUDGET = 10


def aggregate_loop_reference(x, mask, loss_agg, budget=BUDGET):
    B, T = x.shape
    rows = [[float(x[b, t]) for t in range(T) if mask[b, t]] for b in range(B)]
    if loss_agg == "token_mean":
        tokens = [v for row in rows for v in row]
        return sum(tokens) / len(tokens) if tokens else 0.0
    if loss_agg == "seq_mean_token_mean":
        means = [sum(row) / len(row) for row in rows if row]
        return sum(means) / len(means) if means else 0.0
    return sum(sum(row) / budget for row in rows) / B


def test_aggregate_loss_by_hand():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, float("inf"), float("nan")], [9.0, 9.0, 9.0]], requires_grad=True)
    mask = torch.tensor([[1, 1, 1], [1, 0, 0], [0, 0, 0]], dtype=torch.bool)
    # token_mean: (1 + 2 + 3 + 4) / 4 = 2.5
    # seq_mean_token_mean: rows' means 2 and 4 (row 2 has no valid token: left out) -> 3
    # seq_mean_token_sum_norm with a budget of 4 tokens: (6 / 4 + 4 / 4 + 0) / 3 rows = 5 / 6
    expected = {"token_mean": 2.5, "seq_mean_token_mean": 3.0, "seq_mean_token_sum_norm": 5 / 6}
    grads = {"token_mean": [[1 / 4] * 3, [1 / 4, 0, 0], [0] * 3],
             "seq_mean_token_mean": [[1 / 6] * 3, [1 / 2, 0, 0], [0] * 3],
             "seq_mean_token_sum_norm": [[1 / 12] * 3, [1 / 12, 0, 0], [0] * 3]}
    assert aggregate_loss(x, mask).item() == pytest.approx(2.5)  # default: token_mean
    for mode in LOSS_AGG_MODES:
        x.grad = None
        loss = aggregate_loss(x, mask, mode, max_response_length=4)
        assert loss.dim() == 0 and loss.item() == pytest.approx(expected[mode])
        loss.backward()
        torch.testing.assert_close(x.grad, torch.tensor(grads[mode]))


@pytest.mark.parametrize("mode", LOSS_AGG_MODES)
def test_aggregate_loss_does_not_depend_on_the_padded_width(mode):
    """The same responses padded to widths 3, 4 and 24 give the same loss in every mode (Dr. GRPO divided by
    the padded width gave 0.833, 0.625 and 0.104)."""
    x = torch.tensor([[1.0, 2.0, 2.0], [0.5, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]], dtype=torch.bool)
    losses = [aggregate_loss(torch.nn.functional.pad(x, (0, extra)), torch.nn.functional.pad(mask, (0, extra)),
                             mode, max_response_length=4).item() for extra in (0, 1, 21)]
    assert losses == pytest.approx([losses[0]] * 3, rel=1e-6)
    if mode == "seq_mean_token_sum_norm":
        assert losses[0] == pytest.approx((5 / 4 + 0.5 / 4) / 2)


@pytest.mark.parametrize("mode", LOSS_AGG_MODES)
def test_aggregate_loss_matches_loop_reference(mode):
    gen = torch.Generator().manual_seed(60)
    B, T = 6, 7
    x = torch.randn(B, T, generator=gen, dtype=torch.float64)
    mask = ragged_prefix_mask(B, T, gen)
    expected = aggregate_loop_reference(x, mask, mode)
    assert aggregate_loss(x, mask, mode, max_response_length=BUDGET).item() == pytest.approx(expected)
    assert aggregate_loss(x, mask.int(), mode, max_response_length=BUDGET).item() == pytest.approx(expected)


def _split_counts(masks):
    """The :class:`BatchCounts` each of ``len(masks)`` simulated processes gets: its mask's counts summed over all."""
    total = torch.stack([torch.stack([c.tokens, c.sequences, c.rows]) for c in map(BatchCounts.of, masks)]).sum(0)
    return [BatchCounts.of(m, all_reduce=lambda local: total, world_size=len(masks)) for m in masks]


@pytest.mark.parametrize("mode", LOSS_AGG_MODES)
def test_aggregate_loss_over_processes_averages_to_the_one_process_loss_and_gradient(mode):
    """Rows split unevenly over two simulated processes (different widths, token counts and row counts): the
    processes' losses with the whole batch's counts average (as DDP averages gradients) to the loss of one process
    holding every row, and their gradients too; the mean of per-process means does not (the bug of issue 21)."""
    gen = torch.Generator().manual_seed(61)
    B, T = 8, 6
    x = torch.randn(B, T, generator=gen, dtype=torch.float64, requires_grad=True)
    mask = ragged_prefix_mask(B, T, gen)
    mask[:3, 4:] = False  # process 0's rows are at most 4 tokens long: it holds them 4 columns wide
    whole = aggregate_loss(x, mask, mode, max_response_length=BUDGET)
    (g_whole,) = torch.autograd.grad(whole, x)
    parts = [(x[:3, :4], mask[:3, :4]), (x[3:], mask[3:])]
    counts = _split_counts([m for _, m in parts])
    losses = [aggregate_loss(xp, mp, mode, counts=c, max_response_length=BUDGET)
              for (xp, mp), c in zip(parts, counts, strict=True)]
    average = sum(losses) / 2
    (g_split,) = torch.autograd.grad(average, x)
    torch.testing.assert_close(average, whole)
    torch.testing.assert_close(g_split, g_whole)
    mean_of_means = sum(aggregate_loss(xp, mp, mode, max_response_length=BUDGET) for xp, mp in parts) / 2
    assert abs(float(mean_of_means.detach() - whole.detach())) > 1e-3


def test_token_mean_of_issue_21():
    """Rank 0: 2 tokens of loss 1; rank 1: 8 tokens of loss 0. The token mean is 0.2, the mean of the ranks'
    means 0.5."""
    masks = [torch.ones(1, 2, dtype=torch.bool), torch.ones(2, 4, dtype=torch.bool)]
    values = [torch.ones(1, 2), torch.zeros(2, 4)]
    counts = _split_counts(masks)
    shares = [aggregate_loss(v, m, "token_mean", counts=c) for v, m, c in zip(values, masks, counts, strict=True)]
    assert float(sum(shares) / 2) == pytest.approx(0.2)
    assert float(sum(aggregate_loss(v, m) for v, m in zip(values, masks, strict=True)) / 2) == pytest.approx(0.5)


@pytest.mark.parametrize("mode", LOSS_AGG_MODES)
def test_aggregate_loss_all_masked_and_empty(mode):
    x = torch.full((2, 3), float("inf"), requires_grad=True)
    loss = aggregate_loss(x, torch.zeros(2, 3, dtype=torch.bool), mode, max_response_length=BUDGET)
    assert loss.item() == 0.0
    loss.backward()
    assert (x.grad == 0).all()
    for shape in ((0, 3), (2, 0)):
        empty = aggregate_loss(torch.zeros(shape), torch.zeros(shape, dtype=torch.bool), mode,
                               max_response_length=BUDGET)
        assert empty.item() == 0.0


def test_aggregate_loss_errors():
    x = torch.zeros(2, 3)
    m = torch.ones(2, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match="loss_agg"):
        aggregate_loss(x, m, "seq_mean")
    for budget in (None, 0):
        with pytest.raises(ValueError, match="max_response_length"):
            aggregate_loss(x, m, "seq_mean_token_sum_norm", max_response_length=budget)
    with pytest.raises(ValueError):
        aggregate_loss(x, torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError):
        aggregate_loss(torch.zeros(6), torch.ones(6, dtype=torch.bool), "seq_mean_token_mean")
    # token_mean pools any shape, as ppo_policy_loss always did
    assert aggregate_loss(torch.arange(6.0), torch.ones(6, dtype=torch.bool)).item() == pytest.approx(2.5)


# --------------------------------------------------------------------------- #
# ppo_policy_loss: clip-higher, loss aggregation, sequence-level ratio (GSPO)
# --------------------------------------------------------------------------- #
def _old_ppo_policy_loss(logprobs, old_logprobs, advantages, mask, clip_eps):
    """The implementation before clip_eps_high / loss_agg / ratio_level existed, verbatim."""
    m = mask.bool()
    dtype = torch.promote_types(torch.float32, logprobs.dtype)
    zero = torch.zeros((), dtype=dtype)
    log_ratio = torch.where(m, logprobs.to(dtype) - old_logprobs.detach().to(dtype), zero)
    adv = torch.where(m, advantages.detach().to(dtype), zero)
    ratio = torch.exp(log_ratio)
    pg_unclipped = -adv * ratio
    pg_clipped = -adv * ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps)
    return masked_mean(torch.maximum(pg_unclipped, pg_clipped), m)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_ppo_policy_loss_defaults_are_bit_identical_to_before(dtype):
    gen = torch.Generator().manual_seed(61)
    B, T = 6, 9
    old = -3 * torch.rand(B, T, generator=gen, dtype=dtype)
    logp = (old + 0.5 * torch.randn(B, T, generator=gen, dtype=dtype)).requires_grad_(True)
    adv = torch.randn(B, T, generator=gen, dtype=dtype)
    mask = ragged_prefix_mask(B, T, gen)
    ref = _old_ppo_policy_loss(logp, old, adv, mask, 0.2)
    (g_ref,) = torch.autograd.grad(ref, logp)
    for kwargs in ({}, {"clip_eps_high": None, "loss_agg": "token_mean", "ratio_level": "token"},
                   {"clip_eps_high": 0.2}):
        loss, _ = ppo_policy_loss(logp, old, adv, mask, 0.2, **kwargs)
        (g,) = torch.autograd.grad(loss, logp)
        assert torch.equal(loss, ref) and torch.equal(g, g_ref)


def test_ppo_policy_loss_clip_higher_by_hand():
    # eps = 0.2, eps_high = 0.28: rho is clipped to [0.8, 1.28]
    #   (1.25, +1) -> min(1.25, 1.25) =  1.25 no   (with eps_high = eps it would be clipped to 1.2)
    #   (1.5,  +1) -> min(1.5, 1.28)  =  1.28 yes
    #   (0.5,  -1) -> min(-0.5, -0.8) = -0.8  yes (the lower bound is unchanged)
    #   (1.5,  -1) -> min(-1.5, -1.28) = -1.5 no
    # loss = -(1.25 + 1.28 - 0.8 - 1.5) / 4 = -0.0575 ; clipfrac = 2/4
    ratios = torch.tensor([[1.25, 1.5, 0.5, 1.5]], dtype=torch.float64)
    adv = torch.tensor([[1.0, 1.0, -1.0, -1.0]], dtype=torch.float64)
    mask = torch.ones(1, 4, dtype=torch.bool)
    old = torch.full((1, 4), -1.0, dtype=torch.float64)
    logp = (old + ratios.log()).requires_grad_(True)
    loss, stats = ppo_policy_loss(logp, old, adv, mask, clip_eps=0.2, clip_eps_high=0.28)
    assert loss.item() == pytest.approx(-0.0575)
    assert stats["clipfrac"].item() == pytest.approx(0.5)
    loss.backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[-1.25 / 4, 0.0, 0.0, 1.5 / 4]], dtype=torch.float64))
    symmetric, stats_sym = ppo_policy_loss(logp, old, adv, mask, clip_eps=0.2)
    assert symmetric.item() == pytest.approx(-(1.2 + 1.2 - 0.8 - 1.5) / 4)
    assert stats_sym["clipfrac"].item() == pytest.approx(0.75)


def ppo_loop_reference(logp, old, adv, mask, eps, eps_high, loss_agg, ratio_level):
    """Per-token objectives in plain Python, then aggregated by aggregate_loop_reference."""
    B, T = logp.shape
    obj = torch.zeros(B, T, dtype=torch.float64)
    nclip, ntok, ratios = 0, 0, []
    for b in range(B):
        valid = [t for t in range(T) if mask[b, t]]
        if not valid:
            continue
        if ratio_level == "sequence":
            s = math.exp(sum(float(logp[b, t] - old[b, t]) for t in valid) / len(valid))
            a = sum(float(adv[b, t]) for t in valid) / len(valid)
        for t in valid:
            if ratio_level == "token":
                s, a = math.exp(float(logp[b, t] - old[b, t])), float(adv[b, t])
            unclipped, clipped = s * a, min(max(s, 1 - eps), 1 + eps_high) * a
            obj[b, t] = -min(unclipped, clipped)
            nclip += clipped < unclipped
            ntok += 1
            ratios.append(s)
    return aggregate_loop_reference(obj, mask, loss_agg), nclip / ntok, sum(ratios) / ntok


@pytest.mark.parametrize("ratio_level", ["token", "sequence"])
@pytest.mark.parametrize("loss_agg", LOSS_AGG_MODES)
def test_ppo_policy_loss_options_match_loop_reference(loss_agg, ratio_level):
    gen = torch.Generator().manual_seed(62)
    B, T, eps, eps_high = 8, 7, 0.2, 0.28
    old = -3 * torch.rand(B, T, generator=gen, dtype=torch.float64)
    logp = old + 0.5 * torch.randn(B, T, generator=gen, dtype=torch.float64)
    adv = torch.randn(B, T, generator=gen, dtype=torch.float64)
    mask = ragged_prefix_mask(B, T, gen)
    loss, stats = ppo_policy_loss(logp, old, adv, mask, eps, eps_high, loss_agg, ratio_level,
                                  max_response_length=BUDGET)
    ref_loss, ref_clipfrac, ref_ratio = ppo_loop_reference(logp, old, adv, mask, eps, eps_high, loss_agg, ratio_level)
    assert loss.item() == pytest.approx(ref_loss)
    assert stats["clipfrac"].item() == pytest.approx(ref_clipfrac)
    assert stats["ratio_mean"].item() == pytest.approx(ref_ratio)
    # approx_kl is the per-token k2 at both levels
    kl = masked_mean(0.5 * (logp - old).pow(2), mask)
    assert stats["approx_kl"].item() == pytest.approx(kl.item())
    assert 0 < ref_clipfrac < 1


def test_ppo_policy_loss_sequence_level_by_hand():
    old = torch.tensor([[-1.0, -2.0, -3.0], [-1.0, -1.0, -1.0]], dtype=torch.float64)
    delta = torch.tensor([[0.2, 0.0, 5.0], [0.6, 0.2, -9.0]], dtype=torch.float64)  # last column padding in row 0
    mask = torch.tensor([[1, 1, 0], [1, 1, 0]], dtype=torch.bool)
    adv = torch.tensor([[1.0, 1.0, 7.0], [1.0, 3.0, 7.0]], dtype=torch.float64)
    logp = (old + delta).requires_grad_(True)
    # row 0: s = exp(mean(0.2, 0)) = exp(0.1) = 1.105171 ; A = 1 ; not clipped ; objective 1.105171
    # row 1: s = exp(mean(0.6, 0.2)) = exp(0.4) = 1.491825 ; A = mean(1, 3) = 2 ; clipped to 1.2 -> 2.4
    # seq_mean_token_mean: -(1.105171 + 2.4) / 2 ; clipfrac: 2 of 4 tokens ; ratio_mean (2 s0 + 2 s1) / 4
    s0, s1 = math.exp(0.1), math.exp(0.4)
    loss, stats = ppo_policy_loss(logp, old, adv, mask, 0.2, loss_agg="seq_mean_token_mean", ratio_level="sequence")
    assert loss.item() == pytest.approx(-(s0 + 2.4) / 2)
    assert stats["clipfrac"].item() == pytest.approx(0.5)
    assert stats["ratio_mean"].item() == pytest.approx((s0 + s1) / 2)
    loss.backward()
    # GSPO: d(-s0 A / 2) / d logp_t = -A s0 (1/2) (1/2) for each of row 0's tokens ; row 1 clipped: 0
    torch.testing.assert_close(logp.grad, torch.tensor([[-s0 / 4, -s0 / 4, 0.0], [0.0, 0.0, 0.0]],
                                                       dtype=torch.float64))


def test_ppo_policy_loss_sequence_level_gradient_equals_gspo():
    gen = torch.Generator().manual_seed(63)
    B, T, eps, eps_high = 8, 6, 0.1, 0.15
    old = -3 * torch.rand(B, T, generator=gen, dtype=torch.float64)
    shift = 0.2 * torch.randn(B, 1, generator=gen, dtype=torch.float64)  # moves whole sequences past the clip
    logp = (old + shift + 0.3 * torch.randn(B, T, generator=gen, dtype=torch.float64)).requires_grad_(True)
    seq_adv = torch.randn(B, generator=gen, dtype=torch.float64)
    mask = ragged_prefix_mask(B, T, gen)
    adv = seq_adv.unsqueeze(1).expand(B, T)
    loss, _ = ppo_policy_loss(logp, old, adv, mask, eps, eps_high, "seq_mean_token_mean", "sequence")
    (g,) = torch.autograd.grad(loss, logp)
    # GSPO's sequence objective, differentiated through s_i itself: -1/G sum_i min(s_i A_i, clip(s_i) A_i)
    valid = mask.any(1)
    s = torch.exp(((logp - old) * mask).sum(1) / mask.sum(1).clamp(min=1))
    obj = torch.minimum(s * seq_adv, s.clamp(1 - eps, 1 + eps_high) * seq_adv)
    gspo = -(obj * valid).sum() / valid.sum()
    (g_ref,) = torch.autograd.grad(gspo, logp)
    torch.testing.assert_close(loss, gspo)
    torch.testing.assert_close(g, g_ref)
    clipped = (s.clamp(1 - eps, 1 + eps_high) * seq_adv < s * seq_adv) & valid
    assert 0 < clipped.sum() < valid.sum()  # both branches exercised


def test_ppo_policy_loss_sequence_level_averages_token_advantages():
    gen = torch.Generator().manual_seed(64)
    B, T = 4, 5
    old = -2 * torch.rand(B, T, generator=gen, dtype=torch.float64)
    logp = old + 0.1 * torch.randn(B, T, generator=gen, dtype=torch.float64)
    adv = torch.randn(B, T, generator=gen, dtype=torch.float64)
    mask = ragged_prefix_mask(B, T, gen)
    row_mean = masked_mean(adv, mask, dim=1).unsqueeze(1).expand(B, T)
    for mode in LOSS_AGG_MODES:
        a, _ = ppo_policy_loss(logp, old, adv, mask, 0.2, loss_agg=mode, ratio_level="sequence",
                               max_response_length=BUDGET)
        b, _ = ppo_policy_loss(logp, old, row_mean, mask, 0.2, loss_agg=mode, ratio_level="sequence",
                               max_response_length=BUDGET)
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("ratio_level", ["token", "sequence"])
@pytest.mark.parametrize("loss_agg", LOSS_AGG_MODES)
def test_ppo_policy_loss_options_padding_and_all_masked(loss_agg, ratio_level):
    logp = torch.tensor([[-1.0, -2.0], [80.0, float("inf")]], requires_grad=True)
    old = torch.tensor([[-1.0, -2.0], [-80.0, 0.0]])
    adv = torch.tensor([[1.0, -1.0], [3.0, 3.0]])
    mask = torch.tensor([[1, 1], [0, 0]], dtype=torch.bool)
    loss, stats = ppo_policy_loss(logp, old, adv, mask, 0.2, 0.3, loss_agg, ratio_level, max_response_length=BUDGET)
    assert torch.isfinite(loss) and all(torch.isfinite(v) for v in stats.values())
    loss.backward()
    assert torch.isfinite(logp.grad).all() and (logp.grad[1] == 0).all()
    logp.grad = None
    loss, stats = ppo_policy_loss(logp, old, adv, torch.zeros_like(mask), 0.2, 0.3, loss_agg, ratio_level,
                                  max_response_length=BUDGET)
    assert loss.item() == 0.0 and all(v.item() == 0.0 for v in stats.values())
    loss.backward()
    assert torch.isfinite(logp.grad).all() and (logp.grad == 0).all()


def test_ppo_policy_loss_option_errors():
    x = torch.zeros(2, 3)
    m = torch.ones(2, 3, dtype=torch.bool)
    for bad in (0.0, -0.1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="clip_eps_high"):
            ppo_policy_loss(x, x, x, m, 0.2, clip_eps_high=bad)
    with pytest.raises(ValueError, match="loss_agg"):
        ppo_policy_loss(x, x, x, m, 0.2, loss_agg="sum")
    with pytest.raises(ValueError, match="ratio_level"):
        ppo_policy_loss(x, x, x, m, 0.2, ratio_level="sequence_token")
    flat, flat_mask = torch.zeros(6), torch.ones(6, dtype=torch.bool)
    with pytest.raises(ValueError):
        ppo_policy_loss(flat, flat, flat, flat_mask, 0.2, ratio_level="sequence")
    with pytest.raises(ValueError):
        ppo_policy_loss(flat, flat, flat, flat_mask, 0.2, loss_agg="seq_mean_token_sum_norm", max_response_length=4)
    assert ppo_policy_loss(flat, flat, flat, flat_mask, 0.2)[0].item() == 0.0  # token level takes any shape


# --------------------------------------------------------------------------- #
# kl_loss
# --------------------------------------------------------------------------- #
def test_kl_loss_by_hand():
    ln2 = math.log(2.0)
    logp = torch.log(torch.tensor([[0.5, 0.25, 0.9], [0.5, 0.5, 0.5]])).requires_grad_(True)
    ref = torch.log(torch.tensor([[0.25, 0.25, 0.1], [0.5, 0.5, 0.5]]))
    mask = torch.tensor([[1, 1, 0], [0, 0, 0]], dtype=torch.bool)
    # k3 per valid token: (q/p - 1) - log(q/p) = (-0.5 + ln 2, 0) -> token mean (ln 2 - 0.5) / 2
    loss = kl_loss(logp, ref, mask)  # default k3, token_mean
    assert loss.dim() == 0 and loss.item() == pytest.approx((ln2 - 0.5) / 2, rel=1e-6)
    loss.backward()
    # d k3 / d logp = 1 - q/p: (1 - 0.5) / 2 and 0 ; padding and row 1: 0
    torch.testing.assert_close(logp.grad, torch.tensor([[0.25, 0.0, 0.0], [0.0, 0.0, 0.0]]))
    assert kl_loss(logp, ref, mask, "k1").item() == pytest.approx(ln2 / 2, rel=1e-6)
    assert kl_loss(logp, ref, mask, "k2").item() == pytest.approx(0.25 * ln2**2, rel=1e-6)
    # seq_mean_token_sum_norm: sum (ln 2 - 0.5) / the budget of 4 tokens, over B = 2 rows
    assert kl_loss(logp, ref, mask, loss_agg="seq_mean_token_sum_norm", max_response_length=4).item() == \
        pytest.approx((ln2 - 0.5) / 8, rel=1e-6)


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
@pytest.mark.parametrize("loss_agg", LOSS_AGG_MODES)
def test_kl_loss_matches_kl_penalty_and_loop(estimator, loss_agg):
    gen = torch.Generator().manual_seed(65)
    B, T = 5, 6
    logp = (-3 * torch.rand(B, T, generator=gen, dtype=torch.float64)).requires_grad_(True)
    ref = (-3 * torch.rand(B, T, generator=gen, dtype=torch.float64)).requires_grad_(True)
    mask = ragged_prefix_mask(B, T, gen)
    loss = kl_loss(logp, ref, mask, estimator, loss_agg, max_response_length=BUDGET)
    per_token = kl_penalty(logp.detach(), ref.detach(), estimator)
    assert loss.item() == pytest.approx(aggregate_loop_reference(per_token, mask, loss_agg))
    loss.backward()
    assert ref.grad is None  # the reference is a constant
    (g_ref,) = torch.autograd.grad(aggregate_loss(kl_penalty(logp, ref.detach(), estimator), mask, loss_agg,
                                                  max_response_length=BUDGET), logp)
    torch.testing.assert_close(logp.grad, g_ref)


def test_kl_loss_padding_all_masked_dtype_and_errors():
    logp = torch.tensor([[-1.0, 50.0]], dtype=torch.bfloat16, requires_grad=True)
    ref = torch.tensor([[-1.0, -float("inf")]])
    mask = torch.tensor([[1, 0]], dtype=torch.bool)
    loss = kl_loss(logp, ref, mask)
    assert loss.dtype == torch.float32 and loss.item() == 0.0
    loss.backward()
    assert torch.isfinite(logp.grad).all()
    assert kl_loss(logp, ref, torch.zeros_like(mask)).item() == 0.0
    x = torch.zeros(2, 3)
    m = torch.ones(2, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match="estimator"):
        kl_loss(x, x, m, estimator="k4")
    with pytest.raises(ValueError, match="loss_agg"):
        kl_loss(x, x, m, loss_agg="mean")
    with pytest.raises(ValueError):
        kl_loss(x, torch.zeros(2, 4), m)
    with pytest.raises(ValueError):
        kl_loss(torch.zeros(3), torch.zeros(3), torch.ones(3, dtype=torch.bool))


def test_tis_weights_by_hand():
    # cap 2. Per token: old (trainer) log-prob, sampler log-prob -> exp(old - sampler), truncated at 2
    #   (-1.0, -1.0)            -> exp(0)    = 1
    #   (-1.0, -1.5)            -> exp(0.5)  = 1.6487  (the trainer finds the token likelier)
    #   (-2.0, -1.0)            -> exp(-1)   = 0.3679
    #   (-0.1, -3.0)            -> exp(2.9)  = 18.17 -> 2 (truncated)
    #   (-9.0, -1.0) masked     -> 0
    old = torch.tensor([[-1.0, -1.0, -2.0, -0.1, -9.0]], dtype=torch.float64)
    sampler = torch.tensor([[-1.0, -1.5, -1.0, -3.0, -1.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1, 0]], dtype=torch.bool)
    w = tis_weights(old.requires_grad_(True), sampler, mask, cap=2.0)
    torch.testing.assert_close(w, torch.tensor([[1.0, math.exp(0.5), math.exp(-1.0), 2.0, 0.0]], dtype=torch.float64))
    assert not w.requires_grad
    for bad in (0.0, -1.0, math.inf, math.nan):
        with pytest.raises(ValueError, match="cap"):
            tis_weights(old, sampler, mask, cap=bad)
    with pytest.raises(ValueError):
        tis_weights(old, sampler[:, :3], mask, cap=2.0)


def test_ppo_policy_loss_token_weights_multiply_each_tokens_term():
    # The by-hand case above (terms 1.1, 1.2, 0.5, -0.8, -1.5 of min(rho A, clip(rho) A)), weighted per token
    # by (1, 0.5, 2, 1, 0) before the token mean: loss = -(1.1 + 0.6 + 1.0 - 0.8 + 0) / 5 = -0.38; weights 1
    # give the unweighted loss; the gradient of each token is scaled by its weight.
    ratios = torch.tensor([[1.1, 1.5, 0.5, 0.5, 1.5, 100.0]], dtype=torch.float64)
    adv = torch.tensor([[1.0, 1.0, 1.0, -1.0, -1.0, 5.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1, 1, 0]], dtype=torch.bool)
    old = torch.full((1, 6), -2.0, dtype=torch.float64)
    logp = (old + ratios.log()).requires_grad_(True)
    weights = torch.tensor([[1.0, 0.5, 2.0, 1.0, 0.0, 7.0]], dtype=torch.float64)
    loss, _ = ppo_policy_loss(logp, old, adv, mask, clip_eps=0.2, token_weights=weights)
    assert loss.item() == pytest.approx(-0.38)
    loss.backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[-1.1 / 5, 0.0, -2 * 0.5 / 5, 0.0, 0.0, 0.0]],
                                                       dtype=torch.float64))
    plain, _ = ppo_policy_loss(logp, old, adv, mask, clip_eps=0.2)
    ones, _ = ppo_policy_loss(logp, old, adv, mask, clip_eps=0.2, token_weights=torch.ones_like(old))
    assert ones.item() == plain.item()
