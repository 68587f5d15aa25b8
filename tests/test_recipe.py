"""Training recipe through Trainer.fit on the tiny model: fp16 loss scaling and LR schedules.

fp16 AMP runs on CPU here with an explicit plugin (``MixedPrecision("16-mixed", "cpu", GradScaler("cpu"))``):
``Trainer(precision="16-mixed")`` on CPU would turn into bf16-mixed, but the plugin takes the same code
path (GradScaler, unscale inside ``optimizer_step``, ``MixedPrecision.clip_gradients``) as on a GPU.
"""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.pytorch.plugins.precision import MixedPrecision

from rlhf_lightning.data import PreferenceDataModule, PromptDataModule
from rlhf_lightning.models import load_policy, load_reference, load_scalar_model
from rlhf_lightning.modules import PPOModule, RewardModule
from rlhf_lightning.training.validate import ConfigError


def _trainer(tmp_path, max_steps: int, callbacks=(), **kwargs) -> L.Trainer:
    return L.Trainer(accelerator="cpu", devices=1, max_steps=max_steps, max_epochs=-1, logger=False,
                     enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                     limit_val_batches=0, num_sanity_val_steps=0, default_root_dir=tmp_path, callbacks=list(callbacks),
                     **kwargs)


def _fp16_plugin() -> MixedPrecision:
    # A small initial scale: the default 2**16 overflows the tiny model's fp16 gradients, and the scaler
    # would skip the first steps (that is its calibration, not what is tested here).
    return MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=8.0))


def _ppo_module(tiny_dir, tokenizer, policy_optim=None, critic_optim=None, **ppo):
    settings = {"ppo_epochs": 1, "num_minibatches": 2, "generation": {"max_new_tokens": 4}, "num_sample_prompts": 0,
                "log_samples_every_n_steps": 0, **ppo}
    return PPOModule(load_policy(tiny_dir, trainable_layers=1), load_reference(tiny_dir),
                     load_scalar_model(tiny_dir, trainable_layers=1), load_scalar_model(tiny_dir, frozen=True, seed=1),
                     tokenizer, ppo=settings, policy_optim=policy_optim or {"lr": 1e-3},
                     critic_optim=critic_optim or {"lr": 1e-3})


class LRRecorder(L.Callback):
    """Each optimizer's param-group lrs at every optimizer step."""

    def __init__(self):
        self.lrs = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.lrs.append([group["lr"] for group in optimizer.param_groups])


# --------------------------------------------------------------------------- fp16 AMP


def test_ppo_refuses_fp16_loss_scaling_before_training(tmp_path, tiny_dir, tokenizer, hh_file):
    module = _ppo_module(tiny_dir, tokenizer)
    prompts = PromptDataModule(tokenizer, str(hh_file), batch_size=4, max_prompt_length=32)
    trainer = _trainer(tmp_path, module.optimizer_steps_per_iteration, plugins=[_fp16_plugin()])
    before = {k: v.clone() for k, v in module.policy.state_dict().items()}
    # Without the check, Lightning raises at the first clip_gradients (fused AdamW unscales in its step).
    with pytest.raises(ConfigError, match=r"^trainer.precision=16-mixed is not supported for stage=ppo: .* "
                                          r"use trainer.precision=bf16-mixed \(or 32-true\)$"):
        trainer.fit(module, datamodule=prompts)
    assert all(torch.equal(v, before[k]) for k, v in module.policy.state_dict().items())


def test_reward_trains_under_fp16_loss_scaling_with_gradient_clipping(tmp_path, tiny_dir, tokenizer, hh_file):
    """Automatic optimization clips after Lightning unscales, which a fused AdamW forbids: the module
    takes the unfused one there (and keeps the fused one without clipping)."""
    L.seed_everything(0)
    pairs = PreferenceDataModule(tokenizer, str(hh_file), val_size=0, batch_size=4, max_length=48)
    for clip, fused in ((1e-3, False), (None, True)):
        module = RewardModule(load_scalar_model(tiny_dir, trainable_layers=1), tokenizer, optim={"lr": 1e-3})
        before = module.model.score.weight.detach().clone()
        trainer = _trainer(tmp_path, 2, plugins=[_fp16_plugin()], gradient_clip_val=clip)
        trainer.fit(module, datamodule=pairs)
        assert bool(trainer.optimizers[0].param_groups[0]["fused"]) is fused
        assert not torch.equal(module.model.score.weight, before)
        assert torch.isfinite(module.model.score.weight).all()


# --------------------------------------------------------------------------- LR schedules


def test_reward_schedule_decays_over_the_estimated_optimizer_steps(tmp_path, tiny_dir, tokenizer, hh_file):
    L.seed_everything(0)
    module = RewardModule(load_scalar_model(tiny_dir, trainable_layers=1), tokenizer,
                          optim={"lr": 1e-3, "warmup_steps": 1, "scheduler": "linear"})
    recorder = LRRecorder()
    trainer = _trainer(tmp_path, 5, [recorder])
    trainer.fit(module, datamodule=PreferenceDataModule(tokenizer, str(hh_file), val_size=0, batch_size=4,
                                                        max_length=48))
    # total 5 optimizer steps, warm-up 1 (1/2), then 1 - (step - 1) / 4
    assert recorder.lrs == [[pytest.approx(1e-3 * f)] for f in (0.5, 1.0, 0.75, 0.5, 0.25)]


def test_ppo_joint_schedules_step_once_per_iteration_per_group(tmp_path, tiny_dir, tokenizer, hh_file):
    """Joint optimizer: one LambdaLR, one lambda per group, total = iterations (max_steps / steps per iteration)."""
    L.seed_everything(0)
    module = _ppo_module(tiny_dir, tokenizer, joint_optimizer=True,
                         policy_optim={"lr": 1e-3, "warmup_steps": 1, "scheduler": "linear"},
                         critic_optim={"lr": 2e-3, "scheduler": "cosine"})
    iterations = 3
    recorder = LRRecorder()
    trainer = _trainer(tmp_path, iterations * module.optimizer_steps_per_iteration, [recorder])
    trainer.fit(module, datamodule=PromptDataModule(tokenizer, str(hh_file), batch_size=4, max_prompt_length=32))
    # Two optimizer steps (minibatches) per iteration at the same lrs. policy: 1/2, then 1 - (i - 1) / 2;
    # critic: (1 + cos(pi i / 3)) / 2 = 1, 0.75, 0.25.
    expected = [[pytest.approx(1e-3 * f), pytest.approx(2e-3 * g)] for f, g in ((0.5, 1), (1, 0.75), (0.5, 0.25))]
    assert recorder.lrs == [lrs for lrs in expected for _ in range(2)]
