"""Each LightningModule trains through Trainer.fit on the tiny model: what should change changes."""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch

from rlhf_lightning.data import PreferenceDataModule, PromptDataModule
from rlhf_lightning.models import load_policy, load_reference, load_scalar_model
from rlhf_lightning.models.forward import sequence_scores
from rlhf_lightning.modules import PPOModule, RewardModule, ValueModule
from rlhf_lightning.modules.reward import SPLIT_RECORD


def _trainer(tmp_path, max_steps: int, callbacks=(), limit_val_batches=0, logger=False, **kwargs) -> L.Trainer:
    return L.Trainer(accelerator="cpu", devices=1, max_steps=max_steps, max_epochs=-1, logger=logger,
                     enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                     limit_val_batches=limit_val_batches, num_sanity_val_steps=0, default_root_dir=tmp_path,
                     callbacks=list(callbacks), **kwargs)


def _snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _changed(before: dict, model: torch.nn.Module) -> set[str]:
    return {k for k, v in model.state_dict().items() if not torch.equal(before[k], v)}


class StepRecorder(L.Callback):
    """Records, after every training batch, which of the watched networks changed in that batch."""

    def __init__(self, names: list[str]):
        self.names, self.changed, self._before = names, [], {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._before = {n: _snapshot(getattr(pl_module, n)) for n in self.names}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.changed.append({n: bool(_changed(self._before[n], getattr(pl_module, n))) for n in self.names})


def test_reward_module_trains_and_exports(tmp_path, tiny_dir, tokenizer, hh_file):
    from transformers import AutoModelForSequenceClassification

    L.seed_everything(0)
    model = load_scalar_model(tiny_dir)
    before = _snapshot(model)
    module = RewardModule(model, tokenizer, optim={"lr": 1e-3}, center_coef=0.01, export_dir=str(tmp_path / "model"))
    dm = PreferenceDataModule(tokenizer, str(hh_file), val_size=8, batch_size=4, max_length=64, train_part=(1, 2))
    trainer = _trainer(tmp_path, max_steps=3, limit_val_batches=1.0, val_check_interval=3)
    trainer.fit(module, datamodule=dm)
    changed = _changed(before, model)
    trainable = {k for k, p in model.named_parameters() if p.requires_grad}
    assert "score.weight" in changed and len(changed) == len(trainable)
    assert {"train/loss", "train/accuracy", "val/accuracy", "val/reward_abs_mean",
            "val/gain_over_shorter_rule"} <= set(trainer.callback_metrics)
    # the split it trained on, beside the model: half of the 40 pairs not held out, and the 8 held out
    split = json.loads((tmp_path / "model" / SPLIT_RECORD).read_text())
    assert split == dm.split_record() and split["train_part"] == [1, 2]
    assert (len(split["train"]), len(split["val"])) == (20, 8)

    # Export -> AutoModelForSequenceClassification round trip gives the same reward.
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "model").eval()
    assert reloaded.config.num_labels == 1
    batch = next(iter(dm.val_dataloader()))
    with torch.no_grad():
        ours = sequence_scores(model.eval(), batch["input_ids"], batch["attention_mask"])
        theirs = reloaded(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.squeeze(-1)
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


def test_reward_module_rejects_negative_center_coef(tiny_dir):
    with pytest.raises(ValueError, match="center_coef"):
        RewardModule(torch.nn.Linear(1, 1), center_coef=-1.0)


@pytest.fixture(scope="module")
def prompt_dm(tokenizer, hh_file):
    dm = PromptDataModule(tokenizer, str(hh_file), batch_size=4, max_prompt_length=48)
    return dm


def test_value_module_trains_critic_only(tmp_path, tiny_dir, tokenizer, prompt_dm):
    L.seed_everything(0)
    policy, critic = load_reference(tiny_dir), load_scalar_model(tiny_dir)
    reward_model = load_scalar_model(tiny_dir, frozen=True, seed=1)
    frozen = {"policy": _snapshot(policy), "reward_model": _snapshot(reward_model)}
    module = ValueModule(policy, critic, reward_model, tokenizer, value={"generation": {"max_new_tokens": 8}},
                         critic_optim={"lr": 1e-3}, export_dir=str(tmp_path / "critic"))
    recorder = StepRecorder(["critic"])
    trainer = _trainer(tmp_path, max_steps=2, callbacks=[recorder])
    trainer.fit(module, datamodule=prompt_dm)
    assert recorder.changed == [{"critic": True}, {"critic": True}]
    assert not _changed(frozen["policy"], policy) and not _changed(frozen["reward_model"], reward_model)
    assert torch.isfinite(trainer.callback_metrics["value/loss"])
    assert (tmp_path / "critic" / "model.safetensors").exists()
    # The exported critic is what PPO loads as its critic.
    reloaded = load_scalar_model(str(tmp_path / "critic"))
    torch.testing.assert_close(reloaded.score.weight, critic.score.weight)


def test_ppo_module_steps_both_optimizers_every_step(tmp_path, tiny_dir, tokenizer, prompt_dm):
    L.seed_everything(0)
    policy, ref = load_policy(tiny_dir), load_reference(tiny_dir)
    critic = load_scalar_model(tiny_dir)
    reward_model = load_scalar_model(tiny_dir, frozen=True, seed=1)
    frozen = {"ref": _snapshot(ref), "rm": _snapshot(reward_model)}
    module = PPOModule(policy, ref, critic, reward_model, tokenizer,
                       ppo={"ppo_epochs": 2, "num_minibatches": 2, "generation": {"max_new_tokens": 8},
                            "num_sample_prompts": 2, "log_samples_every_n_steps": 1},
                       policy_optim={"lr": 1e-3}, critic_optim={"lr": 1e-3},
                       export_dir=str(tmp_path / "model"), samples_path=str(tmp_path / "samples.jsonl"))
    steps = 3
    recorder = StepRecorder(["policy", "critic"])
    trainer = _trainer(tmp_path, max_steps=steps * module.optimizer_steps_per_iteration, callbacks=[recorder])
    trainer.fit(module, datamodule=prompt_dm)

    assert recorder.changed == [{"policy": True, "critic": True}] * steps
    assert module.iteration == steps
    assert not _changed(frozen["ref"], ref) and not _changed(frozen["rm"], reward_model)
    metrics = trainer.callback_metrics
    for key in ("objective/score", "objective/kl", "objective/entropy", "ppo/clipfrac", "ppo/approx_kl",
                "ppo/policy_loss", "value/loss", "value/explained_var", "response/length"):
        assert key in metrics and torch.isfinite(metrics[key]), key
    # The policy moved away from the reference: KL is measured and non-zero after training.
    assert metrics["objective/kl"].abs() > 0
    rows = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    phases = [r["phase"] for r in rows]
    assert phases.count("before") == 2 and phases.count("after") == 2 and "train" in phases
    assert (tmp_path / "model" / "model.safetensors").exists()


def test_ppo_checkpoint_leaves_out_frozen_networks(tmp_path, tiny_dir, tokenizer):
    module = PPOModule(load_policy(tiny_dir), load_reference(tiny_dir), load_scalar_model(tiny_dir),
                       load_scalar_model(tiny_dir, frozen=True), tokenizer, ppo={"adaptive_kl": True})
    checkpoint = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(checkpoint)
    prefixes = {k.split(".")[0] for k in checkpoint["state_dict"]}
    assert prefixes == {"policy", "critic"}
    assert checkpoint["kl_controller"]["value"] == pytest.approx(0.05)


@pytest.mark.parametrize("bad, match", [({"kl_coef": -0.1}, "kl_coef"), ({"clip_eps": 1.5}, "clip_eps"),
                                        ({"gamma": 1.2}, "gamma"), ({"lam": -0.1}, "lam"),
                                        ({"kl_estimator": "k9"}, "kl_estimator"), ({"bogus": 1}, "allowed keys")])
def test_ppo_config_errors(bad, match):
    from rlhf_lightning.config.schema import as_config
    from rlhf_lightning.modules import PPOConfig

    with pytest.raises((ValueError, TypeError), match=match):
        as_config(PPOConfig, bad)


def test_ppo_one_minibatch_reuses_the_first_forward(tmp_path, tiny_dir, tokenizer, prompt_dm):
    """With one minibatch, old logprobs/values come from epoch 0's forward: E critic forwards per
    iteration, not E + 1."""
    L.seed_everything(0)
    critic = load_scalar_model(tiny_dir)
    calls = []
    critic.model.register_forward_hook(lambda *_: calls.append(1))
    module = PPOModule(load_policy(tiny_dir), load_reference(tiny_dir), critic,
                       load_scalar_model(tiny_dir, frozen=True),
                       tokenizer, ppo={"ppo_epochs": 3, "num_minibatches": 1, "num_sample_prompts": 0,
                                       "log_samples_every_n_steps": 0, "generation": {"max_new_tokens": 4}})
    trainer = _trainer(tmp_path, max_steps=2 * module.optimizer_steps_per_iteration)
    trainer.fit(module, datamodule=prompt_dm)
    assert len(calls) == 2 * 3


def test_ppo_evaluation_is_reproducible_and_leaves_the_training_rng_alone(tmp_path, tiny_dir, tokenizer, hh_file):
    """Before/after evaluation: fixed held-out prompts, same sampling seed, training RNG not advanced, logged."""
    from lightning.pytorch.loggers import CSVLogger

    dm = PromptDataModule(tokenizer, str(hh_file), batch_size=4, max_prompt_length=48, val_size=6)
    module = PPOModule(load_policy(tiny_dir), load_reference(tiny_dir), load_scalar_model(tiny_dir),
                       load_scalar_model(tiny_dir, frozen=True, seed=1), tokenizer,
                       ppo={"ppo_epochs": 1, "num_sample_prompts": 5, "log_samples_every_n_steps": 0,
                            "generation": {"max_new_tokens": 6}},
                       policy_optim={"lr": 1e-2}, samples_path=str(tmp_path / "samples.jsonl"))
    logger = CSVLogger(tmp_path, name="csv", version="")
    trainer = _trainer(tmp_path, max_steps=2 * module.optimizer_steps_per_iteration, logger=logger)
    trainer.fit(module, datamodule=dm)

    rows = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    before = [r for r in rows if r["phase"] == "before"]
    after = [r for r in rows if r["phase"] == "after"]
    held_out = {dm.decode_prompt(item["prompt_index"], skip_special_tokens=True) for item in dm.val_dataset}
    trained_on = {dm.decode_prompt(item["prompt_index"], skip_special_tokens=True) for item in dm.train_dataset}
    assert len(before) == len(after) == 5
    assert {r["prompt"] for r in before} <= held_out and not {r["prompt"] for r in before} & trained_on
    # The policy changed (lr 1e-2), so the responses to at least one prompt differ after training.
    assert [r["response"] for r in before] != [r["response"] for r in after]

    # Same weights, same seed: the same responses; and the global RNG stream is not advanced.
    state = torch.get_rng_state()
    again = module.evaluate_samples("again")
    assert torch.equal(state, torch.get_rng_state())
    repeat = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert [r["response"] for r in repeat if r["phase"] == "again"] == [r["response"] for r in after]
    assert again["eval/score"] == pytest.approx(sum(r["score"] for r in after) / 5, rel=1e-5)

    logger.save()
    metrics = (tmp_path / "csv" / "metrics.csv").read_text()
    assert "eval/score_before" in metrics and "eval/score_after" in metrics and "eval/kl_after" in metrics


# --------------------------------------------------------------------------- PPO, joint optimizer


def _ppo_module(tiny_dir, tokenizer, joint: bool, **ppo):
    settings = {"ppo_epochs": 1, "num_minibatches": 2, "generation": {"max_new_tokens": 4}, "num_sample_prompts": 0,
                "log_samples_every_n_steps": 0, "joint_optimizer": joint, **ppo}
    return PPOModule(load_policy(tiny_dir), load_reference(tiny_dir), load_scalar_model(tiny_dir),
                     load_scalar_model(tiny_dir, frozen=True, seed=1), tokenizer, ppo=settings,
                     policy_optim={"lr": 1e-3, "warmup_steps": 1}, critic_optim={"lr": 3e-3, "warmup_steps": 3})


def _warmed(iteration: int) -> list[float]:
    """The two lrs of _ppo_module during PPO iteration ``iteration`` (0-based): lr * min(1, (i + 1) / (warmup + 1))."""
    return [1e-3 * min(1, (iteration + 1) / 2), 3e-3 * min(1, (iteration + 1) / 4)]


class OptimizerRecorder(L.Callback):
    """Per training batch: each optimizer's param-group lrs at its start; per optimizer step: the gradient
    norms (policy, critic, both) that reach the optimizer (after clip_gradients); the backward calls."""

    def __init__(self):
        self.lrs, self.norms, self.backwards = [], [], 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.lrs.append([[group["lr"] for group in opt.param_groups] for opt in trainer.optimizers])

    def on_before_backward(self, trainer, pl_module, loss):
        self.backwards += 1

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        def norm(module):
            norms = [p.grad.norm() for p in module.parameters() if p.grad is not None]
            return torch.linalg.vector_norm(torch.stack(norms))
        policy, critic = norm(pl_module.policy), norm(pl_module.critic)
        self.norms.append((float(policy), float(critic), float(torch.hypot(policy, critic))))


def test_ppo_joint_optimizer_is_one_optimizer_with_two_groups_and_their_warmups(tmp_path, tiny_dir, tokenizer,
                                                                                 prompt_dm):
    L.seed_everything(0)
    module = _ppo_module(tiny_dir, tokenizer, joint=True, max_grad_norm=1e-3)  # tiny: every step is clipped
    assert module.optimizer_steps_per_iteration == 1 * 2  # one optimizer x 1 epoch x 2 minibatches
    clips = []
    clip_gradients = module.clip_gradients
    module.clip_gradients = lambda opt, **kw: clips.append(opt) or clip_gradients(opt, **kw)
    steps = 2
    recorder, optim = StepRecorder(["policy", "critic"]), OptimizerRecorder()
    trainer = _trainer(tmp_path, max_steps=steps * module.optimizer_steps_per_iteration, callbacks=[recorder, optim])
    trainer.fit(module, datamodule=prompt_dm)

    # Both networks change on every training step; iterations and optimizer steps are counted right.
    assert recorder.changed == [{"policy": True, "critic": True}] * steps
    assert module.iteration == steps and trainer.global_step == steps * 2
    # One optimizer and one scheduler; two param groups holding exactly each network's trainable parameters.
    (optimizer,) = trainer.optimizers
    assert len(trainer.lr_scheduler_configs) == 1
    assert [group["name"] for group in optimizer.param_groups] == ["policy", "critic"]
    for group, net in zip(optimizer.param_groups, (module.policy, module.critic), strict=False):
        assert {id(p) for p in group["params"]} == {id(p) for p in net.parameters() if p.requires_grad}
    assert [group["initial_lr"] for group in optimizer.param_groups] == [1e-3, 3e-3]
    assert optimizer.param_groups[0]["fused"] and optimizer.param_groups[1]["fused"]
    # Each group warms up on its own schedule (warm-up 1 and 3 iterations).
    assert optim.lrs == [[pytest.approx(_warmed(i))] for i in range(steps)]
    # Per minibatch: one backward, one clip_gradients, one step; the clip is one norm over both groups.
    assert optim.backwards == len(clips) == len(optim.norms) == trainer.global_step
    assert all(opt.optimizer is optimizer for opt in clips)
    for policy, critic, joint in optim.norms:
        assert joint <= 1e-3 * (1 + 1e-4) and max(policy, critic) <= joint


def test_ppo_two_optimizers_clip_each_network_on_its_own(tmp_path, tiny_dir, tokenizer, prompt_dm):
    """The default path: two optimizers, two schedulers, each network's gradient norm clipped separately."""
    L.seed_everything(0)
    module = _ppo_module(tiny_dir, tokenizer, joint=False, max_grad_norm=1e-3, num_minibatches=1)
    optim = OptimizerRecorder()
    trainer = _trainer(tmp_path, max_steps=2 * module.optimizer_steps_per_iteration, callbacks=[optim])
    trainer.fit(module, datamodule=prompt_dm)
    assert module.optimizer_steps_per_iteration == 2 * 1 * 1 and module.iteration == 2
    assert len(trainer.optimizers) == 2 and len(trainer.lr_scheduler_configs) == 2
    assert all("name" not in group for opt in trainer.optimizers for group in opt.param_groups)
    assert optim.lrs == [[[pytest.approx(lr)] for lr in _warmed(i)] for i in range(2)]
    # Two optimizer steps per backward; at the first, each network is clipped to 1e-3 on its own.
    assert 2 * optim.backwards == len(optim.norms) == trainer.global_step
    for policy, critic, _joint in optim.norms[::2]:
        assert policy <= 1e-3 * (1 + 1e-4) and critic <= 1e-3 * (1 + 1e-4)
    assert any(joint > 1e-3 * (1 + 1e-4) for _, _, joint in optim.norms[::2])  # together: more than one norm


def test_make_optimizer_is_plain_fused_adamw_with_linear_warmup():
    """One group: exactly AdamW(params, fused=True, ...) and LambdaLR(linear warm-up), the path before groups."""
    from rlhf_lightning.config.schema import OptimConfig
    from rlhf_lightning.modules.common import make_optimizer

    config = OptimConfig(lr=1e-3, weight_decay=0.1, betas=(0.8, 0.99), eps=1e-6, warmup_steps=3)
    runs = []
    for build in ("ours", "plain"):
        torch.manual_seed(0)
        net = torch.nn.Linear(4, 3)
        if build == "ours":
            optimizer, scheduler = make_optimizer(net.parameters(), config)
        else:
            optimizer = torch.optim.AdamW(list(net.parameters()), fused=True, lr=1e-3, weight_decay=0.1,
                                          betas=(0.8, 0.99), eps=1e-6)
            scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / 4))
        for _ in range(5):
            optimizer.zero_grad()
            net(torch.randn(2, 4)).square().sum().backward()
            optimizer.step()
            scheduler.step()
        runs.append((optimizer, scheduler, net))
    (ours, ours_sched, ours_net), (plain, plain_sched, plain_net) = runs
    assert ours.defaults == plain.defaults and ours.param_groups[0]["fused"] is True
    assert ours.state_dict()["param_groups"] == plain.state_dict()["param_groups"]
    assert ours_sched.state_dict() == plain_sched.state_dict()
    for a, b in zip(ours_net.parameters(), plain_net.parameters(), strict=False):
        assert torch.equal(a, b)


def test_make_grouped_optimizer_errors_name_the_group():
    from rlhf_lightning.config.schema import OptimConfig
    from rlhf_lightning.modules.common import make_grouped_optimizer

    frozen = torch.nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters in critic"):
        make_grouped_optimizer([("policy", torch.nn.Linear(2, 2).parameters(), OptimConfig()),
                                ("critic", frozen.parameters(), OptimConfig())])
    with pytest.raises(ValueError, match="no parameter groups"):
        make_grouped_optimizer([])


def test_ppo_joint_optimizer_must_be_a_bool():
    from rlhf_lightning.config.schema import as_config
    from rlhf_lightning.modules import PPOConfig

    with pytest.raises(TypeError, match="joint_optimizer"):
        as_config(PPOConfig, {"joint_optimizer": "yes"})


def test_deepspeed_gets_the_clip_value_and_needs_the_joint_optimizer():
    """Under DeepSpeed clip_gradients does nothing: ppo.max_grad_norm goes into the strategy's DeepSpeed config."""
    from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy

    from rlhf_lightning.modules import PPOConfig
    from rlhf_lightning.modules.ppo import configure_deepspeed_clipping

    strategy = DeepSpeedStrategy.__new__(DeepSpeedStrategy)  # no deepspeed package needed: only .config is read
    strategy.config = {"zero_optimization": {"stage": 2}}
    configure_deepspeed_clipping(strategy, PPOConfig(joint_optimizer=True, max_grad_norm=0.5))
    assert strategy.config["gradient_clipping"] == 0.5
    strategy.config = {"gradient_clipping": 2.0}  # a user's DeepSpeed config wins
    configure_deepspeed_clipping(strategy, PPOConfig(joint_optimizer=True, max_grad_norm=0.5))
    assert strategy.config["gradient_clipping"] == 2.0
    strategy.config = {}
    configure_deepspeed_clipping(strategy, PPOConfig(joint_optimizer=True, max_grad_norm=None))
    assert strategy.config["gradient_clipping"] == 0.0  # DeepSpeed: no clipping
    with pytest.raises(ValueError, match="ppo.joint_optimizer=true"):
        configure_deepspeed_clipping(strategy, PPOConfig(joint_optimizer=False))
    configure_deepspeed_clipping(DDPStrategy(), PPOConfig())  # any other strategy: nothing to do


def test_ppo_critic_warmup_leaves_the_policy_alone_then_trains_both(tmp_path, tiny_dir, tokenizer, prompt_dm):
    """ppo.critic_warmup_iterations=1: iteration 1 updates only the critic, iteration 2 both; the
    step count (and so max_steps) is that of a run without warm-up."""
    L.seed_everything(0)
    module = PPOModule(load_policy(tiny_dir), load_reference(tiny_dir), load_scalar_model(tiny_dir),
                       load_scalar_model(tiny_dir, frozen=True, seed=1), tokenizer,
                       ppo={"ppo_epochs": 2, "critic_warmup_iterations": 1, "num_sample_prompts": 0,
                            "log_samples_every_n_steps": 0, "generation": {"max_new_tokens": 6}},
                       policy_optim={"lr": 1e-3}, critic_optim={"lr": 1e-3})
    recorder = StepRecorder(["policy", "critic"])
    trainer = _trainer(tmp_path, max_steps=2 * module.optimizer_steps_per_iteration, callbacks=[recorder])
    trainer.fit(module, datamodule=prompt_dm)
    assert recorder.changed == [{"policy": False, "critic": True}, {"policy": True, "critic": True}]
    assert module.iteration == 2
    assert float(trainer.callback_metrics["ppo/policy_frozen"]) == 0.0
