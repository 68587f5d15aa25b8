"""rlhf-lightning: RLHF (reward model, critic, PPO) on PyTorch Lightning, configured by Hydra."""

__version__ = "0.1.0"
