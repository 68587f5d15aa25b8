"""Hydra/OmegaConf glue: custom resolvers, the settings dataclasses in the ConfigStore, and the assembly of a
run from a composed config."""

from __future__ import annotations

import logging
import math

from omegaconf import DictConfig, OmegaConf

from rlhf_lightning.algorithms.advantages import ADV_ESTIMATORS
from rlhf_lightning.config.schema import (
    DPOConfig,
    EvalConfig,
    LoRASettings,
    OptimConfig,
    PPOConfig,
    RewardConfig,
    ValueConfig,
    ppo_optimizer_steps,
)
from rlhf_lightning.training import launch, tracking

log = logging.getLogger(__name__)


def _mul(*factors) -> int:
    """``${mul:a,b,...}``: the product of integers (PPO's trainer.max_steps)."""
    return math.prod(int(f) for f in factors)


def _ppo_optimizers(joint, ppo_epochs=1, num_minibatches=1, adv_estimator=ADV_ESTIMATORS[0]) -> int:
    """``${ppo_optimizers:${ppo.joint_optimizer},${ppo.ppo_epochs},${ppo.num_minibatches},${ppo.adv_estimator}}``:
    the optimizer steps PPO takes per iteration, the factor Lightning's ``global_step`` (so ``trainer.max_steps``)
    counts them with
    (:func:`rlhf_lightning.config.schema.ppo_optimizer_steps`, as ``PPOModule.optimizer_steps_per_iteration``);
    ``${ppo_optimizers:${ppo.joint_optimizer}}``: per minibatch, i.e. the number of optimizers (1 with the
    joint optimizer or a critic-free estimator, 2 otherwise).

    Args:
        joint: a bool, or the strings ``true``/``false`` (any case).
        ppo_epochs, num_minibatches: integers.
        adv_estimator: ``ppo.adv_estimator`` (a critic-free one steps one optimizer).

    Raises:
        TypeError: anything else (the message names ``ppo.joint_optimizer``).
    """
    if isinstance(joint, str) and joint.lower() in ("true", "false"):
        joint = joint.lower() == "true"
    if not isinstance(joint, bool):
        raise TypeError(f"ppo.joint_optimizer={joint!r} must be true or false")
    return ppo_optimizer_steps(joint, int(ppo_epochs), int(num_minibatches), str(adv_estimator))


def _tiny_source(family) -> str:
    """``${tiny_source:${.family}}``: the ``model.name_or_path`` of ``model=tiny``: ``tiny`` (the 2-layer
    Llama) when ``family`` is null, else ``tiny-<family>`` (a 4-layer random model of that decoder family,
    :data:`rlhf_lightning.models.loading.TINY_FAMILIES`)."""
    return "tiny" if family in (None, "", "null") else f"tiny-{family}"


#: The settings dataclasses in Hydra's ConfigStore, group ``schema``: ``conf/stage/*.yaml`` place them with
#: defaults-list entries such as ``- /schema/ppo@ppo`` and ``- /schema/optim@policy_optim``.
SCHEMAS = {"reward": RewardConfig, "value": ValueConfig, "ppo": PPOConfig, "dpo": DPOConfig,
           "optim": OptimConfig, "lora": LoRASettings, "eval": EvalConfig}


def register_configs() -> None:
    """Store :data:`SCHEMAS` in Hydra's ConfigStore (group ``schema``; idempotent). Call before composing the
    configs: the stage configs' defaults lists name them (the model configs: ``- /schema/lora@lora``), and
    Hydra then types their nodes (an unknown key or
    a value of the wrong type is refused while composing; :func:`rlhf_lightning.training.validate.composition_error`
    says so in one line)."""
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    for name, node in SCHEMAS.items():
        store.store(group="schema", name=name, node=node)


def register_resolvers() -> None:
    """Register ``${mul:...}``, ``${ppo_optimizers:...}``, ``${tiny_source:...}``, ``${sweep_group:}``,
    ``${ddp_start_method:}`` and ``${claim_device:N}`` (idempotent). Call before composing the configs.
    ``${claim_device:N}`` is ``[i]``, the device list ``Trainer(devices=...)`` takes, with i from
    :func:`rlhf_lightning.training.launch.claim_device`."""
    if not OmegaConf.has_resolver("mul"):
        OmegaConf.register_new_resolver("mul", _mul)
    if not OmegaConf.has_resolver("tiny_source"):
        OmegaConf.register_new_resolver("tiny_source", _tiny_source)
    if not OmegaConf.has_resolver("ppo_optimizers"):
        OmegaConf.register_new_resolver("ppo_optimizers", _ppo_optimizers)
    if not OmegaConf.has_resolver("ddp_start_method"):
        OmegaConf.register_new_resolver("ddp_start_method", launch.ddp_start_method)
    if not OmegaConf.has_resolver("claim_device"):
        OmegaConf.register_new_resolver("claim_device", lambda n: [launch.claim_device(n)])
    tracking.register_resolvers()


register_resolvers()
register_configs()


def instantiate_group(node: DictConfig | None) -> list:
    """Instantiate every entry of a dict-like group (loggers, callbacks) that has a ``_target_``.

    An entry whose target returns ``None`` (a switched-off option, e.g. ``timed_checkpoint`` without
    minutes) is left out.
    """
    from hydra.utils import instantiate

    if not node:
        return []
    objects = (instantiate(value) for value in node.values() if isinstance(value, DictConfig) and "_target_" in value)
    return [obj for obj in objects if obj is not None]


def fault_tolerance_callbacks(cfg: DictConfig) -> list:
    """Callbacks every run gets, whatever ``callbacks=`` says: RNG states in checkpoints
    (:class:`~rlhf_lightning.training.callbacks.RNGStateCallback`) and the NaN/inf step guard
    (:class:`~rlhf_lightning.training.callbacks.NonFiniteGuard`, ``max_consecutive_bad_steps``)."""
    from rlhf_lightning.training.callbacks import NonFiniteGuard, RNGStateCallback

    return [RNGStateCallback(), NonFiniteGuard(cfg.get("max_consecutive_bad_steps", 5))]


def without_disabled_callbacks(callbacks: list, trainer_cfg) -> list:
    """Leave out the progress bar and checkpoint callbacks that the trainer config switches off.

    ``trainer.enable_progress_bar=false`` or ``trainer.enable_checkpointing=false`` on the command
    line would otherwise make Lightning refuse the ``callbacks=default`` preset's bar and checkpoint
    callbacks; the trainer setting wins, as a user writing it expects. Dropped callbacks are logged.
    """
    from lightning.pytorch.callbacks import Checkpoint, ProgressBar

    off = tuple(kind for key, kind in (("enable_progress_bar", ProgressBar), ("enable_checkpointing", Checkpoint))
                if trainer_cfg.get(key, True) is False)
    kept = [c for c in callbacks if not (off and isinstance(c, off))]
    for c in callbacks:
        if c not in kept:
            log.info("callback %s left out: switched off in the trainer config", type(c).__name__)
    return kept


class _DropLitLoggerTip(logging.Filter):
    """Drops Lightning's advertisement for its hosted logger (printed by every ``Trainer`` without one)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "litlogger" not in str(record.msg)


def quiet_library_noise() -> None:
    """Keep a run's log to what a user needs (data counts, progress, metrics, the summary): transformers' progress
    bars of every weight load and save, Lightning's tip for its hosted logger, and a deprecation warning torch raises
    inside Lightning's own code (``isinstance(treespec, LeafSpec)``, lightning/pytorch/utilities/_pytree.py) are
    left out; transformers' table of a load's missing keys is replaced by one line when something is unexpected
    (:func:`rlhf_lightning.models.builders.load_scalar_model`). Idempotent."""
    import warnings

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    tip_logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if not any(isinstance(f, _DropLitLoggerTip) for f in tip_logger.filters):
        tip_logger.addFilter(_DropLitLoggerTip())
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")


def run(cfg: DictConfig) -> dict[str, float]:
    """Build tokenizer, data, module, loggers, callbacks and Trainer from ``cfg``, then ``Trainer.fit``.

    Returns:
        The trainer's final ``callback_metrics`` as floats (what Hydra sweepers optimise).

    Raises:
        rlhf_lightning.training.validate.ConfigError: an invalid config, found before anything is loaded.
        rlhf_lightning.training.callbacks.TrainingDiverged: ``max_consecutive_bad_steps`` non-finite steps in a row.
    """
    from rlhf_lightning.training.validate import validate_config

    validate_config(cfg)
    import lightning as L
    from hydra.utils import instantiate

    quiet_library_noise()

    L.seed_everything(cfg.seed, workers=True)
    tokenizer = instantiate(cfg.tokenizer)
    datamodule = instantiate(cfg.datamodule, tokenizer=tokenizer)
    module = instantiate(cfg.module, tokenizer=tokenizer)
    loggers = instantiate_group(cfg.get("logger"))
    callbacks = (instantiate_group(cfg.get("callbacks")) + tracking.tracking_callbacks(loggers, cfg)
                 + fault_tolerance_callbacks(cfg))
    callbacks = without_disabled_callbacks(callbacks, cfg.trainer)
    trainer = instantiate(cfg.trainer, logger=loggers or False, callbacks=callbacks)
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    except BaseException:
        tracking.finish_wandb(exit_code=1)
        raise
    tracking.finish_wandb()  # one W&B run per job: the next sweep point must not reuse this one
    return {k: float(v) for k, v in trainer.callback_metrics.items()}
