"""Tests for the critic-free advantage estimators of rlhf_lightning.algorithms.advantages (GRPO, Dr. GRPO, RLOO,
REINFORCE++ and its group-baseline variant) and the per-sequence → per-token broadcast: hand-computed
numbers, naive Python-loop references and edge cases."""

from __future__ import annotations

import math
import statistics

import pytest
import torch

from conftest import ragged_prefix_mask
from rlhf_lightning.algorithms import losses
from rlhf_lightning.algorithms.advantages import (
    ADV_ESTIMATORS,
    group_advantages,
    reinforce_pp_advantages,
    reinforce_pp_baseline_advantages,
    rloo_advantages,
    sequence_to_token_advantages,
)
from rlhf_lightning.algorithms.kl import compute_rewards


def test_names_are_exported():
    assert ADV_ESTIMATORS == ("gae", "grpo", "dr_grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline")
    assert losses.LOSS_AGG_MODES == ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm")
    assert losses.RATIO_LEVELS == ("token", "sequence")
    for name in losses.__all__:
        assert hasattr(losses, name), name


# --------------------------------------------------------------------------- #
# group_advantages (GRPO / Dr. GRPO)
# --------------------------------------------------------------------------- #
def group_loop_reference(scores, G, std_normalize, eps):
    out = []
    values = [float(x) for x in scores]
    for k in range(0, len(values), G):
        group = values[k:k + G]
        mean = sum(group) / G
        std = statistics.stdev(group)  # unbiased (n - 1)
        out += [(r - mean) / (std + eps) if std_normalize else r - mean for r in group]
    return torch.tensor(out, dtype=torch.float64)


def test_group_advantages_by_hand():
    scores = torch.tensor([1.0, 2.0, 3.0, 5.0, 5.0, 5.0])
    # group 0: mean 2, sample std sqrt(((-1)^2 + 0 + 1^2) / 2) = 1 -> [-1, 0, 1] / (1 + 1e-6)
    # group 1: all equal -> exactly 0 (0 / (0 + eps))
    adv = group_advantages(scores, 3)
    torch.testing.assert_close(adv, torch.tensor([-1.0, 0.0, 1.0, 0.0, 0.0, 0.0]) / torch.tensor(
        [1 + 1e-6, 1 + 1e-6, 1 + 1e-6, 1.0, 1.0, 1.0]))
    assert (adv[3:] == 0).all()
    # Dr. GRPO: centred only
    torch.testing.assert_close(group_advantages(scores, 3, std_normalize=False),
                               torch.tensor([-1.0, 0.0, 1.0, 0.0, 0.0, 0.0]))
    # G = 2: std of {a, b} is |a - b| / sqrt(2) -> advantages -+ 1/sqrt(2)
    adv2 = group_advantages(torch.tensor([0.0, 4.0], dtype=torch.float64), 2, eps=1e-12)
    torch.testing.assert_close(adv2, torch.tensor([-1.0, 1.0], dtype=torch.float64) / math.sqrt(2))


@pytest.mark.parametrize("std_normalize", [True, False])
@pytest.mark.parametrize("G", [2, 3, 8])
def test_group_advantages_match_loop_reference(std_normalize, G):
    gen = torch.Generator().manual_seed(20 + G)
    scores = 3 * torch.randn(4 * G, generator=gen, dtype=torch.float64) + 1.0
    adv = group_advantages(scores, G, std_normalize=std_normalize, eps=1e-4)
    torch.testing.assert_close(adv, group_loop_reference(scores, G, std_normalize, 1e-4))
    # each group's advantages sum to 0
    torch.testing.assert_close(adv.reshape(-1, G).sum(1), torch.zeros(4, dtype=torch.float64))


def test_group_advantages_all_equal_groups_are_exactly_zero_and_finite():
    # 0.1 three times: a plain r - mean(r) is off by an ulp (mean(0.1, 0.1, 0.1) != 0.1)
    scores = torch.tensor([0.1, 0.1, 0.1, 7.3, 7.3, 7.3, -1e30, -1e30, -1e30])
    for std_normalize in (True, False):
        adv = group_advantages(scores, 3, std_normalize=std_normalize)
        assert (adv == 0).all() and torch.isfinite(adv).all()
    assert (rloo_advantages(scores, 3) == 0).all()


def test_group_advantages_dtype_and_detached():
    scores = torch.tensor([1.0, 2.0, 0.0, 4.0], dtype=torch.bfloat16, requires_grad=True)
    adv = group_advantages(scores, 2)
    assert adv.dtype == torch.float32 and not adv.requires_grad and adv.shape == (4,)
    assert rloo_advantages(scores, 2).dtype == torch.float32
    assert group_advantages(torch.zeros(0), 4).shape == (0,)  # no prompt, no advantage
    adv64 = group_advantages(torch.tensor([1, 3], dtype=torch.int64), 2)  # integer scores are promoted
    assert adv64.dtype == torch.float32


def test_group_advantages_errors():
    with pytest.raises(ValueError, match="group_size"):
        group_advantages(torch.zeros(4), 1)  # G = 1: no baseline
    with pytest.raises(ValueError, match="group_size"):
        group_advantages(torch.zeros(4), 0)
    with pytest.raises(ValueError, match="multiple"):
        group_advantages(torch.zeros(5), 2)
    with pytest.raises(ValueError, match="int"):
        group_advantages(torch.zeros(4), 2.0)
    with pytest.raises(ValueError, match="1-D"):
        group_advantages(torch.zeros(2, 2), 2)
    with pytest.raises(ValueError, match="1-D"):
        group_advantages([1.0, 2.0], 2)
    for bad in (0.0, -1e-6, float("nan")):
        with pytest.raises(ValueError, match="eps"):
            group_advantages(torch.zeros(4), 2, eps=bad)


# --------------------------------------------------------------------------- #
# rloo_advantages
# --------------------------------------------------------------------------- #
def rloo_loop_reference(scores, G):
    values = [float(x) for x in scores]
    out = []
    for k in range(0, len(values), G):
        group = values[k:k + G]
        for i, r in enumerate(group):
            others = [x for j, x in enumerate(group) if j != i]
            out.append(r - sum(others) / len(others))
    return torch.tensor(out, dtype=torch.float64)


def test_rloo_advantages_by_hand():
    # [1, 2, 3]: 1 - (2 + 3)/2 = -1.5 ; 2 - (1 + 3)/2 = 0 ; 3 - (1 + 2)/2 = 1.5
    # [0, 4] (G = 2 per group would need its own call): see below
    torch.testing.assert_close(rloo_advantages(torch.tensor([1.0, 2.0, 3.0, 6.0, 6.0, 0.0]), 3),
                               torch.tensor([-1.5, 0.0, 1.5, 3.0, 3.0, -6.0]))
    torch.testing.assert_close(rloo_advantages(torch.tensor([0.0, 4.0, 2.0, 2.0]), 2),
                               torch.tensor([-4.0, 4.0, 0.0, 0.0]))


@pytest.mark.parametrize("G", [2, 4, 5])
def test_rloo_advantages_match_loop_reference_and_scaled_dr_grpo(G):
    gen = torch.Generator().manual_seed(30 + G)
    scores = 2 * torch.randn(3 * G, generator=gen, dtype=torch.float64)
    adv = rloo_advantages(scores, G)
    torch.testing.assert_close(adv, rloo_loop_reference(scores, G))
    # RLOO = G / (G - 1) * (r - group mean)
    torch.testing.assert_close(adv, G / (G - 1) * group_advantages(scores, G, std_normalize=False))


def test_rloo_advantages_errors():
    with pytest.raises(ValueError, match="group_size"):
        rloo_advantages(torch.zeros(3), 1)
    with pytest.raises(ValueError, match="multiple"):
        rloo_advantages(torch.zeros(3), 2)
    with pytest.raises(ValueError, match="1-D"):
        rloo_advantages(torch.zeros(2, 3), 3)


# --------------------------------------------------------------------------- #
# sequence_to_token_advantages
# --------------------------------------------------------------------------- #
def test_sequence_to_token_advantages():
    adv = torch.tensor([2.0, -1.0, 5.0], requires_grad=True)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [0, 0, 0]])  # 0/1 int mask
    out = sequence_to_token_advantages(adv, mask)
    torch.testing.assert_close(out, torch.tensor([[2.0, 2.0, 0.0], [-1.0, -1.0, -1.0], [0.0, 0.0, 0.0]]))
    assert not out.requires_grad and out.dtype == torch.float32
    out16 = sequence_to_token_advantages(adv.detach().half(), mask.bool())
    assert out16.dtype == torch.float32
    with pytest.raises(ValueError):
        sequence_to_token_advantages(torch.zeros(2), mask)
    with pytest.raises(ValueError):
        sequence_to_token_advantages(torch.zeros(3, 1), mask)
    with pytest.raises(ValueError):
        sequence_to_token_advantages(torch.zeros(3), torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError):
        sequence_to_token_advantages(torch.zeros(3), [[1, 1]])


# --------------------------------------------------------------------------- #
# reinforce_pp_advantages
# --------------------------------------------------------------------------- #
def returns_to_go_loop(rewards, mask, gamma):
    B, T = rewards.shape
    out = torch.zeros(B, T, dtype=torch.float64)
    for b in range(B):
        n = int(mask[b].sum())
        running = 0.0
        for t in reversed(range(n)):
            running = float(rewards[b, t]) + gamma * running
            out[b, t] = running
    return out


def whiten_loop(x, mask, eps=1e-8):
    vals = [float(x[b, t]) for b in range(x.shape[0]) for t in range(x.shape[1]) if mask[b, t]]
    mean = sum(vals) / len(vals)
    var = sum((v - mean) ** 2 for v in vals) / max(len(vals) - 1, 1)
    out = torch.zeros(x.shape, dtype=torch.float64)
    for b in range(x.shape[0]):
        for t in range(x.shape[1]):
            if mask[b, t]:
                out[b, t] = (float(x[b, t]) - mean) / math.sqrt(var + eps)
    return out


def test_reinforce_pp_by_hand():
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.0, 2.0, 99.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.bool)
    # gamma 0.5: row 0 returns [0.25, 0.5, 1] ; row 1 [0 + 0.5 * 2, 2, 0 (padding)] = [1, 2, 0]
    # valid returns 0.25, 0.5, 1, 1, 2: mean 0.95 ; squared deviations .49 .2025 .0025 .0025 1.1025 = 1.8
    # unbiased variance 1.8 / 4 = 0.45 -> advantages (G - 0.95) / sqrt(0.45 + 1e-8)
    adv, ret = reinforce_pp_advantages(rewards, mask, gamma=0.5)
    torch.testing.assert_close(ret, torch.tensor([[0.25, 0.5, 1.0], [1.0, 2.0, 0.0]], dtype=torch.float64))
    expected = (torch.tensor([[0.25, 0.5, 1.0], [1.0, 2.0, 0.95]], dtype=torch.float64) - 0.95) / math.sqrt(0.45 + 1e-8)
    torch.testing.assert_close(adv, expected)
    assert adv[1, 2] == 0


@pytest.mark.parametrize("gamma", [1.0, 0.9, 0.0])
def test_reinforce_pp_matches_loop_reference(gamma):
    gen = torch.Generator().manual_seed(40)
    B, T = 6, 7
    rewards = torch.randn(B, T, generator=gen, dtype=torch.float64)
    rewards[:, 3] = float("inf")  # padding may hold anything
    mask = ragged_prefix_mask(B, T, gen)
    rewards = torch.where(mask, rewards.clamp(max=5.0), rewards)
    adv, ret = reinforce_pp_advantages(rewards, mask, gamma)
    ret_ref = returns_to_go_loop(torch.where(mask, rewards, torch.zeros(()).double()), mask, gamma)
    torch.testing.assert_close(ret, ret_ref)
    torch.testing.assert_close(adv, whiten_loop(ret_ref, mask))
    assert torch.isfinite(adv).all() and torch.isfinite(ret).all()
    assert (adv[~mask] == 0).all() and (ret[~mask] == 0).all()


def test_reinforce_pp_from_compute_rewards():
    gen = torch.Generator().manual_seed(41)
    B, T, beta = 4, 5, 0.1
    score = torch.randn(B, generator=gen, dtype=torch.float64)
    logp = -2 * torch.rand(B, T, generator=gen, dtype=torch.float64)
    ref = -2 * torch.rand(B, T, generator=gen, dtype=torch.float64)
    mask = ragged_prefix_mask(B, T, gen)
    rewards, kl = compute_rewards(score, logp, ref, mask, beta)
    adv, ret = reinforce_pp_advantages(rewards, mask)
    # gamma = 1: G_t = score - beta * sum_{k >= t} KL_k at valid tokens
    kl_to_go = kl.flip(1).cumsum(1).flip(1)
    torch.testing.assert_close(ret, torch.where(mask, score.unsqueeze(1) - beta * kl_to_go, torch.zeros(()).double()))
    # without a KL penalty the return is the score at every valid token of the row
    rewards0, _ = compute_rewards(score, logp, ref, mask, 0.0)
    _, ret0 = reinforce_pp_advantages(rewards0, mask)
    torch.testing.assert_close(ret0, sequence_to_token_advantages(score, mask).double())


def test_reinforce_pp_detached_all_masked_and_all_reduce():
    rewards = torch.randn(3, 4, requires_grad=True)
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]], dtype=torch.bool)
    adv, ret = reinforce_pp_advantages(rewards, mask)
    assert not adv.requires_grad and not ret.requires_grad and adv.dtype == torch.float32
    adv0, ret0 = reinforce_pp_advantages(rewards, torch.zeros_like(mask))
    assert (adv0 == 0).all() and (ret0 == 0).all()
    # a one-process all_reduce (identity sum) whitens like the local statistics
    adv_ar, _ = reinforce_pp_advantages(rewards, mask, all_reduce=lambda t: t)
    torch.testing.assert_close(adv_ar, adv)


def test_reinforce_pp_errors():
    x = torch.zeros(2, 3)
    m = torch.ones(2, 3, dtype=torch.bool)
    for bad in (-0.1, 1.1, float("nan")):
        with pytest.raises(ValueError, match="gamma"):
            reinforce_pp_advantages(x, m, gamma=bad)
    with pytest.raises(ValueError):
        reinforce_pp_advantages(x, torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError):
        reinforce_pp_advantages(torch.zeros(6), torch.ones(6, dtype=torch.bool))


# --------------------------------------------------------------------------- #
# reinforce_pp_baseline_advantages
# --------------------------------------------------------------------------- #
def baseline_loop_reference(scores, kl_rewards, mask, G, gamma):
    B, T = kl_rewards.shape
    rewards = torch.zeros(B, T, dtype=torch.float64)
    for b in range(B):
        k = b // G * G
        group = [float(s) for s in scores[k:k + G]]
        centred = float(scores[b]) - sum(group) / G
        n = int(mask[b].sum())
        for t in range(n):
            rewards[b, t] = float(kl_rewards[b, t])
        if n:
            rewards[b, n - 1] += centred
    ret = returns_to_go_loop(rewards, mask, gamma)
    return whiten_loop(ret, mask), ret


def test_reinforce_pp_baseline_by_hand():
    scores = torch.tensor([1.0, 3.0], dtype=torch.float64)
    kl_rewards = torch.tensor([[-0.5, 0.0], [0.0, 0.0]], dtype=torch.float64)
    mask = torch.ones(2, 2, dtype=torch.bool)
    # group mean 2 -> centred [-1, 1] at the last tokens ; rewards [[-0.5, -1], [0, 1]]
    # gamma 1: returns [[-1.5, -1], [1, 1]] ; mean -0.125 ; deviations -1.375 -0.875 1.125 1.125
    # squares 1.890625 + 0.765625 + 1.265625 + 1.265625 = 5.1875 ; unbiased var 5.1875 / 3
    adv, ret = reinforce_pp_baseline_advantages(scores, kl_rewards, mask, group_size=2)
    torch.testing.assert_close(ret, torch.tensor([[-1.5, -1.0], [1.0, 1.0]], dtype=torch.float64))
    expected = (ret + 0.125) / math.sqrt(5.1875 / 3 + 1e-8)
    torch.testing.assert_close(adv, expected)
    # a constant added to every score of a group changes nothing
    adv2, ret2 = reinforce_pp_baseline_advantages(scores + 10.0, kl_rewards, mask, group_size=2)
    torch.testing.assert_close(ret2, ret)
    torch.testing.assert_close(adv2, adv)


@pytest.mark.parametrize("gamma", [1.0, 0.95])
def test_reinforce_pp_baseline_matches_loop_reference(gamma):
    gen = torch.Generator().manual_seed(50)
    G, B, T = 3, 9, 6
    scores = torch.randn(B, generator=gen, dtype=torch.float64)
    kl_rewards = -0.1 * torch.rand(B, T, generator=gen, dtype=torch.float64)
    mask = ragged_prefix_mask(B, T, gen)  # row 1 is empty: no reward, but its score is in group 0's mean
    adv, ret = reinforce_pp_baseline_advantages(scores, kl_rewards, mask, G, gamma)
    adv_ref, ret_ref = baseline_loop_reference(scores, kl_rewards, mask, G, gamma)
    torch.testing.assert_close(ret, ret_ref)
    torch.testing.assert_close(adv, adv_ref)
    assert (adv[1] == 0).all() and (ret[1] == 0).all()


def test_reinforce_pp_baseline_equals_reinforce_pp_on_centred_scores():
    gen = torch.Generator().manual_seed(51)
    G, B, T, beta = 4, 8, 5, 0.05
    scores = torch.randn(B, generator=gen)
    logp = -2 * torch.rand(B, T, generator=gen)
    ref = -2 * torch.rand(B, T, generator=gen)
    mask = ragged_prefix_mask(B, T, gen)
    _, kl = compute_rewards(scores, logp, ref, mask, beta)
    adv, ret = reinforce_pp_baseline_advantages(scores, -beta * kl, mask, G)
    centred = group_advantages(scores, G, std_normalize=False)
    rewards, _ = compute_rewards(centred, logp, ref, mask, beta)
    adv_ref, ret_ref = reinforce_pp_advantages(rewards, mask)
    torch.testing.assert_close(ret, ret_ref)
    torch.testing.assert_close(adv, adv_ref)
    assert not adv.requires_grad and adv.dtype == torch.float32


def test_reinforce_pp_baseline_errors():
    kl = torch.zeros(4, 3)
    m = torch.ones(4, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match="group_size"):
        reinforce_pp_baseline_advantages(torch.zeros(4), kl, m, 1)
    with pytest.raises(ValueError, match="multiple"):
        reinforce_pp_baseline_advantages(torch.zeros(4), kl, m, 3)
    with pytest.raises(ValueError, match="scores"):
        reinforce_pp_baseline_advantages(torch.zeros(5), kl, m, 2)
    with pytest.raises(ValueError, match="scores"):
        reinforce_pp_baseline_advantages(torch.zeros(4, 1), kl, m, 2)
    with pytest.raises(ValueError):
        reinforce_pp_baseline_advantages(torch.zeros(4), kl, torch.ones(4, 2, dtype=torch.bool), 2)
    with pytest.raises(ValueError, match="gamma"):
        reinforce_pp_baseline_advantages(torch.zeros(4), kl, m, 2, gamma=2.0)
