"""Pieces shared by the three LightningModules: optimizer settings and model export."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger(__name__)


@dataclass
class OptimConfig:
    """AdamW settings (``*.optim.*`` in the configs).

    Attributes:
        lr: peak learning rate.
        weight_decay: decoupled weight decay (Loshchilov & Hutter 2019).
        betas, eps: Adam moments and epsilon.
        warmup_steps: linear warm-up from 0 to ``lr`` over this many optimizer steps, then constant.
    """

    lr: float = 1e-5
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    warmup_steps: int = 0

    def __post_init__(self):
        if self.lr <= 0:
            raise ValueError(f"optim.lr={self.lr} must be > 0")
        self.betas = tuple(self.betas)


def as_config(cls, value):
    """Build dataclass ``cls`` from a dict (Hydra node converted with ``_convert_: all``) or pass it through.

    Raises:
        TypeError: unknown keys (the message lists the allowed ones).
    """
    if value is None:
        return cls()
    if isinstance(value, cls):
        return value
    try:
        return cls(**dict(value))
    except TypeError as err:
        allowed = ", ".join(cls.__dataclass_fields__)
        raise TypeError(f"{cls.__name__}: {err} (allowed keys: {allowed})") from None


def linear_warmup(warmup_steps: int):
    """The LR multiplier of :class:`OptimConfig`'s schedule, as a ``LambdaLR`` lambda.

    ``step -> min(1, (step + 1) / (warmup_steps + 1))``: a linear ramp to 1 over ``warmup_steps``
    scheduler steps, then constant (1 from the start when ``warmup_steps`` <= 0).
    """
    warmup = max(warmup_steps, 0)
    return lambda step: min(1.0, (step + 1) / (warmup + 1))


def _adamw_kwargs(config: OptimConfig) -> dict:
    return dict(lr=config.lr, weight_decay=config.weight_decay, betas=config.betas, eps=config.eps)


def make_optimizer(parameters, config: OptimConfig):
    """AdamW over the parameters that require gradients, with a linear warm-up schedule.

    The fused implementation (``fused=True``) where torch has one for the parameters' device and
    dtype (CPU, CUDA), else the default one. One parameter group: :func:`make_grouped_optimizer` with
    a single, unnamed group.

    Returns:
        (optimizer, LambdaLR scheduler).

    Raises:
        ValueError: nothing to train.
    """
    return make_grouped_optimizer([(None, parameters, config)])


def make_grouped_optimizer(groups):
    """One AdamW with one parameter group per ``(name, parameters, config)`` entry of ``groups``.

    Each group keeps its own settings from its :class:`OptimConfig` (``lr``, ``weight_decay``,
    ``betas``, ``eps``) and only the parameters that require gradients; a group with a ``name`` (a
    string) carries it under the param group's ``"name"`` key (``LearningRateMonitor`` uses it), one
    whose name is ``None`` gets no such key. The optimizer's defaults are the first group's settings.
    The fused implementation (``fused=True``) where torch has one for the parameters' device and
    dtype (CPU, CUDA), else the default one.

    The scheduler is one ``LambdaLR`` with one lambda per group, :func:`linear_warmup` of that group's
    ``warmup_steps``: stepping it once moves every group along its own warm-up.

    Returns:
        (optimizer, LambdaLR scheduler).

    Raises:
        ValueError: ``groups`` is empty, or a group has no trainable parameter (the message names it).
    """
    groups = list(groups)
    if not groups:
        raise ValueError("make_grouped_optimizer: no parameter groups given")
    param_groups, lambdas = [], []
    for index, (name, parameters, config) in enumerate(groups):
        params = [p for p in parameters if p.requires_grad]
        if not params:
            where = f" in {name}" if name else ""
            raise ValueError(f"no trainable parameters{where}: check trainable_layers / frozen settings")
        # The first group takes its settings from the optimizer's defaults (below), so a single
        # unnamed group is exactly AdamW(params, **settings): same param group, same state_dict.
        group = {"params": params, **(_adamw_kwargs(config) if index else {})}
        if name is not None:
            group["name"] = name
        param_groups.append(group)
        lambdas.append(linear_warmup(config.warmup_steps))
    defaults = _adamw_kwargs(groups[0][2])
    # Fresh group dicts for each attempt: AdamW fills its defaults (``fused`` included) into them.
    try:  # one fused kernel per step: ~6x faster than the default multi-tensor AdamW on CPU
        optimizer = torch.optim.AdamW([dict(g) for g in param_groups], fused=True, **defaults)
    except (RuntimeError, ValueError):  # a device or dtype without a fused kernel
        optimizer = torch.optim.AdamW([dict(g) for g in param_groups], **defaults)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambdas if len(lambdas) > 1 else lambdas[0])
    return optimizer, scheduler


def export_pretrained(model: nn.Module, tokenizer, directory: str | Path | None) -> Path | None:
    """Write ``model`` (``save_pretrained``, safetensors) and its tokenizer to ``directory``.

    Call on the global-zero rank only. ``None`` skips the export. Returns the directory.
    """
    if directory is None:
        return None
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    log.info("wrote %s to %s", type(model).__name__, directory)
    return directory


def find_shared_trunk(module, enabled: bool):
    """The frozen trunk shared by a module's ``policy``, ``ref_policy``, ``critic`` and ``reward_model``.

    Tries all four together, then the pairs (policy, reference) and (critic, reward model); see
    :func:`rlhf_lightning.models.trunk.shared_trunk_for`. Call in ``on_fit_start`` (the strategy is
    known and the weights are in place).

    Returns:
        a :class:`~rlhf_lightning.models.trunk.SharedTrunk`, or ``None`` (off, sharded strategy, or
        nothing shared).
    """
    from rlhf_lightning.models.trunk import shared_trunk_for

    names = ("policy", "ref_policy", "critic", "reward_model")
    return shared_trunk_for(module.trainer.strategy, enabled, {name: getattr(module, name, None) for name in names},
                            groups=[["policy", "ref_policy"], ["critic", "reward_model"]])
