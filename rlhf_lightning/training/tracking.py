"""Experiment tracking glue: W&B run grouping, the run config, and one W&B run per job.

- ``${sweep_group:}`` (OmegaConf resolver): Hydra's sweep directory in a multirun, ``None`` in a
  single run. ``conf/logger/wandb.yaml`` uses it as the W&B group, so every point of one sweep
  lands in one group.
- :class:`LogConfigToWandb`: logs the job's full resolved config as the W&B run config.
- :func:`finish_wandb`: ends the current W&B run, so that the next job of a multirun (the basic and
  joblib launchers run several jobs in one process) starts a run of its own instead of reusing it.
- :func:`wandb_credentials_found`: whether W&B would find an API key without prompting, so that
  :func:`rlhf_lightning.training.validate.validate_config` can stop an online run without one before anything
  loads (``wandb.init`` would stop it when the trainer starts, models loaded, with a long ``UsageError``
  traceback).

:func:`rlhf_lightning.training.run.run` wires these in; nothing here imports ``wandb`` unless a run uses it.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

from lightning.pytorch.callbacks import Callback
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)

#: W&B rejects group names longer than this; longer sweep directories keep their last characters.
MAX_GROUP_LENGTH = 128
#: W&B modes that log without an account (``WandbLogger(mode=...)``, ``WANDB_MODE``); any other mode
#: (``online``, the default, or ``shared``) needs credentials.
WANDB_MODES_WITHOUT_LOGIN = ("offline", "dryrun", "disabled")


def sweep_group() -> str | None:
    """The W&B group of the current Hydra job: its sweep directory (as configured, e.g.
    ``multirun/ppo/2025-01-01_12-00-00``) in a multirun, ``None`` in a single run or outside Hydra.

    Directories longer than :data:`MAX_GROUP_LENGTH` characters keep their last characters.
    """
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return None
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode != RunMode.MULTIRUN:
        return None
    return str(hydra_cfg.sweep.dir)[-MAX_GROUP_LENGTH:]


def register_resolvers() -> None:
    """Register ``${sweep_group:}`` (idempotent)."""
    if not OmegaConf.has_resolver("sweep_group"):
        OmegaConf.register_new_resolver("sweep_group", sweep_group)


def resolved_config(cfg: DictConfig) -> dict[str, Any]:
    """``cfg`` as a plain nested dict with interpolations resolved.

    Call it where Hydra's config is available (``${hydra:...}`` interpolations), i.e. in the job's
    main process. A config that does not resolve (e.g. a missing ``???`` value a stage does not use)
    is returned unresolved, with a warning, rather than failing the run.
    """
    try:
        return OmegaConf.to_container(cfg, resolve=True)
    except Exception as err:  # noqa: BLE001  (tracking must not stop training)
        log.warning("logging the unresolved config to W&B: %s", err)
        return OmegaConf.to_container(cfg, resolve=False)


class LogConfigToWandb(Callback):
    """Log a job's config as the run config of every :class:`~lightning.pytorch.loggers.WandbLogger`.

    Runs at ``on_train_start`` on global rank zero only, after Lightning logged the module's own
    hyperparameters (which the full config contains, so the run config ends up the full config). The config
    is a plain dict, resolved when the callback is built, so it also travels to ``ddp_spawn`` workers.

    Args:
        config: nested dict (e.g. :func:`resolved_config`), written with ``allow_val_change``.
    """

    def __init__(self, config: dict[str, Any]):
        self.config = config

    def on_train_start(self, trainer, pl_module) -> None:
        from lightning.pytorch.loggers import WandbLogger

        if not trainer.is_global_zero:
            return
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_hyperparams(self.config)


def tracking_callbacks(loggers: list, cfg: DictConfig) -> list[Callback]:
    """Callbacks a run needs for its loggers: :class:`LogConfigToWandb` when one of them is W&B."""
    from lightning.pytorch.loggers import WandbLogger

    if any(isinstance(logger, WandbLogger) for logger in loggers):
        return [LogConfigToWandb(resolved_config(cfg))]
    return []


def finish_wandb(exit_code: int | None = None) -> bool:
    """Finish the current W&B run, if there is one (no-op when ``wandb`` was never imported).

    Lightning's ``WandbLogger`` does not finish its run, and a new ``WandbLogger`` reuses a run still
    in progress: without this, all jobs that a launcher runs in one process would log into one run.

    Args:
        exit_code: 0 (or None) marks the run finished, non-zero failed.

    Returns:
        Whether a run was finished.
    """
    wandb = sys.modules.get("wandb")
    if wandb is None or getattr(wandb, "run", None) is None:
        return False
    wandb.finish(exit_code=exit_code)
    return True


def wandb_credentials_found() -> bool | None:
    """Whether W&B finds credentials for its server without prompting, as ``wandb.init`` looks for them.

    Sources, in W&B's order: ``WANDB_API_KEY``, ``WANDB_IDENTITY_TOKEN_FILE``, a ``.netrc`` entry for the
    W&B host (``NETRC`` or ``~/.netrc``; written by ``wandb login``), an ``api_key`` setting, or a
    login earlier in this process. Reads only environment variables and local files: never the network,
    never a prompt, and nothing is stored.

    Returns:
        ``True`` / ``False``; ``None`` when this ``wandb`` version has no such lookup (it is an internal
        ``wandb.sdk.lib.wbauth`` function, checked with wandb 0.31), and the caller should not decide.

    Raises:
        ValueError: credentials are set but malformed (e.g. a ``WANDB_API_KEY`` of the wrong form);
            the message is W&B's, on one line.
    """
    try:
        from wandb.errors import AuthenticationError
        from wandb.sdk import wandb_setup
        from wandb.sdk.lib import wbauth

        settings = wandb_setup.singleton().settings
        host = wbauth.HostUrl(settings.base_url, app_url=settings.app_url)
        lookup = wbauth.authenticate_session
    except (ImportError, AttributeError, TypeError) as err:
        log.debug("W&B credentials lookup unavailable (%s): not checked before the run", err)
        return None
    try:
        auth = lookup(host=host, source="rlhf_lightning", prompt=False, update_session=False)
    except TypeError as err:  # another signature in another wandb version
        log.debug("W&B credentials lookup unavailable (%s): not checked before the run", err)
        return None
    except AuthenticationError as err:
        raise ValueError(" ".join(str(err).split())) from None
    return auth is not None
