"""The three LightningModules of the pipeline: reward model, critic warm-up, PPO."""

from rlhf_lightning.modules.common import OptimConfig
from rlhf_lightning.modules.ppo import PPOConfig, PPOModule
from rlhf_lightning.modules.reward import RewardModule
from rlhf_lightning.modules.value import ValueConfig, ValueModule

__all__ = ["OptimConfig", "PPOConfig", "PPOModule", "RewardModule", "ValueConfig", "ValueModule"]
