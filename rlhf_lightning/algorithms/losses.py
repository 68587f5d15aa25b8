"""Losses of RLHF: the reward model's, the critic's, the PPO policy's (and its KL term), and DPO's.

Shapes follow :mod:`rlhf_lightning.algorithms.ops`: per-token tensors are ``(B, T)`` over
response tokens, and ``mask`` is a ``(B, T)`` bool or 0/1 tensor that is true at
valid tokens (up to and including EOS).  Token-level reductions are masked
means over *all* valid tokens of the batch; rows without a valid token add
nothing and an all-masked batch gives a loss of exactly 0 with finite (zero)
gradients.  Log-probabilities are natural logs (nats). The advantages the
policy loss takes come from :mod:`rlhf_lightning.algorithms.advantages`.

Statistics dictionaries hold detached 0-d tensors; nothing here calls
``.item()`` or otherwise synchronises with the host, except for validating
Python-number hyper-parameters."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from rlhf_lightning.algorithms.kl import KL_ESTIMATORS, kl_penalty
from rlhf_lightning.algorithms.ops import (
    BatchCounts,
    bool_mask,
    check_2d,
    check_same_shape,
    float_dtype,
    masked_mean,
    masked_sum,
    token_mean,
)

__all__ = [
    "DPO_LOSS_TYPES",
    "LOSS_AGG_MODES",
    "RATIO_LEVELS",
    "pairwise_reward_loss",
    "dpo_loss",
    "value_loss",
    "aggregate_loss",
    "ppo_policy_loss",
    "kl_loss",
]


#: Names accepted by :func:`aggregate_loss` (and the ``loss_agg`` of :func:`ppo_policy_loss`, :func:`kl_loss`).
LOSS_AGG_MODES = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm")

#: Names accepted by the ``ratio_level`` of :func:`ppo_policy_loss`.
RATIO_LEVELS = ("token", "sequence")

#: Preference-optimisation losses of :func:`dpo_loss` (TRL's ``loss_type`` names).
DPO_LOSS_TYPES = ("sigmoid", "ipo", "hinge")


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


def value_loss(
    values: Tensor,
    returns: Tensor,
    mask: Tensor,
    old_values: Tensor | None = None,
    clip_range: float | None = None,
    *,
    counts: BatchCounts | None = None,
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
        counts: keyword-only, the whole batch's counts over data-parallel processes: the mean (and
            ``clipfrac``) over every process's valid tokens, this process's share
            (:func:`~rlhf_lightning.algorithms.ops.token_mean`); ``None``: this batch's mean.

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
        loss = 0.5 * token_mean(loss_unclipped, m, counts)
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
        loss = 0.5 * token_mean(torch.maximum(loss_unclipped, loss_clipped), m, counts)
        with torch.no_grad():
            clipfrac = token_mean((loss_clipped > loss_unclipped).to(dtype), m, counts)
    return loss, {"clipfrac": clipfrac.detach()}


# --------------------------------------------------------------------------- #
# Policy
# --------------------------------------------------------------------------- #
def aggregate_loss(per_token_loss: Tensor, mask: Tensor, loss_agg: str = "token_mean", *,
                   counts: BatchCounts | None = None, max_response_length: int | None = None) -> Tensor:
    """Reduce a per-token loss to a 0-d loss over the valid tokens, in one of :data:`LOSS_AGG_MODES`.

    * ``"token_mean"``: mean over all valid tokens of the batch, every token weighing the same
      (DAPO's token-level loss, Yu et al. 2025, "DAPO: An Open-Source LLM Reinforcement Learning
      System at Scale", eq. 12; PPO's usual mean).
    * ``"seq_mean_token_mean"``: each sequence's mean over its valid tokens, then the mean over the
      sequences that have at least one valid token (GRPO's ``1/G sum_i 1/|o_i| sum_t``, Shao et al.
      2024, eq. 3); rows without a valid token are left out of the sequence mean.
    * ``"seq_mean_token_sum_norm"``: each sequence's sum over its valid tokens divided by the generation
      budget ``max_response_length`` (a constant: the response length cap, not the batch's padded width),
      then the mean over ALL rows: ``masked_sum / (B * max_response_length)`` (Dr. GRPO, Liu et al. 2025,
      "Understanding R1-Zero-Like Training: A Critical Perspective", eq. 3 and §3.1; TRL's
      ``max_completion_length``, verl's ``loss_scale_factor``). The same response weighs the same whatever
      else is in the batch; rows without a valid token add 0 but count.

    With ``counts`` (:class:`~rlhf_lightning.algorithms.ops.BatchCounts`: the batch of every data-parallel process),
    the denominators are the whole batch's (tokens, sequences or rows over every process) divided by the
    number of processes, so that the average of the processes' gradients (DDP's) is the gradient of the
    loss of the whole batch in one process; ``None``: this batch's own counts.

    An all-masked batch gives exactly 0 with zero, finite gradients in every mode.

    Args:
        per_token_loss: ``(B, T)`` float loss per token (differentiable); ``"token_mean"`` also takes
            any other shape (all valid entries pooled).
        mask: bool or 0/1 mask of valid tokens, shaped like ``per_token_loss``.
        loss_agg: one of :data:`LOSS_AGG_MODES`.
        counts: keyword-only, the whole batch's counts over processes, or ``None``.
        max_response_length: keyword-only, the generation budget in tokens (``"seq_mean_token_sum_norm"``
            only, where it is required; ``ppo.generation.max_new_tokens``).

    Returns:
        0-d tensor with ``per_token_loss``'s dtype.  Values at masked positions are selected away
        (``inf``/``NaN`` there cannot leak).

    Raises:
        ValueError: on mismatched shapes, a non-2-D input to a per-sequence mode, an unknown
            ``loss_agg``, or ``"seq_mean_token_sum_norm"`` without a positive ``max_response_length``.
    """
    check_same_shape(per_token_loss=per_token_loss, mask=mask)
    if loss_agg not in LOSS_AGG_MODES:
        raise ValueError(f"unknown loss_agg {loss_agg!r}; expected one of {LOSS_AGG_MODES}")
    m = bool_mask(mask)
    if loss_agg == "token_mean":
        return token_mean(per_token_loss, m, counts)
    check_2d("per_token_loss", per_token_loss)
    if counts is None:
        counts = BatchCounts.of(m)
    if loss_agg == "seq_mean_token_mean":
        total = masked_mean(per_token_loss, m, dim=1).sum()  # rows without a valid token give 0
        return total / counts.per_process("sequences").to(total.dtype)
    if max_response_length is None or not max_response_length > 0:
        raise ValueError("loss_agg='seq_mean_token_sum_norm' divides by the generation budget: pass "
                         f"max_response_length > 0 (got {max_response_length!r})")
    total = masked_sum(per_token_loss, m) / float(max_response_length)
    return total / counts.per_process("rows").to(total.dtype)


def ppo_policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_eps: float,
    clip_eps_high: float | None = None,
    loss_agg: str = "token_mean",
    ratio_level: str = "token",
    token_weights: Tensor | None = None,
    *,
    counts: BatchCounts | None = None,
    max_response_length: int | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO clipped surrogate objective (Schulman et al. 2017, "Proximal Policy
    Optimization Algorithms", eq. 7), negated to be minimised, with DAPO's clip-higher,
    a choice of loss aggregation and GSPO's sequence-level ratio.

    Per valid token, with ratio ``rho`` and advantage ``A``:
    ``l_t = max(-A * rho, -A * clip(rho, 1 - eps, 1 + eps_high))``, i.e. ``-min(rho A, clip(rho) A)``;
    ``loss = aggregate_loss(l, mask, loss_agg)``.  ``old_logprobs`` and ``advantages`` are detached
    (constants).  The defaults (``eps_high = eps``, ``"token_mean"``, ``"token"``) are the plain PPO
    loss averaged over all valid tokens, computed exactly as before these options existed.

    * ``clip_eps_high`` (DAPO clip-higher, Yu et al. 2025, "DAPO: An Open-Source LLM Reinforcement
      Learning System at Scale", eq. 10): the upper clip bound ``1 + eps_high`` is decoupled from the
      lower one, so low-probability tokens with ``A > 0`` can grow further.
    * ``ratio_level="token"``: ``rho_t = exp(logprobs_t - old_logprobs_t)`` and ``A_t = advantages_t``.
    * ``ratio_level="sequence"`` (GSPO, Zheng et al. 2025, "Group Sequence Policy Optimization",
      eq. 7): one length-normalised ratio per sequence,
      ``s_i = exp(masked mean over t of (logprobs - old_logprobs))`` (the geometric mean of the token
      ratios), clipped per sequence, with one advantage per sequence, ``A_i`` = the masked mean of
      row ``i``'s ``advantages`` (equal to the per-token value when it is constant along the
      sequence, as from :func:`sequence_to_token_advantages`; token-varying advantages are averaged).
      It is applied per token in GSPO's "GSPO-token" form
      ``s_{i,t} = sg[s_i] * pi_theta(y_t) / sg[pi_theta(y_t)]`` (``sg``: stop-gradient): its value is
      ``s_i`` at every token and ``d s_{i,t} = s_i * d log pi_theta(y_t)``, so with
      ``loss_agg="seq_mean_token_mean"`` the loss and its gradient equal GSPO's
      ``-1/G sum_i min(s_i A_i, clip(s_i) A_i)`` (eq. 5); other aggregations weight the sequences
      differently (``"token_mean"``: by their lengths).

    Args:
        logprobs: ``(B, T)`` log-probs of the sampled tokens under the current
            policy (nats, differentiable).
        old_logprobs: ``(B, T)`` log-probs under the policy that sampled them.
        advantages: ``(B, T)`` advantage estimates (e.g. whitened GAE).
        mask: ``(B, T)`` bool or 0/1 mask.
        clip_eps: clipping range ``epsilon`` in ``(0, 1)`` (the lower bound ``1 - eps``).
        clip_eps_high: ``> 0``, the upper bound is ``1 + clip_eps_high``; ``None``: ``clip_eps``.
        loss_agg: one of :data:`LOSS_AGG_MODES` (see :func:`aggregate_loss`).
        ratio_level: one of :data:`RATIO_LEVELS`, ``"token"`` (PPO/GRPO/DAPO) or ``"sequence"`` (GSPO).
        token_weights: ``(B, T)`` constants multiplying each token's clipped term before aggregation
            (detached), e.g. :func:`tis_weights`; ``None``: 1.
        counts: keyword-only, the whole batch's counts over data-parallel processes
            (:class:`~rlhf_lightning.algorithms.ops.BatchCounts`): the loss and the stats are this process's shares of
            the whole batch's (see :func:`aggregate_loss`); ``None``: this batch alone.
        max_response_length: keyword-only, the generation budget (``"seq_mean_token_sum_norm"``).

    Returns:
        ``(loss, stats)``: ``loss`` is 0-d, dtype ``promote(inputs, float32)``.
        ``stats`` (detached 0-d tensors, means over valid tokens whatever ``loss_agg``, shares of the whole
        batch's with ``counts``):
        ``clipfrac`` (fraction of tokens where the clipped term is strictly
        the active one, i.e. the gradient is cut; with ``"sequence"`` every token of a clipped
        sequence counts, the fraction of clipped tokens GSPO reports), ``approx_kl``
        (``0.5 * (logprobs - old_logprobs)^2`` per token at both levels: the k2 estimator of
        ``KL(pi_old || pi_theta)`` for tokens sampled from ``pi_old``), and
        ``ratio_mean`` (mean of the ratio used: ``rho_t``, or ``s_i`` at each token of sequence ``i``).

    Raises:
        ValueError: on mismatched shapes (or not 2-D with ``"sequence"`` or a per-sequence
            ``loss_agg``), ``clip_eps`` outside
            ``(0, 1)``, ``clip_eps_high`` not a finite number ``> 0``, or an unknown ``loss_agg`` or
            ``ratio_level``.
    """
    check_same_shape(logprobs=logprobs, old_logprobs=old_logprobs, advantages=advantages, mask=mask)
    clip_eps = float(clip_eps)
    if not (0.0 < clip_eps < 1.0):
        raise ValueError(f"clip_eps must be in (0, 1), got {clip_eps}")
    clip_eps_high = clip_eps if clip_eps_high is None else float(clip_eps_high)
    if not (0.0 < clip_eps_high < math.inf):
        raise ValueError(f"clip_eps_high must be a finite number > 0, got {clip_eps_high}")
    if loss_agg not in LOSS_AGG_MODES:
        raise ValueError(f"unknown loss_agg {loss_agg!r}; expected one of {LOSS_AGG_MODES}")
    if ratio_level not in RATIO_LEVELS:
        raise ValueError(f"unknown ratio_level {ratio_level!r}; expected one of {RATIO_LEVELS}")
    m = bool_mask(mask)
    dtype = float_dtype(logprobs, old_logprobs, advantages)
    zero = torch.zeros((), dtype=dtype, device=logprobs.device)
    # Zero the log-ratio at padding so exp() cannot overflow there (inf * 0 -> NaN grads).
    log_ratio = torch.where(m, logprobs.to(dtype) - old_logprobs.detach().to(dtype), zero)
    adv = torch.where(m, advantages.detach().to(dtype), zero)
    if ratio_level == "sequence":
        check_2d("logprobs", logprobs)
        seq_log_ratio = masked_mean(log_ratio.detach(), m, dim=1)  # log s_i, (B,)
        logp = logprobs.to(dtype)
        # GSPO-token: log s_{i,t} = sg[log s_i] + log pi_t - sg[log pi_t] (value log s_i, gradient d log pi_t)
        ratio = torch.exp(torch.where(m, seq_log_ratio.unsqueeze(1) + (logp - logp.detach()), zero))
        adv = torch.where(m, masked_mean(adv, m, dim=1).unsqueeze(1), zero)
    else:
        ratio = torch.exp(log_ratio)
    pg_unclipped = -adv * ratio
    pg_clipped = -adv * ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps_high)
    per_token = torch.maximum(pg_unclipped, pg_clipped)
    if token_weights is not None:
        check_same_shape(logprobs=logprobs, token_weights=token_weights)
        per_token = per_token * torch.where(m, token_weights.detach().to(dtype), zero)
    loss = aggregate_loss(per_token, m, loss_agg, counts=counts, max_response_length=max_response_length)
    with torch.no_grad():
        stats = {
            "clipfrac": token_mean((pg_clipped > pg_unclipped).to(dtype), m, counts),
            "approx_kl": token_mean(0.5 * log_ratio.pow(2), m, counts),
            "ratio_mean": token_mean(ratio, m, counts),
        }
    return loss, {k: v.detach() for k, v in stats.items()}


def tis_weights(old_logprobs: Tensor, sampler_logprobs: Tensor, mask: Tensor, cap: float) -> Tensor:
    """Truncated importance sampling weights for a sampler that is not the trainer (Yao et al. 2025, "Your
    Efficient RL Framework Secretly Brings You Off-Policy RL Training", the TIS correction; TRL's and verl's).

    An inference engine (vLLM) samples from a distribution ``pi_sampler`` that differs slightly from the
    trainer's ``pi_old`` for the same weights (other kernels, other precision). Per valid token,
    ``w_t = min(exp(old_logprobs_t - sampler_logprobs_t), cap)``: the importance ratio pi_old / pi_sampler,
    truncated at ``cap`` to bound the variance; it multiplies the token's policy-gradient loss
    (``ppo_policy_loss(..., token_weights=w)``). 0 at padding. Constants (no gradient).

    Args:
        old_logprobs: ``(B, T)`` trainer log-probabilities of the sampled tokens (nats).
        sampler_logprobs: ``(B, T)`` the sampler's log-probabilities of the same tokens.
        mask: ``(B, T)`` bool or 0/1 mask of valid tokens.
        cap: truncation, > 0.

    Returns:
        ``(B, T)`` weights in ``[0, cap]``, dtype ``promote(inputs, float32)``, detached.

    Raises:
        ValueError: mismatched shapes or ``cap`` not a finite number > 0.
    """
    check_same_shape(old_logprobs=old_logprobs, sampler_logprobs=sampler_logprobs, mask=mask)
    cap = float(cap)
    if not (0.0 < cap < math.inf):
        raise ValueError(f"tis_weights: cap must be a finite number > 0, got {cap}")
    m = bool_mask(mask)
    dtype = float_dtype(old_logprobs, sampler_logprobs)
    zero = torch.zeros((), dtype=dtype, device=old_logprobs.device)
    log_ratio = torch.where(m, old_logprobs.detach().to(dtype) - sampler_logprobs.detach().to(dtype), zero)
    return torch.where(m, torch.exp(log_ratio).clamp(max=cap), zero)


def kl_loss(
    logprobs: Tensor,
    ref_logprobs: Tensor,
    mask: Tensor,
    estimator: str = "k3",
    loss_agg: str = "token_mean",
    *,
    counts: BatchCounts | None = None,
    max_response_length: int | None = None,
) -> Tensor:
    """KL regulariser as a loss term: the per-token estimate of ``KL(pi_theta || pi_ref)`` aggregated
    over the valid tokens (GRPO puts it in the loss instead of the reward, with the ``"k3"`` estimator:
    Shao et al. 2024, "DeepSeekMath", eqs. 3-4).

    ``loss = aggregate_loss(kl_penalty(logprobs, ref_logprobs, estimator), mask, loss_agg)`` with
    :func:`rlhf_lightning.algorithms.kl.kl_penalty` (``"k1"``: ``log p - log q``; ``"k2"``:
    ``0.5 (log q - log p)^2``; ``"k3"``: ``q/p - 1 - log(q/p)``).  Differentiable w.r.t. ``logprobs``;
    ``ref_logprobs`` is detached.  Both are zeroed at padding first, so ``inf`` there cannot make
    ``NaN`` values or gradients.  Add ``coef * kl_loss(...)`` to the policy loss.

    Args:
        logprobs: ``(B, T)`` log-probs of the sampled tokens under the current policy (nats,
            differentiable).
        ref_logprobs: ``(B, T)`` log-probs of the same tokens under the reference model.
        mask: ``(B, T)`` bool or 0/1 mask.
        estimator: one of :data:`rlhf_lightning.algorithms.kl.KL_ESTIMATORS`.
        loss_agg: one of :data:`LOSS_AGG_MODES` (see :func:`aggregate_loss`).
        counts, max_response_length: keyword-only, as :func:`aggregate_loss`'s.

    Returns:
        0-d loss in nats (per token, as aggregated), dtype ``promote(logprobs, ref_logprobs, float32)``.

    Raises:
        ValueError: on mismatched or non-2-D shapes, an unknown estimator or an unknown ``loss_agg``.
    """
    check_same_shape(logprobs=logprobs, ref_logprobs=ref_logprobs, mask=mask)
    check_2d("logprobs", logprobs)
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"unknown KL estimator {estimator!r}; expected one of {KL_ESTIMATORS}")
    if loss_agg not in LOSS_AGG_MODES:
        raise ValueError(f"unknown loss_agg {loss_agg!r}; expected one of {LOSS_AGG_MODES}")
    m = bool_mask(mask)
    dtype = float_dtype(logprobs, ref_logprobs)
    zero = torch.zeros((), dtype=dtype, device=logprobs.device)
    logp = torch.where(m, logprobs.to(dtype), zero)
    ref = torch.where(m, ref_logprobs.detach().to(dtype), zero)
    return aggregate_loss(kl_penalty(logp, ref, estimator), m, loss_agg, counts=counts,
                          max_response_length=max_response_length)


def dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """Direct preference losses on the log-probabilities of a chosen and a rejected response.

    With the log-ratio margin ``h = (π_c − π_r) − (ref_c − ref_r)`` (π: the policy's summed — for IPO
    length-averaged — response log-probabilities, ref: the reference's):

    - ``sigmoid`` (DPO, Rafailov et al. 2023, "Direct Preference Optimization", eq. 7):
      ``−log σ(β h)``; with ``label_smoothing`` ε > 0 the conservative DPO of Mitchell 2023 ("A note on
      DPO with noisy preferences", cDPO), which assumes the labels are flipped with probability ε:
      ``−(1 − ε)·log σ(β h) − ε·log σ(−β h)``;
    - ``ipo`` (IPO, Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human
      Preferences", eq. 17): ``(h − 1/(2β))²``, β playing the role of the paper's τ; the paper's h is
      built from length-averaged log-probabilities (the caller averages them);
    - ``hinge`` (SLiC, Zhao et al. 2023, "SLiC-HF: Sequence Likelihood Calibration with Human Feedback",
      eq. 1 with the margin δ = 1/β on the log ratios): ``relu(1 − β h)``.

    The implicit rewards are ``β·(π − ref)`` (Rafailov et al. 2023, §5), detached.

    Args:
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps: ``(B,)`` float,
            log-probabilities of each response given its prompt (nats); only the policy's need gradients.
        beta: β > 0 (the KL coefficient of the DPO objective; IPO's τ).
        loss_type: one of :data:`DPO_LOSS_TYPES`.
        label_smoothing: ε in [0, 0.5], only for ``sigmoid``.

    Returns:
        ``(losses, chosen_rewards, rejected_rewards)``, each ``(B,)`` in the inputs' float dtype: the
        per-pair losses (differentiable; the caller takes the mean), and the detached implicit rewards.

    Raises:
        ValueError: an unknown ``loss_type``; β <= 0; ε outside [0, 0.5], or ε > 0 with another loss than
            ``sigmoid``; inputs that are not four ``(B,)`` tensors of one shape.
    """
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"dpo_loss: loss_type={loss_type!r}: expected one of {', '.join(DPO_LOSS_TYPES)}")
    if not beta > 0:
        raise ValueError(f"dpo_loss: beta={beta!r} must be > 0")
    if not 0.0 <= label_smoothing <= 0.5:
        raise ValueError(f"dpo_loss: label_smoothing={label_smoothing!r} must be in [0, 0.5]")
    if label_smoothing and loss_type != "sigmoid":
        raise ValueError(f"dpo_loss: label_smoothing applies to loss_type='sigmoid' only (got {loss_type!r})")
    shape = check_same_shape(policy_chosen_logps=policy_chosen_logps, policy_rejected_logps=policy_rejected_logps,
                             ref_chosen_logps=ref_chosen_logps, ref_rejected_logps=ref_rejected_logps)
    if len(shape) != 1:
        raise ValueError(f"dpo_loss: the log-probabilities must be (B,) tensors, got shape {tuple(shape)}")
    ref_chosen_logps = ref_chosen_logps.to(policy_chosen_logps.dtype)
    ref_rejected_logps = ref_rejected_logps.to(policy_chosen_logps.dtype)
    h = (policy_chosen_logps - policy_rejected_logps) - (ref_chosen_logps - ref_rejected_logps)
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * h) * (1.0 - label_smoothing)
        if label_smoothing:
            losses = losses - F.logsigmoid(-beta * h) * label_smoothing
    elif loss_type == "ipo":
        losses = (h - 1.0 / (2.0 * beta)) ** 2
    else:  # hinge
        losses = torch.relu(1.0 - beta * h)
    chosen_rewards = beta * (policy_chosen_logps - ref_chosen_logps).detach()
    rejected_rewards = beta * (policy_rejected_logps - ref_rejected_logps).detach()
    return losses, chosen_rewards, rejected_rewards
