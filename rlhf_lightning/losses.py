"""Losses and advantage estimators for RLHF (reward model, critic, PPO policy).

Shapes follow :mod:`rlhf_lightning.ops`: per-token tensors are ``(B, T)`` over
response tokens, and ``mask`` is a ``(B, T)`` bool or 0/1 tensor that is true at
valid tokens (up to and including EOS).  Token-level reductions are masked
means over *all* valid tokens of the batch; rows without a valid token add
nothing and an all-masked batch gives a loss of exactly 0 with finite (zero)
gradients.  Log-probabilities are natural logs (nats).

Statistics dictionaries hold detached 0-d tensors; nothing here calls
``.item()`` or otherwise synchronises with the host, except for validating
Python-number hyper-parameters.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from rlhf_lightning.ops import (
    bool_mask,
    check_2d,
    check_same_shape,
    check_unit_interval,
    float_dtype,
    masked_mean,
)

__all__ = [
    "pairwise_reward_loss",
    "td_targets",
    "gae",
    "value_loss",
    "ppo_policy_loss",
]

# --------------------------------------------------------------------------- #
# Reward model
# --------------------------------------------------------------------------- #
def pairwise_reward_loss(
    chosen_rewards: Tensor,
    rejected_rewards: Tensor,
    center_coef: float = 0.0,
    margin: float | Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Bradley-Terry pairwise loss for reward-model training, with optional centering.

    ``loss = mean_b[-log sigmoid(r_w - r_l - m)] + center_coef * mean_b[(r_w + r_l)^2]``

    The first term is the negative log-likelihood of the human preference under
    the Bradley-Terry model (Ouyang et al. 2022, "Training language models to
    follow instructions with human feedback", eq. 1), computed with
    ``F.logsigmoid`` so it is stable for large reward gaps.  The optional margin
    ``m`` follows Touvron et al. 2023 (Llama 2, eq. 2).  The second term is the
    reward-centering auxiliary loss of Eisenstein et al. 2023 ("Helping or
    Herding? Reward Model Ensembles Mitigate but do not Eliminate Reward
    Hacking"): the BT likelihood is invariant to adding a constant to all
    rewards, and this term pins that free constant so rewards stay near 0.

    Args:
        chosen_rewards: ``(B,)`` float scalar rewards ``r_w`` of the preferred
            responses (squeeze a ``(B, 1)`` reward-head output first).
        rejected_rewards: ``(B,)`` float rewards ``r_l`` of the rejected responses.
        center_coef: weight (>= 0) of the centering term; 0 disables it.
        margin: ``None`` (no margin), a Python float, or a ``(B,)`` tensor of
            per-pair margins subtracted from ``r_w - r_l`` inside the sigmoid.

    Returns:
        ``(loss, stats)``: ``loss`` is a 0-d tensor (differentiable w.r.t. both
        reward tensors).  ``stats`` holds detached 0-d tensors:
        ``accuracy`` (fraction with ``r_w > r_l``; ties count as wrong),
        ``margin_mean`` (mean ``r_w - r_l``, margin not subtracted),
        ``chosen_mean``, ``rejected_mean``, ``reward_abs_mean`` (mean ``|r|``
        over all 2B rewards), ``bt_loss`` and ``center_loss`` (the two
        unweighted terms).

    Raises:
        ValueError: if the reward tensors are not 1-D with equal shape, the batch
            is empty, ``center_coef < 0``, or a tensor margin is not shaped ``(B,)``.
    """
    check_same_shape(chosen_rewards=chosen_rewards, rejected_rewards=rejected_rewards)
    if chosen_rewards.dim() != 1:
        raise ValueError(
            f"rewards must be 1-D (B,), got {tuple(chosen_rewards.shape)}; squeeze the head output"
        )
    if chosen_rewards.numel() == 0:
        raise ValueError("pairwise_reward_loss needs a non-empty batch")
    center_coef = float(center_coef)
    if not center_coef >= 0:
        raise ValueError(f"center_coef must be >= 0, got {center_coef}")

    dtype = float_dtype(chosen_rewards, rejected_rewards)
    r_w = chosen_rewards.to(dtype)
    r_l = rejected_rewards.to(dtype)
    diff = r_w - r_l
    logits = diff
    if margin is not None:
        if isinstance(margin, Tensor):
            if margin.shape != chosen_rewards.shape:
                raise ValueError(
                    f"margin tensor must have shape {tuple(chosen_rewards.shape)}, got {tuple(margin.shape)}"
                )
            logits = diff - margin.to(dtype)
        else:
            logits = diff - float(margin)

    bt_loss = -F.logsigmoid(logits).mean()
    center_loss = (r_w + r_l).pow(2).mean()
    loss = bt_loss + center_coef * center_loss if center_coef > 0 else bt_loss

    with torch.no_grad():
        stats = {
            "accuracy": (diff > 0).to(dtype).mean(),
            "margin_mean": diff.mean(),
            "chosen_mean": r_w.mean(),
            "rejected_mean": r_l.mean(),
            "reward_abs_mean": torch.cat([r_w, r_l]).abs().mean(),
            "bt_loss": bt_loss.detach(),
            "center_loss": center_loss.detach(),
        }
    return loss, stats


# --------------------------------------------------------------------------- #
# Critic targets and advantages
# --------------------------------------------------------------------------- #
def _prepare_returns_inputs(
    rewards: Tensor, values: Tensor, mask: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Validate and return detached ``(r, v, m, next_valid)`` in a >= float32 dtype.

    ``r`` and ``v`` are zeroed at invalid positions; ``next_valid[:, t]`` is
    ``mask[:, t + 1]`` (False at ``t = T - 1``), i.e. whether ``V(s_{t+1})`` may
    be bootstrapped from.
    """
    check_same_shape(rewards=rewards, values=values, mask=mask)
    check_2d("rewards", rewards)
    m = bool_mask(mask)
    dtype = float_dtype(rewards, values)
    zero = torch.zeros((), dtype=dtype, device=rewards.device)
    r = torch.where(m, rewards.detach().to(dtype), zero)
    v = torch.where(m, values.detach().to(dtype), zero)
    next_valid = torch.cat([m[:, 1:], torch.zeros_like(m[:, :1])], dim=1)
    return r, v, m, next_valid


def _next_values(v: Tensor, next_valid: Tensor) -> Tensor:
    """``V(s_{t+1})`` aligned with ``t``, 0 where ``t+1`` is not a valid token."""
    shifted = torch.cat([v[:, 1:], torch.zeros_like(v[:, :1])], dim=1)
    return torch.where(next_valid, shifted, torch.zeros_like(shifted))


def td_targets(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float) -> Tensor:
    """One-step TD(0) targets ``y_t = r_t + gamma * V(s_{t+1})`` for critic training.

    Sutton & Barto, "Reinforcement Learning: An Introduction" (2nd ed.), eq. 6.2.
    The episode ends at the last valid token: ``V(s_{t+1}) = 0`` there and at
    every later position, so the last valid target is just its reward.

    ``mask`` is expected to be a prefix mask (each row's valid tokens come first).
    For any other mask, bootstrapping from ``t + 1`` happens exactly when
    position ``t + 1`` is valid, i.e. a gap acts as an episode end.

    Args:
        rewards: ``(B, T)`` per-token rewards (e.g. from :func:`compute_rewards`).
        values: ``(B, T)`` critic predictions ``V(s_t)``; only used as constants.
        mask: ``(B, T)`` bool or 0/1 prefix mask of valid tokens.
        gamma: discount factor in ``[0, 1]``.

    Returns:
        ``(B, T)`` targets, DETACHED (no gradient ever flows into ``values``
        through them), dtype ``promote(rewards, values, float32)``, exactly 0 at
        masked positions.

    Raises:
        ValueError: on mismatched or non-2-D shapes, or ``gamma`` outside ``[0, 1]``.
    """
    gamma = check_unit_interval("gamma", gamma)
    r, v, m, next_valid = _prepare_returns_inputs(rewards, values, mask)
    targets = r + gamma * _next_values(v, next_valid)
    return torch.where(m, targets, torch.zeros_like(targets))


def gae(
    rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float
) -> tuple[Tensor, Tensor]:
    """Generalized Advantage Estimation (Schulman et al. 2016, "High-Dimensional
    Continuous Control Using Generalized Advantage Estimation", eq. 16).

    ``delta_t = r_t + gamma * V(s_{t+1}) - V(s_t)``,
    ``A_t = delta_t + gamma * lam * A_{t+1}`` (a reverse scan over ``T``,
    vectorised over the batch), and ``returns_t = A_t + V(s_t)`` (the
    ``lambda``-return, the critic's regression target).  ``V(s_{t+1})`` and
    ``A_{t+1}`` are 0 at and after each row's last valid token.  ``lam = 0``
    gives ``A_t = delta_t``; ``lam = 1`` gives the discounted return minus
    ``V(s_t)``, so with ``gamma = lam = 1`` the returns are the reward-to-go.

    ``mask`` is expected to be a prefix mask; for other masks, a gap acts as an
    episode end (the recursion bootstraps from ``t + 1`` only if it is valid).
    Advantages are not whitened here; use :func:`rlhf_lightning.ops.masked_whiten`.

    Args:
        rewards: ``(B, T)`` per-token rewards.
        values: ``(B, T)`` critic predictions ``V(s_t)`` (used as constants).
        mask: ``(B, T)`` bool or 0/1 prefix mask.
        gamma: discount factor in ``[0, 1]``.
        lam: GAE ``lambda`` in ``[0, 1]``.

    Returns:
        ``(advantages, returns)``, both ``(B, T)``, DETACHED, dtype
        ``promote(rewards, values, float32)``, exactly 0 at masked positions.

    Raises:
        ValueError: on mismatched or non-2-D shapes, or ``gamma``/``lam``
            outside ``[0, 1]``.
    """
    gamma = check_unit_interval("gamma", gamma)
    lam = check_unit_interval("lam", lam)
    r, v, m, next_valid = _prepare_returns_inputs(rewards, values, mask)
    deltas = r + gamma * _next_values(v, next_valid) - v
    deltas = torch.where(m, deltas, torch.zeros_like(deltas))
    carry_coef = gamma * lam * next_valid.to(deltas.dtype)

    T = deltas.shape[1]
    advantages = torch.zeros_like(deltas)
    running = torch.zeros_like(deltas[:, 0])
    for t in range(T - 1, -1, -1):  # reverse scan over time only
        running = deltas[:, t] + carry_coef[:, t] * running
        advantages[:, t] = running
    returns = torch.where(m, advantages + v, torch.zeros_like(advantages))
    return advantages, returns


def value_loss(
    values: Tensor,
    returns: Tensor,
    mask: Tensor,
    old_values: Tensor | None = None,
    clip_range: float | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Critic regression loss, optionally with PPO-style value clipping.

    Unclipped: ``0.5 * masked_mean((V - R)^2)``.
    Clipped (``old_values`` and ``clip_range`` given):
    ``V_clip = old + clamp(V - old, -c, c)`` and
    ``0.5 * masked_mean(max((V - R)^2, (V_clip - R)^2))`` (the PPO2 baselines
    value clipping; see Huang et al. 2024, "The N+ Implementation Details of
    RLHF with PPO: A Case Study on TL;DR Summarization").

    Args:
        values: ``(B, T)`` current critic predictions (differentiable).
        returns: ``(B, T)`` regression targets (e.g. from :func:`gae`); detached here.
        mask: ``(B, T)`` bool or 0/1 mask.
        old_values: optional ``(B, T)`` predictions of the critic that collected
            the rollout; detached here.  Ignored unless ``clip_range`` is given.
        clip_range: optional clip half-width ``c > 0``, in reward units.

    Returns:
        ``(loss, stats)``: ``loss`` is 0-d, dtype ``promote(values, returns,
        float32)``; ``stats["clipfrac"]`` is the detached fraction of valid
        tokens where the clipped term is strictly larger (0 when not clipping).

    Raises:
        ValueError: on mismatched shapes, ``clip_range <= 0``, or ``clip_range``
            given without ``old_values``.
    """
    check_same_shape(values=values, returns=returns, mask=mask)
    m = bool_mask(mask)
    dtype = float_dtype(values, returns)
    v = values.to(dtype)
    r = returns.detach().to(dtype)
    loss_unclipped = (v - r).pow(2)
    if clip_range is None:
        loss = 0.5 * masked_mean(loss_unclipped, m)
        clipfrac = torch.zeros((), dtype=dtype, device=values.device)
    else:
        clip_range = float(clip_range)
        if not clip_range > 0:
            raise ValueError(f"clip_range must be > 0, got {clip_range}")
        if old_values is None:
            raise ValueError("clip_range requires old_values")
        check_same_shape(values=values, old_values=old_values)
        old = old_values.detach().to(dtype)
        v_clipped = old + (v - old).clamp(-clip_range, clip_range)
        loss_clipped = (v_clipped - r).pow(2)
        loss = 0.5 * masked_mean(torch.maximum(loss_unclipped, loss_clipped), m)
        with torch.no_grad():
            clipfrac = masked_mean((loss_clipped > loss_unclipped).to(dtype), m)
    return loss, {"clipfrac": clipfrac.detach()}


# --------------------------------------------------------------------------- #
# Policy
# --------------------------------------------------------------------------- #
def ppo_policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_eps: float,
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO clipped surrogate objective (Schulman et al. 2017, "Proximal Policy
    Optimization Algorithms", eq. 7), negated to be minimised.

    ``rho = exp(logprobs - old_logprobs)``;
    ``loss = masked_mean(max(-A * rho, -A * clip(rho, 1 - eps, 1 + eps)))``,
    i.e. ``-masked_mean(min(rho A, clip(rho) A))`` averaged over all valid tokens.
    ``old_logprobs`` and ``advantages`` are detached (constants).

    Args:
        logprobs: ``(B, T)`` log-probs of the sampled tokens under the current
            policy (nats, differentiable).
        old_logprobs: ``(B, T)`` log-probs under the policy that sampled them.
        advantages: ``(B, T)`` advantage estimates (e.g. whitened GAE).
        mask: ``(B, T)`` bool or 0/1 mask.
        clip_eps: clipping range ``epsilon`` in ``(0, 1)``.

    Returns:
        ``(loss, stats)``: ``loss`` is 0-d, dtype ``promote(inputs, float32)``.
        ``stats`` (detached 0-d tensors, masked means over valid tokens):
        ``clipfrac`` (fraction of tokens where the clipped term is strictly
        the active one, i.e. the gradient is cut), ``approx_kl``
        (``0.5 * (logprobs - old_logprobs)^2``: the k2 estimator of
        ``KL(pi_old || pi_theta)`` for tokens sampled from ``pi_old``), and
        ``ratio_mean`` (mean ``rho``).

    Raises:
        ValueError: on mismatched shapes or ``clip_eps`` outside ``(0, 1)``.
    """
    check_same_shape(logprobs=logprobs, old_logprobs=old_logprobs, advantages=advantages, mask=mask)
    clip_eps = float(clip_eps)
    if not (0.0 < clip_eps < 1.0):
        raise ValueError(f"clip_eps must be in (0, 1), got {clip_eps}")
    m = bool_mask(mask)
    dtype = float_dtype(logprobs, old_logprobs, advantages)
    zero = torch.zeros((), dtype=dtype, device=logprobs.device)
    # Zero the log-ratio at padding so exp() cannot overflow there (inf * 0 -> NaN grads).
    log_ratio = torch.where(m, logprobs.to(dtype) - old_logprobs.detach().to(dtype), zero)
    adv = torch.where(m, advantages.detach().to(dtype), zero)
    ratio = torch.exp(log_ratio)
    pg_unclipped = -adv * ratio
    pg_clipped = -adv * ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps)
    loss = masked_mean(torch.maximum(pg_unclipped, pg_clipped), m)
    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean((pg_clipped > pg_unclipped).to(dtype), m),
            "approx_kl": masked_mean(0.5 * log_ratio.pow(2), m),
            "ratio_mean": masked_mean(ratio, m),
        }
    return loss, {k: v.detach() for k, v in stats.items()}

