"""The KL-regularised reward of RLHF: what a sampled response earns, token by token.

Everything that turns a scored rollout into per-token rewards lives here: the missing-EOS
penalty on the score, the per-token KL estimators and the KL penalty β·KL_t, the score placed at
the last token, and the controllers that set β. The advantage estimators that consume the rewards
are in :mod:`rlhf_lightning.algorithms.advantages`, the losses in :mod:`rlhf_lightning.algorithms.losses`.

Shapes: per-token tensors are ``(B, T)`` over response tokens, ``mask`` is true at valid tokens
(up to and including EOS); log-probabilities are natural logs (nats)."""

from __future__ import annotations

import torch
from torch import Tensor

from rlhf_lightning.algorithms.ops import (
    bool_mask,
    check_2d,
    check_per_row,
    check_same_shape,
    float_dtype,
    last_valid_index,
)

__all__ = [
    "KL_ESTIMATORS",
    "kl_penalty",
    "compute_rewards",
    "apply_missing_eos_penalty",
    "FixedKLController",
    "AdaptiveKLController",
    "make_kl_controller",
]

#: Names accepted by :func:`kl_penalty` / :func:`compute_rewards`.
KL_ESTIMATORS = ("k1", "k2", "k3")


def apply_missing_eos_penalty(scores: Tensor, ends_with_eos: Tensor, penalty: float | None) -> Tensor:
    """The score minus ``penalty`` for each response cut at the length limit without an EOS.

    TRL's ``missing_eos_penalty`` (PPO and online-DPO trainers): a response that never ended is
    usually worse than its reward-model score says, and the penalty teaches the policy to finish.

    Args:
        scores: (B,) float reward-model scores.
        ends_with_eos: (B,) bool, True where the response ended with EOS.
        penalty: subtracted from rows without EOS (reward units); ``None``: no penalty.

    Returns:
        (B,) scores, a new tensor (``scores`` itself when ``penalty`` is ``None``).
    """
    if penalty is None:
        return scores
    return scores - penalty * (~ends_with_eos).to(scores.dtype)


def kl_penalty(logprobs: Tensor, ref_logprobs: Tensor, estimator: str = "k1") -> Tensor:
    """Per-token single-sample estimators of ``KL(p || q)``, with ``p`` the policy
    and ``q`` the reference model, for tokens sampled from ``p``.

    With ``log r = log q - log p`` (Schulman 2020, "Approximating KL Divergence"):

    * ``"k1"``: ``-log r = logp - logq`` (unbiased, can be negative, high variance);
    * ``"k2"``: ``0.5 * (log r)^2`` (biased, >= 0, low variance);
    * ``"k3"``: ``(r - 1) - log r`` (unbiased, >= 0, low variance), computed as
      ``expm1(log r) - log r`` for accuracy near 0.  Not clamped: it grows
      like ``exp(logq - logp)`` when the reference is much more confident.

    Args:
        logprobs: ``(B, T)`` policy log-probs of the sampled tokens (nats).
        ref_logprobs: ``(B, T)`` reference-model log-probs of the same tokens.
        estimator: one of ``"k1"``, ``"k2"``, ``"k3"``.

    Returns:
        ``(B, T)`` per-token estimate in nats, dtype ``promote(logprobs,
        ref_logprobs)``; differentiable w.r.t. both inputs.  Not masked: padded
        positions hold whatever the inputs give.

    Raises:
        ValueError: on mismatched shapes or an unknown estimator name.
    """
    check_same_shape(logprobs=logprobs, ref_logprobs=ref_logprobs)
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"unknown KL estimator {estimator!r}; expected one of {KL_ESTIMATORS}")
    log_ratio = ref_logprobs - logprobs  # log q/p
    if estimator == "k1":
        return -log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio.pow(2)
    return torch.expm1(log_ratio) - log_ratio


def compute_rewards(
    score: Tensor,
    logprobs: Tensor,
    ref_logprobs: Tensor,
    mask: Tensor,
    kl_coef: float,
    estimator: str = "k1",
) -> tuple[Tensor, Tensor]:
    """Per-token RLHF rewards: a KL penalty at every token plus the sequence score
    at the last one (Ziegler et al. 2019, "Fine-Tuning Language Models from Human
    Preferences", eq. 2; Stiennon et al. 2020, "Learning to summarize from human
    feedback", eq. 2).

    ``rewards[b, t] = -kl_coef * kl[b, t]`` at valid tokens, plus ``score[b]`` at
    ``t = last valid index of row b``.  Rows without a valid token receive
    neither penalty nor score (all zeros).

    Args:
        score: ``(B,)`` reward-model score of each full response.
        logprobs: ``(B, T)`` log-probs of the sampled tokens under the policy
            that generated them (nats).
        ref_logprobs: ``(B, T)`` log-probs of the same tokens under the
            reference (SFT) model.
        mask: ``(B, T)`` bool or 0/1 mask.
        kl_coef: KL penalty coefficient β (Python number; its range is checked where it is
            configured, ``PPOConfig.kl_coef``).
        estimator: KL estimator name for :func:`kl_penalty` (``"k1"``, ``"k2"``, ``"k3"``).

    Returns:
        ``(rewards, kl)``, both ``(B, T)``, DETACHED (rewards are fixed
        quantities for the policy update), dtype ``promote(score, logprobs,
        ref_logprobs, float32)``, exactly 0 at masked positions.

    Raises:
        ValueError: on mismatched shapes (``score`` must be ``(B,)`` and the
            per-token tensors ``(B, T)``) or an unknown estimator.
    """
    check_same_shape(logprobs=logprobs, ref_logprobs=ref_logprobs, mask=mask)
    check_2d("logprobs", logprobs)
    check_per_row("score", score, logprobs)
    kl_coef = float(kl_coef)
    m = bool_mask(mask)
    with torch.no_grad():
        dtype = float_dtype(score, logprobs, ref_logprobs)
        kl = kl_penalty(logprobs.detach().to(dtype), ref_logprobs.detach().to(dtype), estimator)
        zero = torch.zeros((), dtype=dtype, device=kl.device)
        kl = torch.where(m, kl, zero)
        rewards = -kl_coef * kl
        has_valid = m.any(dim=1)
        row_score = torch.where(has_valid, score.detach().to(dtype), zero)
        rewards = rewards.scatter_add(1, last_valid_index(m).unsqueeze(1), row_score.unsqueeze(1))
    return rewards, kl


class FixedKLController:
    """A constant β. ``update`` does nothing; the interface of :class:`AdaptiveKLController`.

    Args:
        kl_coef: β (its range is checked where it is configured, ``PPOConfig.kl_coef``).
    """

    def __init__(self, kl_coef: float):
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> float:
        """Return β unchanged."""
        return self.value

    def state_dict(self) -> dict:
        """``{"value": β}`` (checkpointed with the module)."""
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        """Restore β from :meth:`state_dict`."""
        self.value = float(state["value"])


class AdaptiveKLController(FixedKLController):
    """Proportional controller steering the policy's KL to the reference toward a target.

    Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences", section 2.2:
    e = clip(KL / KL_target − 1, −0.2, 0.2);  β ← β · (1 + K_β · e · n_steps), K_β = 1 / horizon.

    Args:
        kl_coef: initial β.
        target: KL target in nats per sequence (sum over response tokens), > 0.
        horizon: controller horizon in samples (episodes), > 0.

    Raises:
        ValueError: a non-positive target or horizon.
    """

    def __init__(self, kl_coef: float, target: float, horizon: float):
        super().__init__(kl_coef)
        if target <= 0 or horizon <= 0:
            raise ValueError(f"adaptive KL needs target > 0 and horizon > 0 (got {target}, {horizon})")
        self.target, self.horizon = float(target), float(horizon)

    def update(self, current_kl: float, n_steps: int) -> float:
        """Update β from the batch's mean sequence KL (nats) after ``n_steps`` samples; return the new β."""
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon
        return self.value


def make_kl_controller(kl_coef: float, adaptive: bool = False, target: float = 6.0,
                       horizon: float = 10000.0) -> FixedKLController:
    """The β controller of a run: :class:`AdaptiveKLController` when ``adaptive``, else :class:`FixedKLController`.

    Raises:
        ValueError: ``adaptive`` with a non-positive target or horizon.
    """
    return AdaptiveKLController(kl_coef, target, horizon) if adaptive else FixedKLController(kl_coef)
