"""The LightningModules of the pipeline: reward model, critic warm-up, PPO, and DPO (PPO's alternative).

Their settings are the dataclasses of :mod:`rlhf_lightning.config.schema`, re-exported here.
"""

from rlhf_lightning.config.schema import DPOConfig, OptimConfig, PPOConfig, RewardConfig, ValueConfig
from rlhf_lightning.modules.dpo import DPOModule
from rlhf_lightning.modules.ppo import PPOModule
from rlhf_lightning.modules.reward import RewardModule
from rlhf_lightning.modules.value import ValueModule

__all__ = ["DPOConfig", "DPOModule", "OptimConfig", "PPOConfig", "PPOModule", "RewardConfig", "RewardModule",
           "ValueConfig", "ValueModule"]
