"""Advantage and return estimators: from per-token rewards (and a critic's values) to the advantages and the
return targets that the policy and value losses of :mod:`rlhf_lightning.algorithms.losses` consume.

* With a critic: :func:`td_targets` (one-step TD targets of the value stage) and :func:`gae` (generalized
  advantage estimation, Schulman et al. 2016: advantages and λ-returns).
* Critic-free, one advantage per response from the scores of the ``G`` responses to the same prompt:
  :func:`group_advantages` (GRPO; Dr. GRPO without the std), :func:`rloo_advantages` (leave-one-out);
  :func:`sequence_to_token_advantages` broadcasts them to tokens. :func:`reinforce_pp_advantages` and
  :func:`reinforce_pp_baseline_advantages` (REINFORCE++) whiten returns-to-go over the batch.

:data:`ADV_ESTIMATORS` names them as ``ppo.adv_estimator`` does. Shapes follow
:mod:`rlhf_lightning.algorithms.ops`: per-token tensors are ``(B, T)`` over response tokens and ``mask`` is true
at valid tokens (up to and including EOS). Per-response scores are ``(N,)`` with the ``G = group_size`` responses
of each prompt contiguous (rows ``[k G, (k + 1) G)`` answer prompt ``k``). Log-probabilities are natural logs."""

from __future__ import annotations

import operator
from collections.abc import Callable

import torch
from torch import Tensor

from rlhf_lightning.algorithms.ops import (
    bool_mask,
    check_2d,
    check_per_row,
    check_same_shape,
    check_unit_interval,
    float_dtype,
    last_valid_index,
    masked_whiten,
)

__all__ = [
    "ADV_ESTIMATORS",
    "CRITIC_ESTIMATORS",
    "GROUP_ESTIMATORS",
    "td_targets",
    "next_valid_values",
    "gae",
    "group_advantages",
    "rloo_advantages",
    "sequence_to_token_advantages",
    "reinforce_pp_advantages",
    "reinforce_pp_baseline_advantages",
]


#: Advantage estimators by name, each with the function that computes it (verl's ``algorithm.adv_estimator``
#: name in brackets where it has one):
#:
#: * ``"gae"``: :func:`gae` with a critic (verl ``"gae"``);
#: * ``"grpo"``: :func:`group_advantages` (verl ``"grpo"``);
#: * ``"dr_grpo"``: :func:`group_advantages` with ``std_normalize=False`` (verl ``"grpo"`` with
#:   ``norm_adv_by_std_in_grpo=False``);
#: * ``"rloo"``: :func:`rloo_advantages` (verl ``"rloo"``);
#: * ``"reinforce_pp"``: :func:`reinforce_pp_advantages` (verl ``"reinforce_plus_plus"``, OpenRLHF ``"reinforce"``);
#: * ``"reinforce_pp_baseline"``: :func:`reinforce_pp_baseline_advantages` (verl ``"reinforce_plus_plus_baseline"``,
#:   OpenRLHF ``"reinforce_baseline"``).
#:
#: ``"grpo"``, ``"dr_grpo"`` and ``"rloo"`` give one advantage per sequence: broadcast it to tokens with
#: :func:`sequence_to_token_advantages`.
ADV_ESTIMATORS = ("gae", "grpo", "dr_grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline")


#: The estimators that need a critic (V(s_t) in GAE); the others are critic-free.
CRITIC_ESTIMATORS = ("gae",)


#: The estimators whose baseline is the other samples of the same prompt (``num_generations`` ≥ 2).
GROUP_ESTIMATORS = ("grpo", "dr_grpo", "rloo", "reinforce_pp_baseline")


# --------------------------------------------------------------------------- #
# Critic targets and advantages
# --------------------------------------------------------------------------- #
def _prepare_returns_inputs(rewards: Tensor, values: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Validate and return detached ``(r, v, m)`` in a >= float32 dtype, ``r`` and ``v`` zeroed at invalid
    positions."""
    check_same_shape(rewards=rewards, values=values, mask=mask)
    check_2d("rewards", rewards)
    m = bool_mask(mask)
    dtype = float_dtype(rewards, values)
    zero = torch.zeros((), dtype=dtype, device=rewards.device)
    r = torch.where(m, rewards.detach().to(dtype), zero)
    v = torch.where(m, values.detach().to(dtype), zero)
    return r, v, m


def next_valid_values(values: Tensor, mask: Tensor) -> Tensor:
    """``V`` at the next valid token: ``out[b, t] = values[b, t']`` with ``t'`` the first valid position after
    ``t`` in row ``b`` (0 when there is none: the episode ends at the row's last valid token).

    With a prefix mask ``t' = t + 1``. With gaps (a multi-turn trajectory's environment tokens, 0 in its
    ``loss_mask``) the gaps are stepped over: the state after a policy token is the one the policy acts in next,
    after the environment's answer, and the critic reads its value at the policy's next token.

    Args:
        values: ``(B, T)`` float.
        mask: ``(B, T)`` bool or 0/1.

    Returns:
        ``(B, T)`` with ``values``' dtype (not masked: position ``t`` holds the next value whatever ``mask[b, t]``).

    Raises:
        ValueError: mismatched or non-2-D shapes.
    """
    check_same_shape(values=values, mask=mask)
    check_2d("values", values)
    m = bool_mask(mask)
    B, T = m.shape
    position = torch.arange(T, device=m.device).expand(B, T)
    at = torch.where(m, position, torch.full_like(position, T))  # valid positions, T elsewhere
    following = torch.cat([at[:, 1:], at.new_full((B, 1), T)], dim=1)  # the candidates strictly after t
    nxt = following.flip(1).cummin(dim=1).values.flip(1)  # (B, T): the first valid position after t, or T
    gathered = values.gather(1, nxt.clamp(max=max(T - 1, 0)))
    return torch.where(nxt < T, gathered, torch.zeros_like(gathered))


def td_targets(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float) -> Tensor:
    """One-step TD(0) targets ``y_t = r_t + gamma * V(s_{t+1})`` for critic training.

    Sutton & Barto, "Reinforcement Learning: An Introduction" (2nd ed.), eq. 6.2.
    The episode ends at the last valid token: ``V(s_{t+1}) = 0`` there and at
    every later position, so the last valid target is just its reward.

    Invalid positions between valid ones (the environment's tokens of a multi-turn
    trajectory) are stepped over: ``s_{t+1}`` is the state of the next valid token
    (:func:`next_valid_values`), one step of ``gamma`` away.

    Args:
        rewards: ``(B, T)`` per-token rewards (e.g. from :func:`compute_rewards`).
        values: ``(B, T)`` critic predictions ``V(s_t)``; only used as constants.
        mask: ``(B, T)`` bool or 0/1 mask of valid tokens (a prefix, or with gaps).
        gamma: discount factor in ``[0, 1]``.

    Returns:
        ``(B, T)`` targets, DETACHED (no gradient ever flows into ``values``
        through them), dtype ``promote(rewards, values, float32)``, exactly 0 at
        masked positions.

    Raises:
        ValueError: on mismatched or non-2-D shapes, or ``gamma`` outside ``[0, 1]``.
    """
    gamma = check_unit_interval("gamma", gamma)
    r, v, m = _prepare_returns_inputs(rewards, values, mask)
    targets = r + gamma * next_valid_values(v, m)
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

    The recursion runs over the valid tokens only: invalid positions between
    valid ones (the environment's tokens of a multi-turn trajectory, 0 in its
    ``loss_mask``) hold no reward, no value and no advantage, and are stepped
    over: ``t + 1`` reads "the next valid token", so ``delta_t`` bootstraps from
    the value at the policy's next token (the state after the environment's
    answer) and ``A_t`` carries ``gamma * lam * A_{next valid}``: one factor
    ``gamma * lam`` per policy step, none per environment token. With a prefix
    mask this is the usual recursion. Advantages are not whitened here; use
    :func:`rlhf_lightning.algorithms.ops.masked_whiten`.

    Args:
        rewards: ``(B, T)`` per-token rewards.
        values: ``(B, T)`` critic predictions ``V(s_t)`` (used as constants).
        mask: ``(B, T)`` bool or 0/1 mask of valid tokens (a prefix, or with gaps).
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
    r, v, m = _prepare_returns_inputs(rewards, values, mask)
    deltas = r + gamma * next_valid_values(v, m) - v
    deltas = torch.where(m, deltas, torch.zeros_like(deltas))

    T = deltas.shape[1]
    advantages = torch.zeros_like(deltas)
    running = torch.zeros_like(deltas[:, 0])  # A at the next valid token (0 past the row's last)
    for t in range(T - 1, -1, -1):  # reverse scan over time only; invalid positions carry `running` through
        running = torch.where(m[:, t], deltas[:, t] + gamma * lam * running, running)
        advantages[:, t] = torch.where(m[:, t], running, torch.zeros_like(running))
    returns = torch.where(m, advantages + v, torch.zeros_like(advantages))
    return advantages, returns


# --------------------------------------------------------------------------- #
# Critic-free advantages: group baselines and REINFORCE++
# --------------------------------------------------------------------------- #
def _grouped_scores(scores: Tensor, group_size: int) -> Tensor:
    """Validate and return ``scores`` DETACHED as a ``(N / G, G)`` float (>= float32) tensor, shifted by
    each group's first score.

    The shift leaves every difference from a group statistic unchanged in exact arithmetic, and makes
    an all-equal group exactly 0, so its advantages are exactly 0 (``r - mean(r)`` can be off by an
    ulp: ``mean(0.1, 0.1, 0.1) != 0.1`` in floating point).
    """
    if not isinstance(scores, Tensor) or scores.dim() != 1:
        raise ValueError(
            "scores must be a 1-D (N,) tensor, got "
            f"{tuple(scores.shape) if isinstance(scores, Tensor) else type(scores).__name__}"
        )
    try:
        group_size = operator.index(group_size)
    except TypeError:
        raise ValueError(f"group_size must be an int, got {type(group_size).__name__}") from None
    if group_size < 2:
        raise ValueError(
            f"group_size must be >= 2 (the baseline comes from the other samples of the prompt), got {group_size}"
        )
    if scores.shape[0] % group_size:
        raise ValueError(f"the number of scores ({scores.shape[0]}) is not a multiple of group_size ({group_size})")
    r = scores.detach().to(float_dtype(scores)).reshape(-1, group_size)
    return r - r[:, :1]


def group_advantages(scores: Tensor, group_size: int, std_normalize: bool = True, eps: float = 1e-6) -> Tensor:
    """Group-relative advantages of GRPO (Shao et al. 2024, "DeepSeekMath: Pushing the Limits of
    Mathematical Reasoning in Open Language Models", §4.1.2, outcome supervision) and Dr. GRPO
    (Liu et al. 2025, "Understanding R1-Zero-Like Training: A Critical Perspective").

    For each group of the ``G`` samples of one prompt, with ``mean`` and ``std`` the group's mean and
    sample standard deviation (unbiased, ``n - 1``, as TRL and verl compute it):

    * ``std_normalize=True`` (GRPO): ``A_i = (r_i - mean) / (std + eps)``;
    * ``std_normalize=False`` (Dr. GRPO, which drops the division as a source of bias toward
      too-easy and too-hard prompts): ``A_i = r_i - mean``.

    A group whose scores are all equal gets advantages exactly 0 (it carries no learning signal).
    Broadcast the result to tokens with :func:`sequence_to_token_advantages`.

    Args:
        scores: ``(N,)`` float scores (reward units), the ``G`` samples of each prompt contiguous.
        group_size: ``G >= 2``, samples per prompt; ``N`` must be a multiple of it.
        std_normalize: divide by the group's standard deviation (GRPO) or not (Dr. GRPO).
        eps: ``> 0``, added to the standard deviation (not the variance) before dividing.

    Returns:
        ``(N,)`` advantages, DETACHED, dtype ``promote(scores, float32)`` (scale-free with
        ``std_normalize``, reward units without).

    Raises:
        ValueError: ``scores`` not 1-D, ``group_size`` not an int or ``< 2`` (no baseline without
            another sample), ``N`` not a multiple of ``group_size``, or ``eps <= 0``.
    """
    eps = float(eps)
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    d = _grouped_scores(scores, group_size)
    adv = d - d.mean(dim=1, keepdim=True)
    if std_normalize:
        std = (adv.pow(2).sum(dim=1, keepdim=True) / (d.shape[1] - 1)).sqrt()  # unbiased, as torch.std
        adv = adv / (std + eps)
    return adv.reshape(-1)


def rloo_advantages(scores: Tensor, group_size: int) -> Tensor:
    """REINFORCE Leave-One-Out advantages (Kool et al. 2019, "Buy 4 REINFORCE Samples, Get a Baseline
    for Free!"; Ahmadian et al. 2024, "Back to Basics: Revisiting REINFORCE Style Optimization for
    Learning from Human Feedback in LLMs", §3, the RLOO estimator).

    ``A_i = r_i - (1 / (G - 1)) * sum_{j != i} r_j``: each sample's baseline is the mean score of the
    other ``G - 1`` samples of its prompt, so it does not depend on ``r_i`` and the estimate stays
    unbiased.  Equal to ``G / (G - 1) * (r_i - mean)``.  All-equal groups give exactly 0.

    Args:
        scores: ``(N,)`` float scores (reward units), the ``G`` samples of each prompt contiguous.
        group_size: ``G >= 2``; ``N`` must be a multiple of it.

    Returns:
        ``(N,)`` advantages in reward units, DETACHED, dtype ``promote(scores, float32)``.

    Raises:
        ValueError: ``scores`` not 1-D, ``group_size`` not an int or ``< 2``, or ``N`` not a multiple
            of ``group_size``.
    """
    d = _grouped_scores(scores, group_size)
    others_mean = (d.sum(dim=1, keepdim=True) - d) / (d.shape[1] - 1)
    return (d - others_mean).reshape(-1)


def sequence_to_token_advantages(advantages: Tensor, mask: Tensor) -> Tensor:
    """Broadcast one advantage per sequence to each of its valid tokens.

    ``out[b, t] = advantages[b]`` where ``mask[b, t]``, exactly 0 elsewhere (every token of an
    outcome-rewarded response shares its advantage, as in GRPO and RLOO).

    Args:
        advantages: ``(B,)`` float per-sequence advantages (e.g. from :func:`group_advantages`).
        mask: ``(B, T)`` bool or 0/1 mask of valid response tokens.

    Returns:
        ``(B, T)`` advantages, DETACHED, dtype ``promote(advantages, float32)``.

    Raises:
        ValueError: ``mask`` not a 2-D tensor or ``advantages`` not shaped ``(B,)``.
    """
    if not isinstance(mask, Tensor):
        raise ValueError(f"mask must be a torch.Tensor, got {type(mask).__name__}")
    check_2d("mask", mask)
    check_per_row("advantages", advantages, mask)
    dtype = float_dtype(advantages)
    zero = torch.zeros((), dtype=dtype, device=advantages.device)
    return torch.where(bool_mask(mask), advantages.detach().to(dtype).unsqueeze(1), zero)


def reinforce_pp_advantages(
    rewards: Tensor,
    mask: Tensor,
    gamma: float = 1.0,
    *,
    all_reduce: Callable[[Tensor], Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    """REINFORCE++ advantages (Hu 2025, "REINFORCE++: A Simple and Efficient Approach for Aligning
    Large Language Models": a token-level KL penalty in the reward and advantages normalised over the
    global batch).

    The returns are the discounted rewards-to-go of each token,
    ``G_t = sum_{k >= t} gamma^(n(k) - n(t)) r_k`` over the valid tokens ``k`` of its row, ``n`` counting
    valid tokens (GAE's advantage with ``V = 0`` and ``lambda = 1``: invalid tokens between valid ones are
    stepped over, as in :func:`gae`), and the advantages are
    those returns whitened over all valid tokens of the batch (:func:`rlhf_lightning.algorithms.ops.masked_whiten`:
    mean subtracted, divided by ``sqrt(unbiased variance + 1e-8)``), not per prompt: no critic, no
    group.  With ``rewards`` from :func:`rlhf_lightning.algorithms.kl.compute_rewards` and ``gamma = 1``,
    ``G_t = score - beta * sum_{k >= t} KL_k``.

    Args:
        rewards: ``(B, T)`` per-token rewards, KL penalty included and the score at the last valid
            token (as :func:`rlhf_lightning.algorithms.kl.compute_rewards` gives them).
        mask: ``(B, T)`` bool or 0/1 mask of valid tokens (a prefix, or with gaps).
        gamma: discount factor in ``[0, 1]``.
        all_reduce: keyword-only; passed to :func:`~rlhf_lightning.algorithms.ops.masked_whiten` to whiten with the
            statistics of every process's batch (``None``: this batch only).

    Returns:
        ``(advantages, returns)``, both ``(B, T)``, DETACHED, dtype ``promote(rewards, float32)``, exactly
        0 at masked positions (and all zeros for an all-masked batch).  ``returns`` are in reward units,
        ``advantages`` are whitened.

    Raises:
        ValueError: on mismatched or non-2-D shapes, or ``gamma`` outside ``[0, 1]``.
    """
    gamma = check_unit_interval("gamma", gamma)
    check_same_shape(rewards=rewards, mask=mask)
    check_2d("rewards", rewards)
    returns, _ = gae(rewards, torch.zeros_like(rewards), mask, gamma, 1.0)
    advantages = masked_whiten(returns, bool_mask(mask), all_reduce=all_reduce)
    return advantages, returns


def reinforce_pp_baseline_advantages(
    scores: Tensor,
    kl_rewards: Tensor,
    mask: Tensor,
    group_size: int,
    gamma: float = 1.0,
    *,
    all_reduce: Callable[[Tensor], Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    """REINFORCE++ with a group baseline ("REINFORCE++-baseline", Hu 2025, "REINFORCE++: A Simple and
    Efficient Approach for Aligning Large Language Models"; OpenRLHF's ``reinforce_baseline``).

    Exactly:

    1. ``c_i = score_i - mean of the G scores of its prompt`` (:func:`group_advantages` with
       ``std_normalize=False``; no division by the group's std);
    2. per-token rewards ``r[i, t] = kl_rewards[i, t]`` at valid tokens, plus ``c_i`` at the last valid
       token of row ``i`` (rows without a valid token get nothing; their score still counts in their
       group's mean);
    3. ``(advantages, returns) = reinforce_pp_advantages(r, mask, gamma)``: discounted rewards-to-go,
       whitened over the batch's valid tokens.

    So with ``gamma = 1``, ``returns[i, t] = c_i + sum_{k >= t} kl_rewards[i, k]``.  The KL penalty is
    not centred per group; only the score is.

    Args:
        scores: ``(B,)`` float sequence scores (reward units, e.g. after
            :func:`~rlhf_lightning.algorithms.kl.apply_missing_eos_penalty`), the ``G`` samples of each prompt
            contiguous.
        kl_rewards: ``(B, T)`` per-token KL penalty rewards WITHOUT the score, ``-beta * KL_t`` (e.g.
            ``-kl_coef * kl`` with ``kl`` from :func:`~rlhf_lightning.algorithms.kl.compute_rewards`); all
            zeros for no penalty.
        mask: ``(B, T)`` bool or 0/1 mask (a prefix, or with gaps).
        group_size: ``G >= 2``; ``B`` must be a multiple of it.
        gamma: discount factor in ``[0, 1]``.
        all_reduce: keyword-only, as in :func:`reinforce_pp_advantages` (whitening across processes;
            the groups themselves must be whole on each process).

    Returns:
        ``(advantages, returns)``, both ``(B, T)``, DETACHED, dtype ``promote(scores, kl_rewards,
        float32)``, exactly 0 at masked positions.

    Raises:
        ValueError: on mismatched or non-2-D shapes (``scores`` must be ``(B,)``), ``group_size`` not an
            int or ``< 2``, ``B`` not a multiple of it, or ``gamma`` outside ``[0, 1]``.
    """
    gamma = check_unit_interval("gamma", gamma)
    check_same_shape(kl_rewards=kl_rewards, mask=mask)
    check_2d("kl_rewards", kl_rewards)
    if not isinstance(scores, Tensor) or scores.shape != kl_rewards.shape[:1]:
        raise ValueError(
            f"scores must have shape ({kl_rewards.shape[0]},), got "
            f"{tuple(scores.shape) if isinstance(scores, Tensor) else type(scores).__name__}"
        )
    centred = group_advantages(scores, group_size, std_normalize=False)
    m = bool_mask(mask)
    dtype = float_dtype(scores, kl_rewards)
    zero = torch.zeros((), dtype=dtype, device=kl_rewards.device)
    rewards = torch.where(m, kl_rewards.detach().to(dtype), zero)
    row_score = torch.where(m.any(dim=1), centred.to(dtype), zero)
    rewards = rewards.scatter_add(1, last_valid_index(m).unsqueeze(1), row_score.unsqueeze(1))
    return reinforce_pp_advantages(rewards, m, gamma, all_reduce=all_reduce)
