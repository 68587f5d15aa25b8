"""Numerical faults and safe loading: NaN/inf steps never reach the weights; configs never trust remote code."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from rlhf_lightning.data import PreferenceDataModule, PromptDataModule
from rlhf_lightning.models import load_policy, load_reference, load_scalar_model
from rlhf_lightning.modules import PPOModule, RewardModule
from rlhf_lightning.training.callbacks import NonFiniteGuard, TrainingDiverged

INF = float("inf")


def _trainer(tmp_path, max_steps: int, callbacks) -> L.Trainer:
    return L.Trainer(accelerator="cpu", devices=1, max_steps=max_steps, max_epochs=-1, logger=False,
                     enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                     limit_val_batches=0, num_sanity_val_steps=0, default_root_dir=tmp_path, callbacks=callbacks)


def _snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


class Faults(L.Callback):
    """Injects faults by batch index and records, per batch, whether each watched network changed.

    ``nan_loss``: batches whose reward scores, so their loss, are NaN (forward hook on the reward head).
    ``inf_grad``: {batch index: function of the module giving the parameter whose gradient becomes +inf}.
    """

    def __init__(self, watched: list[str], nan_loss=(), inf_grad=None):
        self.watched, self.nan_loss, self.inf_grad = watched, set(nan_loss), inf_grad or {}
        self.changed, self.before, self._handles = [], [], []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.before.append({n: _snapshot(getattr(pl_module, n)) for n in self.watched})
        if batch_idx in self.nan_loss:
            head = pl_module.model.score  # the reward head: every score, so the loss, becomes NaN
            self._handles.append(head.register_forward_hook(lambda m, args, out: out * float("nan")))
        if batch_idx in self.inf_grad:
            param = self.inf_grad[batch_idx](pl_module)
            self._handles.append(param.register_hook(lambda g: torch.full_like(g, INF)))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.changed.append({n: any(not torch.equal(v, self.before[-1][n][k])
                                    for k, v in getattr(pl_module, n).state_dict().items())
                             for n in self.watched})


def _reward_module(tiny_dir, tokenizer):
    L.seed_everything(0)
    return RewardModule(load_scalar_model(tiny_dir), tokenizer, optim={"lr": 1e-3})


def _pairs(tokenizer, hh_file):
    return PreferenceDataModule(tokenizer, str(hh_file), val_size=0, batch_size=4, max_length=48)


def test_nonfinite_loss_or_gradient_skips_the_optimizer_step(tmp_path, tiny_dir, tokenizer, hh_file):
    module = _reward_module(tiny_dir, tokenizer)
    faults = Faults(["model"], nan_loss=[1], inf_grad={3: lambda m: m.model.score.weight})
    guard = NonFiniteGuard(max_consecutive_bad_steps=3)
    trainer = _trainer(tmp_path, 5, [faults, guard])
    trainer.fit(module, datamodule=_pairs(tokenizer, hh_file))
    assert faults.changed == [{"model": c} for c in (True, False, True, False, True)]
    assert guard.skipped == 2 and guard.consecutive == 0
    assert trainer.callback_metrics["train/skipped_steps"] == 2
    # Skipped, not fed zeros: Adam's step count only counts the 3 good steps.
    optimizer = trainer.optimizers[0]
    assert optimizer.state[module.model.score.weight]["step"] == 3
    assert torch.isfinite(module.model.score.weight).all()


def test_consecutive_nonfinite_steps_stop_with_the_last_good_state(tmp_path, tiny_dir, tokenizer, hh_file):
    module = _reward_module(tiny_dir, tokenizer)
    faults = Faults(["model"], nan_loss=range(2, 100))
    trainer = _trainer(tmp_path, 20, [faults, NonFiniteGuard(max_consecutive_bad_steps=3)])
    with pytest.raises(TrainingDiverged, match="3 consecutive optimizer steps") as info:
        trainer.fit(module, datamodule=_pairs(tokenizer, hh_file))
    assert len(faults.before) == 5  # 2 good batches, then 3 bad ones, then the stop
    path = tmp_path / "checkpoints" / NonFiniteGuard.STOP_CHECKPOINT
    assert str(path) in str(info.value)
    checkpoint = torch.load(path, weights_only=True)
    last_good = faults.before[2]["model"]  # the weights before the first bad step
    for key, value in last_good.items():
        assert torch.equal(checkpoint["state_dict"][f"model.{key}"], value), key
    assert checkpoint["global_step"] == 5 and checkpoint["callbacks"]["NonFiniteGuard"]["skipped"] == 3


def test_ppo_skips_policy_and_critic_together(tmp_path, tiny_dir, tokenizer, hh_file):
    L.seed_everything(0)
    module = PPOModule(load_policy(tiny_dir), load_reference(tiny_dir), load_scalar_model(tiny_dir),
                       load_scalar_model(tiny_dir, frozen=True, seed=1), tokenizer,
                       ppo={"ppo_epochs": 1, "num_minibatches": 2, "generation": {"max_new_tokens": 6},
                            "num_sample_prompts": 0},
                       policy_optim={"lr": 1e-3}, critic_optim={"lr": 1e-3})
    # Iteration 1: only the critic's gradient is inf; the policy's update must be skipped with it.
    faults = Faults(["policy", "critic"], inf_grad={1: lambda m: m.critic.score.weight})
    guard = NonFiniteGuard(max_consecutive_bad_steps=5)
    prompts = PromptDataModule(tokenizer, str(hh_file), batch_size=4, max_prompt_length=32)
    trainer = _trainer(tmp_path, 3 * module.optimizer_steps_per_iteration, [faults, guard])
    trainer.fit(module, datamodule=prompts)
    assert faults.changed == [{"policy": True, "critic": True}, {"policy": False, "critic": False},
                              {"policy": True, "critic": True}]
    assert guard.skipped == 2  # both minibatch updates of iteration 1
    for optimizer, network in zip(trainer.optimizers, (module.policy, module.critic), strict=True):
        trainable = [p for p in network.parameters() if p.requires_grad]
        assert optimizer.state[trainable[0]]["step"] == 4  # 2 good iterations x 2 minibatches


# --------------------------------------------------------------------------- safe loading


def test_value_checkpoint_with_rng_and_loader_state_loads_with_weights_only(tmp_path, tiny_dir, tokenizer, hh_file):
    from rlhf_lightning.modules import ValueModule
    from rlhf_lightning.training.callbacks import RNGStateCallback

    module = ValueModule(load_reference(tiny_dir), load_scalar_model(tiny_dir),
                         load_scalar_model(tiny_dir, frozen=True), tokenizer,
                         value={"generation": {"max_new_tokens": 4}}, critic_optim={"lr": 1e-3})
    trainer = _trainer(tmp_path, 1, [RNGStateCallback(), NonFiniteGuard()])
    trainer.fit(module, datamodule=PromptDataModule(tokenizer, str(hh_file), batch_size=4, max_prompt_length=24))
    trainer.save_checkpoint(tmp_path / "value.ckpt")
    checkpoint = torch.load(tmp_path / "value.ckpt", weights_only=True)
    assert {k.split(".")[0] for k in checkpoint["state_dict"]} == {"critic"}
    assert checkpoint["loops"]["fit_loop"]["state_dict"]["combined_loader"] == [{"epoch": 0, "batches": 1}]
    assert torch.equal(checkpoint["callbacks"]["RNGStateCallback"]["torch"], torch.get_rng_state())


def _loader_nodes(node, path=""):
    """(dotted path, value) of every ``trust_remote_code`` key in a config container."""
    if isinstance(node, dict):
        for key, value in node.items():
            where = f"{path}.{key}" if path else key
            if key == "trust_remote_code":
                yield where, value
            yield from _loader_nodes(value, where)


@pytest.mark.parametrize("stage", ["reward", "value", "ppo"])
def test_trust_remote_code_is_off_unless_the_config_turns_it_on(stage, tmp_path):
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from tests.test_train import CONF

    def flags(*extra):
        with initialize_config_dir(CONF, version_base="1.3"):
            rm = [] if stage == "reward" else ["reward_model_path=x"]
            cfg = compose("config", overrides=[f"stage={stage}", "model=tiny", "output_dir=.", *rm, *extra])
        return dict(_loader_nodes(OmegaConf.to_container(cfg, resolve=True)))

    default = flags()
    assert "tokenizer.trust_remote_code" in default
    assert len([k for k in default if k.startswith("module.")]) >= (1 if stage == "reward" else 3)
    assert set(default.values()) == {False}
    assert set(flags("trust_remote_code=true").values()) == {True}


def test_loaders_pass_trust_remote_code_through(monkeypatch, tiny_dir):
    import transformers

    seen = []

    def recording(*args, **kwargs):
        seen.append(kwargs.get("trust_remote_code"))
        raise RuntimeError("stop")

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", recording)
    for flag in (None, True):
        with pytest.raises(RuntimeError, match="stop"):
            load_scalar_model(tiny_dir) if flag is None else load_scalar_model(tiny_dir, trust_remote_code=True)
    assert seen == [False, True]
