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


def make_optimizer(parameters, config: OptimConfig):
    """AdamW over the parameters that require gradients, with a linear warm-up schedule.

    The fused implementation (``fused=True``) where torch has one for the parameters' device and
    dtype (CPU, CUDA), else the default one.

    Returns:
        (optimizer, LambdaLR scheduler).

    Raises:
        ValueError: nothing to train.
    """
    params = [p for p in parameters if p.requires_grad]
    if not params:
        raise ValueError("no trainable parameters: check trainable_layers / frozen settings")
    kwargs = dict(lr=config.lr, weight_decay=config.weight_decay, betas=config.betas, eps=config.eps)
    try:  # one fused kernel per step: ~6x faster than the default multi-tensor AdamW on CPU
        optimizer = torch.optim.AdamW(params, fused=True, **kwargs)
    except (RuntimeError, ValueError):  # a device or dtype without a fused kernel
        optimizer = torch.optim.AdamW(params, **kwargs)
    warmup = max(config.warmup_steps, 0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / (warmup + 1)))
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
