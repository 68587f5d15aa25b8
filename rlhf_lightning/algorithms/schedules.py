"""Learning-rate schedules as plain functions (no torch): warm-up, then constant, linear or cosine decay.

Kept free of torch and Lightning so that :mod:`rlhf_lightning.training.validate` can check ``*.scheduler`` keys
without importing them. :func:`rlhf_lightning.modules.common.make_grouped_optimizer` turns
:func:`lr_multiplier` into ``LambdaLR`` lambdas.
"""

from __future__ import annotations

import math

#: The ``scheduler`` values of :class:`~rlhf_lightning.config.schema.OptimConfig`; the first is the default.
SCHEDULERS = ("constant", "linear", "cosine")


def check_scheduler(name: object, key: str = "optim.scheduler") -> str:
    """``name`` if it is one of :data:`SCHEDULERS`.

    Raises:
        ValueError: anything else; one line naming ``key`` and the allowed values.
    """
    if name not in SCHEDULERS:
        raise ValueError(f"{key}={name!r} is not a learning-rate schedule (expected one of {', '.join(SCHEDULERS)})")
    return name


def lr_multiplier(step: int, warmup_steps: int = 0, total_steps: float | None = None,
                  scheduler: str = "constant") -> float:
    """Factor on the peak learning rate at scheduler step ``step`` (0-based; what ``LambdaLR`` passes).

    Warm-up (``step < warmup_steps``): ``(step + 1) / (warmup_steps + 1)``, a linear ramp whose first
    value is ``1 / (warmup_steps + 1)`` and which reaches 1 at ``step == warmup_steps``. After it, with
    ``p = (step - warmup_steps) / max(1, total_steps - warmup_steps)`` clipped to [0, 1]:

    - ``constant``: 1;
    - ``linear``: ``1 - p`` (linear decay to 0, as ``transformers.get_linear_schedule_with_warmup``);
    - ``cosine``: ``(1 + cos(pi * p)) / 2`` (Loshchilov & Hutter 2017, SGDR, one cycle without restart).

    The decays reach 0 at ``step == total_steps``; the last step an optimizer uses is ``total_steps - 1``
    (so its factor is ``1 / (total_steps - warmup_steps)`` for ``linear``), and steps past the total stay at 0.

    Args:
        step: scheduler steps taken so far, >= 0. Units: see ``OptimConfig.scheduler``.
        warmup_steps: warm-up length in scheduler steps (<= 0: none).
        total_steps: scheduler steps in the whole run; needed (finite) by ``linear`` and ``cosine``, ignored
            by ``constant``.
        scheduler: one of :data:`SCHEDULERS`.

    Returns:
        A float in [0, 1].

    Raises:
        ValueError: an unknown ``scheduler``, or a decay without a finite ``total_steps``.
    """
    check_scheduler(scheduler, "scheduler")
    warmup = max(warmup_steps, 0)
    if scheduler == "constant":  # the schedule before decays existed, as it was written
        return min(1.0, (step + 1) / (warmup + 1))
    if total_steps is None or not math.isfinite(total_steps):
        raise ValueError(f"scheduler={scheduler} decays over the run's scheduler steps, but their number is "
                         f"unknown ({total_steps}): set trainer.max_steps")
    if step < warmup:
        return (step + 1) / (warmup + 1)
    progress = min(1.0, max(0.0, (step - warmup) / max(1, total_steps - warmup)))
    if scheduler == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))
