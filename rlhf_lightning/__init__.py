"""rlhf-lightning: RLHF (reward model, critic, PPO and the critic-free estimators, DPO) on PyTorch Lightning,
configured by Hydra.

The package, by what each part is:

- ``algorithms``: the RL math as plain functions (losses, advantage estimators, KL, masked ops, LR schedules);
- ``config``: the settings dataclasses (``config.schema``), the one source of the config reference;
- ``models``: the four networks, where they come from, LoRA, the shared frozen trunk, their forwards;
- ``data``: preference pairs and prompts from files or the Hub;
- ``rollout``: sampling responses (HF loop or vLLM) and the experience the update reads;
- ``rewards``: reward functions and verifiers;
- ``evaluation``: diagnostics, the held-out before/after evaluation, ``rm_eval``, ``summary``, ``report``;
- ``modules``: the LightningModules of the four stages;
- ``training``: a run from the composed config (``train.py``): checks, assembly, callbacks, checkpoints, loggers.

The names users need are importable from here, ``from rlhf_lightning import PPOModule, ppo_policy_loss``; each
is imported when first used, so ``import rlhf_lightning`` stays light.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

#: module -> the public names it gives the package root
_EXPORTS = {
    "rlhf_lightning.modules": ("RewardModule", "ValueModule", "PPOModule", "DPOModule"),
    "rlhf_lightning.config.schema": ("RewardConfig", "ValueConfig", "PPOConfig", "DPOConfig", "OptimConfig",
                                     "LoRASettings", "GenerationConfig", "VLLMConfig", "AlarmsConfig"),
    "rlhf_lightning.algorithms.losses": ("pairwise_reward_loss", "value_loss", "ppo_policy_loss", "aggregate_loss",
                                         "kl_loss", "tis_weights", "dpo_loss"),
    "rlhf_lightning.algorithms.advantages": ("ADV_ESTIMATORS", "td_targets", "gae", "group_advantages",
                                             "rloo_advantages", "reinforce_pp_advantages",
                                             "reinforce_pp_baseline_advantages", "sequence_to_token_advantages"),
    "rlhf_lightning.algorithms.kl": ("KL_ESTIMATORS", "kl_penalty", "compute_rewards", "FixedKLController",
                                     "AdaptiveKLController"),
    "rlhf_lightning.rollout.sampler": ("Rollout", "generate"),
    "rlhf_lightning.rollout.experience": ("Experience", "make_experience"),
    "rlhf_lightning.rewards.functions": ("load_reward_functions", "score_with_functions", "RewardFunctionError"),
    "rlhf_lightning.data": ("PreferenceDataModule", "PromptDataModule", "DPODataModule"),
    "rlhf_lightning.models": ("load_tokenizer", "load_policy", "load_reference", "load_reward_model", "load_critic",
                              "load_scalar_model"),
    "rlhf_lightning.evaluation.diagnostics": ("preference_diagnostics", "rollout_diagnostics", "bootstrap_ci"),
}
_HOME = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = ["__version__", *_HOME]


def __getattr__(name: str):
    """Import a public name on first use (PEP 562)."""
    module = _HOME.get(name)
    if module is None:
        raise AttributeError(f"module 'rlhf_lightning' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
