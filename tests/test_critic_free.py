"""Critic-free estimators and reward functions through PPOModule and Trainer.fit on the tiny model."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from rlhf_lightning.data import PromptDataModule
from rlhf_lightning.models import load_policy, load_reference, load_scalar_model
from rlhf_lightning.modules import PPOModule
from rlhf_lightning.rewards.functions import RewardFunctionError


def response_length(completions, **kwargs):
    """A reward function with TRL's signature: the completion's length in characters."""
    return [float(len(c)) for c in completions]


CALLS: list[list[int]] = []


def constant_on_even_prompts(completions, prompts=None, prompt_id=None, **kwargs):
    """1.0 for every response to a prompt with an even ``prompt_id`` column, else the length: the
    groups of even prompts are flat (all equal). Each call's prompt ids are recorded in CALLS."""
    CALLS.append(list(prompt_id))
    return [1.0 if pid % 2 == 0 else float(len(c)) for c, pid in zip(completions, prompt_id, strict=True)]


def broken(completions, **kwargs):
    return [float("nan")] * len(completions)


def _module(tiny_dir, tokenizer, ppo: dict, reward_functions=None, reward_model=True):
    return PPOModule(load_policy(tiny_dir, trainable_layers=1), load_reference(tiny_dir), None,
                     load_scalar_model(tiny_dir, frozen=True, seed=1) if reward_model else None, tokenizer,
                     ppo={"ppo_epochs": 2, "num_sample_prompts": 0, "log_samples_every_n_steps": 0,
                          "generation": {"max_new_tokens": 5}, **ppo},
                     policy_optim={"lr": 1e-3}, reward_functions=reward_functions)


def _fit(module, tmp_path, datamodule, iterations=1):
    trainer = L.Trainer(accelerator="cpu", max_steps=iterations * module.optimizer_steps_per_iteration,
                        max_epochs=-1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, default_root_dir=tmp_path)
    trainer.fit(module, datamodule=datamodule)
    return trainer


@pytest.mark.parametrize("estimator", ["grpo", "dr_grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline"])
def test_critic_free_estimators_train_the_policy_with_one_optimizer(tmp_path, tiny_dir, tokenizer, hh_file, estimator):
    L.seed_everything(0)
    module = _module(tiny_dir, tokenizer, {"adv_estimator": estimator, "num_generations": 2, "num_minibatches": 2,
                                           "kl_coef": 0.0, "kl_loss_coef": 0.1, "loss_agg": "seq_mean_token_mean"})
    assert module.optimizer_steps_per_iteration == 2 * 2  # one optimizer x 2 epochs x 2 minibatches
    before = {k: v.clone() for k, v in module.policy.state_dict().items()}
    trainer = _fit(module, tmp_path, PromptDataModule(tokenizer, str(hh_file), batch_size=4, max_prompt_length=48))
    assert len(trainer.optimizers) == 1 and trainer.global_step == 4
    metrics = trainer.callback_metrics
    assert "value/loss" not in metrics and "value/explained_var" not in metrics
    assert float(metrics["ppo/kl_loss"]) >= 0 and 0 <= float(metrics["rollout/mixed_groups"]) <= 1
    assert any(not torch.equal(before[k], v) for k, v in module.policy.state_dict().items())


def test_group_advantages_use_each_prompts_own_responses(tmp_path, tiny_dir, tokenizer, hh_file):
    """num_generations=3: 2 prompts become 6 rows, prompt-major; GRPO advantages sum to 0 within each group."""
    L.seed_everything(0)
    module = _module(tiny_dir, tokenizer, {"adv_estimator": "grpo", "num_generations": 3, "kl_coef": 0.0})
    dm = PromptDataModule(tokenizer, str(hh_file), batch_size=2, max_prompt_length=48)
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    with torch.no_grad():
        assert module.collect(batch["input_ids"], batch["attention_mask"], for_update=False).batch_size == 2  # eval
    exp = module.compute_advantages(module.collect(batch["input_ids"], batch["attention_mask"]))
    assert exp.batch_size == 6
    prompts = exp.rollout.input_ids[:, : exp.rollout.response_start]
    assert torch.equal(prompts[0], prompts[2]) and torch.equal(prompts[3], prompts[5])
    per_sequence = exp.advantages[:, 0].view(2, 3)
    assert torch.allclose(per_sequence.sum(1), torch.zeros(2), atol=1e-5)


@pytest.mark.parametrize("estimator", ["grpo", "reinforce_pp_baseline"])
def test_no_reference_pass_when_nothing_reads_it(tmp_path, tiny_dir, tokenizer, hh_file, monkeypatch, estimator):
    """β = 0 and no KL loss: training iterations run no reference forward (ppo.uses_reference false), train the same
    weights as with the reference run for monitoring (ppo.monitor_kl=true: the KL term is 0 either way, exactly), and
    log no KL; the before/after evaluation still runs it (eval/kl)."""
    import rlhf_lightning.rollout.experience as experience

    calls: list[bool] = []
    plain = experience.response_logprobs

    def counted(model, *args, **kwargs):
        if model is module.ref_policy:
            calls.append(torch.is_inference_mode_enabled())
        return plain(model, *args, **kwargs)

    monkeypatch.setattr(experience, "response_logprobs", counted)
    weights, logged = [], []
    for monitor in (False, True):
        L.seed_everything(0)
        module = _module(tiny_dir, tokenizer, {"adv_estimator": estimator, "num_generations": 2, "kl_coef": 0.0,
                                               "kl_loss_coef": 0.0, "monitor_kl": monitor, "num_sample_prompts": 2})
        assert module.ppo.uses_reference is monitor
        calls.clear()
        trainer = _fit(module, tmp_path, PromptDataModule(tokenizer, str(hh_file), batch_size=2, max_prompt_length=48),
                       iterations=2)
        assert len(calls) == (2 + 2 if monitor else 2)  # the evaluation before and after (eval/kl), + each iteration
        weights.append({k: v.clone() for k, v in module.policy.state_dict().items()})
        logged.append(dict(trainer.callback_metrics))
    for key, value in weights[0].items():
        assert torch.equal(value, weights[1][key]), key
    for key in ("objective/kl", "objective/non_score_reward", "diagnostics/kl_per_token"):
        assert key not in logged[0] and key in logged[1]
    assert float(logged[0]["objective/rlhf_reward"]) == float(logged[0]["objective/score"])
    assert float(logged[0]["objective/score"]) == float(logged[1]["objective/score"])


def test_packed_sequences_train_as_padded(tmp_path, tiny_dir, tokenizer, hh_file):
    """ppo.packed_sequences=true (padding-free forwards of the reward model, reference and policy) trains the weights
    the padded forwards train, in float64 (each tensor's difference ≤ 1e-6 of its change)."""
    runs = []
    for packed in (False, True):
        L.seed_everything(0)
        module = _module(tiny_dir, tokenizer, {"adv_estimator": "grpo", "num_generations": 2, "kl_coef": 0.05,
                                               "packed_sequences": packed})
        before = {k: v.double().clone() for k, v in module.policy.state_dict().items()}
        trainer = L.Trainer(accelerator="cpu", max_steps=module.optimizer_steps_per_iteration, max_epochs=-1,
                            logger=False, enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False, limit_val_batches=0, default_root_dir=tmp_path,
                            precision="64-true")
        trainer.fit(module, datamodule=PromptDataModule(tokenizer, str(hh_file), batch_size=2, max_prompt_length=48))
        assert module.packed is packed
        runs.append(module.policy.state_dict())
    moved = 0
    for key, start in before.items():
        step = (runs[0][key] - start).norm()
        assert (runs[1][key] - runs[0][key]).norm() <= 1e-6 * step + 1e-12, key
        moved += bool(step > 0)
    assert moved


def test_reward_functions_alone_give_the_score(tmp_path, tiny_dir, tokenizer, hh_file):
    L.seed_everything(0)
    module = _module(tiny_dir, tokenizer, {"adv_estimator": "rloo", "num_generations": 2},
                     reward_functions=[{"fn": "test_critic_free.response_length", "weight": 0.5}], reward_model=False)
    dm = PromptDataModule(tokenizer, str(hh_file), batch_size=2, max_prompt_length=48)
    trainer = _fit(module, tmp_path, dm)
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    exp = module.collect(batch["input_ids"], batch["attention_mask"], batch["prompt_index"], for_update=False)
    texts = tokenizer.batch_decode(exp.rollout.response_ids, skip_special_tokens=True)
    assert exp.scores.tolist() == [0.5 * len(t) for t in texts] and torch.equal(exp.rm_scores, torch.zeros(2))
    assert torch.equal(exp.reward_components["response_length"], torch.tensor([float(len(t)) for t in texts]))
    assert "reward/response_length" in trainer.callback_metrics


@pytest.mark.parametrize("rounds", [0, 3])
def test_dynamic_sampling_fills_the_batch_with_groups_that_have_a_signal(tmp_path, tiny_dir, tokenizer, rounds):
    """Groups of prompts with an even prompt_id always score 1.0 (flat). Further batches of prompts are drawn
    (``draw_prompts``, keyed by iteration and round) until 4 groups have a signal, at most ``max_resample_rounds``
    times; the batch is those first, in the order drawn, then flat ones if there were too few: always 4 groups."""
    import json

    rows = [{"prompt": f"Tell me about topic number {i}", "prompt_id": i} for i in range(16)]
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    L.seed_everything(0)
    module = _module(tiny_dir, tokenizer, {"adv_estimator": "grpo", "num_generations": 2, "dynamic_sampling": True,
                                           "max_resample_rounds": rounds},
                     reward_functions=[{"fn": constant_on_even_prompts}], reward_model=False)
    dm = PromptDataModule(tokenizer, str(path), batch_size=4, max_prompt_length=48)
    _fit(module, tmp_path, dm)  # the module needs its trainer's datamodule (columns, draw_prompts)
    batch = next(iter(dm.train_dataloader()))
    candidates = [batch["prompt_index"].tolist()] + [dm.draw_prompts((module.iteration, k), 4)["prompt_index"].tolist()
                                                     for k in range(1, rounds + 1)]
    drawn = []
    for prompts in candidates:
        drawn.append(prompts)
        if sum(i % 2 for r in drawn for i in r) >= 4:
            break
    signal = sum(i % 2 for r in drawn for i in r)
    kept = [i for *_, i in sorted((i % 2 == 0, k, pos, i) for k, r in enumerate(drawn) for pos, i in enumerate(r))][:4]
    if len(drawn) == 1:  # the batch's own groups, all kept, in their order
        kept = drawn[0]
    CALLS.clear()
    exp = module.collect(batch["input_ids"], batch["attention_mask"], batch["prompt_index"])
    assert [call[::2] for call in CALLS] == drawn  # one scoring per round, each prompt answered twice; not again
    assert exp.batch_size == 2 * 4
    start = exp.rollout.response_start
    prompt_ids = [ids[mask.bool()].tolist() for ids, mask in zip(exp.rollout.input_ids[:, :start],
                                                                  exp.rollout.attention_mask[:, :start], strict=True)]
    assert prompt_ids == [dm.prompt_ids[i] for i in kept for _ in range(2)]
    assert exp.sampling_stats == {"resample_rounds": len(drawn) - 1, "flat_groups": 4 * len(drawn) - signal,
                                  "flat_groups_kept": max(4 - signal, 0)}
    assert len(drawn) > 1 or rounds == 0  # the data makes the test resample when it may


def test_a_broken_reward_function_fails_the_iteration_naming_it(tmp_path, tiny_dir, tokenizer, hh_file):
    module = _module(tiny_dir, tokenizer, {"adv_estimator": "grpo", "num_generations": 2},
                     reward_functions=[{"fn": broken}], reward_model=False)
    with pytest.raises(RewardFunctionError, match="broken"):
        _fit(module, tmp_path, PromptDataModule(tokenizer, str(hh_file), batch_size=2, max_prompt_length=48))


def test_estimator_and_network_mismatches_are_refused(tiny_dir, tokenizer):
    policy, ref = load_policy(tiny_dir), load_reference(tiny_dir)
    with pytest.raises(ValueError, match="needs a critic"):
        PPOModule(policy, ref, None, load_scalar_model(tiny_dir), tokenizer)
    with pytest.raises(ValueError, match="critic-free"):
        PPOModule(policy, ref, load_scalar_model(tiny_dir), load_scalar_model(tiny_dir), tokenizer,
                  ppo={"adv_estimator": "grpo", "num_generations": 2})
    with pytest.raises(ValueError, match="needs a reward"):
        PPOModule(policy, ref, None, None, tokenizer, ppo={"adv_estimator": "grpo", "num_generations": 2})
    with pytest.raises(ValueError, match="num_generations >= 2"):
        PPOModule(policy, ref, None, load_scalar_model(tiny_dir), tokenizer, ppo={"adv_estimator": "rloo"})
