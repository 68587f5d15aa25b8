"""Refactoring guard: the weights after a few reward steps and PPO iterations on the tiny model, pinned bit for bit.

The digests were recorded before the PPO iteration was split into phases (issue 10). A change to
the RL math, the sampling or the order of random draws changes them; a pure refactor does not. If a
deliberate change of behaviour moves them, record the new digests in the same commit and say why.
They hold on the project's CPU machines (torch 2.13 CPU build); another CPU or torch build may
round differently.
"""

from __future__ import annotations

import hashlib

import lightning as L
import torch

from rlhf_lightning.data import PreferenceDataModule, PromptDataModule
from rlhf_lightning.models import load_policy, load_reference, load_scalar_model
from rlhf_lightning.modules import PPOModule, RewardModule

REWARD_DIGEST = "6e0426b05360acb2"
PPO_DIGEST = "3a5e9f16f2343270"


def digest(*models: torch.nn.Module) -> str:
    """sha256 of every parameter and buffer's bytes, in state-dict order."""
    h = hashlib.sha256()
    for model in models:
        for name, tensor in model.state_dict().items():
            h.update(name.encode())
            h.update(tensor.detach().contiguous().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def _trainer(tmp_path, max_steps: int) -> L.Trainer:
    return L.Trainer(accelerator="cpu", devices=1, max_steps=max_steps, max_epochs=-1, logger=False,
                     enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                     limit_val_batches=0, num_sanity_val_steps=0, default_root_dir=tmp_path)


def test_reward_weights_after_six_steps_are_pinned(tmp_path, tiny_dir, tokenizer, hh_file):
    L.seed_everything(0)
    module = RewardModule(load_scalar_model(tiny_dir), tokenizer, optim={"lr": 1e-3}, center_coef=0.01)
    dm = PreferenceDataModule(tokenizer, str(hh_file), val_size=8, batch_size=4, max_length=64)
    _trainer(tmp_path, 6).fit(module, datamodule=dm)
    assert digest(module.model) == REWARD_DIGEST


def test_ppo_weights_after_two_iterations_are_pinned(tmp_path, tiny_dir, tokenizer, hh_file):
    L.seed_everything(0)
    module = PPOModule(load_policy(tiny_dir, trainable_layers=1), load_reference(tiny_dir),
                       load_scalar_model(tiny_dir, trainable_layers=1, head="zero"),
                       load_scalar_model(tiny_dir, frozen=True, seed=1), tokenizer,
                       ppo={"ppo_epochs": 2, "num_minibatches": 2, "num_sample_prompts": 0,
                            "log_samples_every_n_steps": 0, "generation": {"max_new_tokens": 6}},
                       policy_optim={"lr": 1e-3}, critic_optim={"lr": 1e-3})
    dm = PromptDataModule(tokenizer, str(hh_file), batch_size=4, max_prompt_length=48)
    _trainer(tmp_path, 2 * module.optimizer_steps_per_iteration).fit(module, datamodule=dm)
    assert digest(module.policy, module.critic) == PPO_DIGEST
