"""The three LightningModules of the pipeline: reward model, critic warm-up, PPO.

Their settings are the dataclasses of :mod:`rlhf_lightning.schema`, re-exported here.
"""

from rlhf_lightning.modules.ppo import PPOModule
from rlhf_lightning.modules.reward import RewardModule
from rlhf_lightning.modules.value import ValueModule
from rlhf_lightning.schema import OptimConfig, PPOConfig, RewardConfig, ValueConfig

__all__ = ["OptimConfig", "PPOConfig", "PPOModule", "RewardConfig", "RewardModule", "ValueConfig", "ValueModule"]
