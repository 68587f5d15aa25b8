"""KL-coefficient controllers for the per-token KL penalty β (``ppo.kl_coef``)."""

from __future__ import annotations


class FixedKLController:
    """A constant β. ``update`` does nothing; kept for a uniform interface with the adaptive one."""

    def __init__(self, kl_coef: float):
        if kl_coef < 0:
            raise ValueError(f"kl_coef={kl_coef} must be >= 0")
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> float:
        """Return β unchanged."""
        return self.value

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])


class AdaptiveKLController(FixedKLController):
    """Proportional controller steering the policy's KL to the reference toward a target.

    Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences", section 2.2:
    e = clip(KL / KL_target − 1, −0.2, 0.2);  β ← β · (1 + K_β · e · n_steps), K_β = 1 / horizon.

    Args:
        kl_coef: initial β (≥ 0).
        target: KL target in nats per sequence (sum over response tokens), > 0.
        horizon: controller horizon in samples (episodes), > 0.

    Raises:
        ValueError: a negative β, or a non-positive target or horizon.
    """

    def __init__(self, kl_coef: float, target: float, horizon: float):
        super().__init__(kl_coef)
        if target <= 0 or horizon <= 0:
            raise ValueError(f"adaptive KL needs target > 0 and horizon > 0 (got {target}, {horizon})")
        self.target, self.horizon = float(target), float(horizon)

    def update(self, current_kl: float, n_steps: int) -> float:
        """Update β from the batch's mean sequence KL (nats) after ``n_steps`` samples; return new β."""
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon
        return self.value
