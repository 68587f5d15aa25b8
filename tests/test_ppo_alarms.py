"""PPO's reward-hacking alarms (``ppo.alarms``) on tiny runs: a reward that pays for length sets off the
length alarm, once; a reward that does not, does not.

The tiny model's logits are nearly uniform over 49k tokens, so its responses almost never end early; an
EOS bias on its output layer (policy and reference alike) makes about one token in seven an EOS, so that
the 8-token responses have varied lengths.
"""

from __future__ import annotations

import logging

import lightning as L
import pytest
import torch
from torch import nn

from rlhf_lightning.data import PromptDataModule
from rlhf_lightning.models import load_policy, load_reference
from rlhf_lightning.modules import PPOModule


def length_reward(completion_ids, **_) -> list[float]:
    """Pays one point per response token."""
    return [float(len(ids)) for ids in completion_ids]


def parity_reward(completion_ids, **_) -> list[float]:
    """1 when the first response token's id is even: nothing to do with length."""
    return [float(ids[0] % 2 == 0) if ids else 0.0 for ids in completion_ids]


def _with_eos_bias(model: nn.Module, eos_token_id: int, bias: float = 9.0) -> nn.Module:
    old = model.get_output_embeddings()
    head = nn.Linear(old.in_features, old.out_features, bias=True)
    with torch.no_grad():
        head.weight.copy_(old.weight)
        head.bias.zero_()
        head.bias[eos_token_id] = bias
    model.set_output_embeddings(head)
    model.config.tie_word_embeddings = False
    return model


def _run(tmp_path, tiny_dir, tokenizer, hh_file, reward, iterations: int = 2):
    L.seed_everything(0)
    eos = tokenizer.eos_token_id
    policy = _with_eos_bias(load_policy(tiny_dir), eos)
    ref = _with_eos_bias(load_reference(tiny_dir), eos)
    dm = PromptDataModule(tokenizer, str(hh_file), batch_size=16, max_prompt_length=48, val_size=16)
    module = PPOModule(policy, ref, None, None, tokenizer, reward_functions=[{"fn": reward}],
                       ppo={"adv_estimator": "reinforce_pp", "ppo_epochs": 1, "kl_coef": 0.01, "share_trunk": False,
                            "num_sample_prompts": 0, "log_samples_every_n_steps": 0,
                            "alarms": {"length_score_corr": 0.5, "repeated_ngram_frac": None, "kl_per_token": None},
                            "generation": {"max_new_tokens": 8, "score_with_eos": False}},
                       policy_optim={"lr": 1e-3})
    logged = []
    log_iteration = module.log_iteration

    def spy(exp, stats):
        log_iteration(exp, stats)
        logged.append({k: float(v) for k, v in module.trainer.callback_metrics.items() if k.startswith("diagnostics/")})

    module.log_iteration = spy
    trainer = L.Trainer(accelerator="cpu", max_steps=iterations * module.optimizer_steps_per_iteration, max_epochs=-1,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, default_root_dir=tmp_path)
    trainer.fit(module, datamodule=dm)
    return logged


@pytest.mark.parametrize("reward, fires", [(length_reward, True), (parity_reward, False)])
def test_length_alarm_fires_once_for_a_reward_that_pays_for_length(tmp_path, tiny_dir, tokenizer, hh_file, caplog,
                                                                   reward, fires):
    with caplog.at_level(logging.WARNING, logger="rlhf_lightning.modules.ppo"):
        logged = _run(tmp_path, tiny_dir, tokenizer, hh_file, reward)
    assert len(logged) == 2 and all(set(m) == {"diagnostics/length_score_corr", "diagnostics/repeated_ngram_frac",
                                               "diagnostics/kl_per_token"} for m in logged), logged
    corr = [m["diagnostics/length_score_corr"] for m in logged]
    alarms = [r.getMessage() for r in caplog.records if "ppo.alarms." in r.getMessage()]
    if fires:
        assert all(c > 0.99 for c in corr), corr  # the score is the length
        assert len(alarms) == 1, alarms  # once, though every iteration crosses the threshold
        assert "length_score_corr" in alarms[0] and "rm_eval" in alarms[0]
    else:
        assert all(abs(c) < 0.5 for c in corr), corr
        assert alarms == []
