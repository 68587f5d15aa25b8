"""``critic.share_base``: PPO's critic as a second LoRA adapter (and its head) on the policy's own base.

One base model in memory for the policy, the reference (adapters off) and the critic; each network runs its own
adapter and trains its own parameters; the critic starts from a LoRA reward/value export's adapter and head;
checkpoints, exact resume and the exports work as with a critic on its own base."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from conftest import fit_ppo_with_checkpoints
from rlhf_lightning.models import load_critic, load_policy, load_reference, load_scalar_model
from rlhf_lightning.models.builders import PolicyBaseCritic
from rlhf_lightning.models.forward import response_logprobs, response_values
from rlhf_lightning.models.lora import (
    CRITIC_ADAPTER,
    adapter_name_of,
    adapters_disabled,
    has_lora,
    log_network_memory,
    merged_named_weights,
    own_parameters,
    stacked_adapter,
)
from rlhf_lightning.modules import PPOModule
from rlhf_lightning.modules.common import export_pretrained

pytest.importorskip("peft")

TOL = {"rtol": 1e-5, "atol": 1e-6}
LORA = {"r": 4, "layers": 1}


def _set_lora_b(model: torch.nn.Module, adapter: str, seed: int, std: float = 0.3) -> None:
    """Random values for one adapter's B matrices (0 at the start), so that it changes what its network computes."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_B." in name and adapter_name_of(name) == adapter:
                param.copy_(torch.randn(param.shape, generator=gen) * std)


def _copy_adapter(source: torch.nn.Module, source_adapter: str, target: torch.nn.Module, target_adapter: str) -> None:
    """Copy one adapter's tensors into another network's adapter of the same layers."""
    tensors = {name.replace(f".{source_adapter}.", "."): param for name, param in source.named_parameters()
               if adapter_name_of(name) == source_adapter}
    with torch.no_grad():
        for name, param in target.named_parameters():
            if adapter_name_of(name) == target_adapter:
                param.copy_(tensors[name.replace(f".{target_adapter}.", ".")])


def _sequences(vocab: int = 1000):
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (3, 12), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    return ids, mask, 6  # response from column 6


def test_critic_on_the_policys_base_runs_and_trains_its_own_adapter(tiny_dir):
    """Values and gradients equal those of a critic on its own copy of the base with the same adapter and head; the
    policy's log-probabilities after a critic forward are its own; neither optimizer sees the other's parameters."""
    torch.manual_seed(0)
    policy = load_policy(tiny_dir, lora={"r": 4})
    critic = PolicyBaseCritic.from_source(tiny_dir, head="normal", seed=5, lora={"r": 4}).attach(policy)
    assert critic.model is policy.model and has_lora(critic) and set(policy.peft_config) == {"default", CRITIC_ADAPTER}
    assert not any(t.is_meta for t in [*critic.parameters(), *critic.buffers()])
    _set_lora_b(policy, "default", seed=1)
    _set_lora_b(policy, CRITIC_ADAPTER, seed=2)
    # the same networks, each on its own base
    alone_policy = load_policy(tiny_dir, lora={"r": 4})
    _copy_adapter(policy, "default", alone_policy, "default")
    alone_critic = load_scalar_model(tiny_dir, lora={"r": 4})
    _copy_adapter(policy, CRITIC_ADAPTER, alone_critic, "default")
    alone_critic.score.load_state_dict(critic.score.state_dict())

    ids, mask, start = _sequences()
    values = response_values(critic, ids, mask, start)
    logprobs = response_logprobs(policy, ids, mask, start)
    expected_values = response_values(alone_critic, ids, mask, start)
    torch.testing.assert_close(values, expected_values, **TOL)
    torch.testing.assert_close(logprobs, response_logprobs(alone_policy, ids, mask, start), **TOL)
    head_only = load_scalar_model(tiny_dir, seed=5, head="normal")  # the same head on the plain base
    assert (values - response_values(head_only, ids, mask, start)).abs().max() > 1e-3  # the critic's adapter is on
    with adapters_disabled(policy):  # the reference: the base, neither adapter
        torch.testing.assert_close(response_logprobs(policy, ids, mask, start),
                                   response_logprobs(load_reference(tiny_dir), ids, mask, start), **TOL)

    (values.sum() + logprobs.sum()).backward()
    (expected_values.sum() + response_logprobs(alone_policy, ids, mask, start).sum()).backward()
    grads = {n: p.grad for n, p in alone_critic.named_parameters() if p.requires_grad}
    for name, param in critic.named_parameters():
        if adapter_name_of(name) == CRITIC_ADAPTER or name.startswith("score."):
            torch.testing.assert_close(param.grad, grads[name.replace(f".{CRITIC_ADAPTER}.", ".default.")], **TOL)

    policy_own, critic_own = own_parameters(policy), own_parameters(critic)
    assert {id(p) for p in policy_own}.isdisjoint(id(p) for p in critic_own)
    names = {id(p): n for n, p in critic.named_parameters()}
    assert {names[id(p)] for p in critic_own} == {n for n in names.values()
                                                  if adapter_name_of(n) == CRITIC_ADAPTER or n.startswith("score.")}
    assert all(p.requires_grad for n, p in policy.named_parameters() if ".lora_" in n)  # switching kept them trainable
    # what a generation engine (vLLM) loads: the policy merged with its own adapter, not the critic's
    alone_weights = dict(merged_named_weights(alone_policy))
    for name, tensor in merged_named_weights(policy):
        torch.testing.assert_close(tensor, alone_weights.pop(name), **TOL, msg=name)
    assert not alone_weights
    sizes = log_network_memory({"policy": policy, "critic": critic})
    assert sizes["critic"]["bytes"] < sizes["policy"]["bytes"] / 20  # its adapter and head only


def test_gradient_checkpointing_recomputes_each_network_with_its_own_adapter(tiny_dir):
    """With checkpointing the backward recomputes the critic's blocks after the policy's adapter is active again:
    the gradients equal those without checkpointing (recomputed with the policy's adapter, the critic's would not)."""
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        policy = load_policy(tiny_dir, lora={"r": 4}, gradient_checkpointing=checkpointing)
        critic = PolicyBaseCritic.from_source(tiny_dir, head="normal", seed=5, lora={"r": 4}).attach(policy)
        _set_lora_b(policy, "default", seed=1)
        _set_lora_b(policy, CRITIC_ADAPTER, seed=2)
        ids, mask, start = _sequences()
        values = response_values(critic, ids, mask, start)  # the critic first: the policy's adapter runs last
        logprobs = response_logprobs(policy, ids, mask, start)
        (values.square().sum() + logprobs.sum()).backward()
        grads.append({n: p.grad for n, p in critic.named_parameters() if p.grad is not None})
        assert policy.is_gradient_checkpointing == checkpointing
    assert grads[0].keys() == grads[1].keys() and any(CRITIC_ADAPTER in n for n in grads[0])
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, **TOL, msg=name)


def test_the_critic_starts_from_a_lora_export_and_refuses_what_it_cannot_share(tiny_dir, tmp_path):
    lora = {"r": 4}
    trained = load_scalar_model(tiny_dir, seed=2, lora=lora)  # a LoRA reward/value model on the policy's base
    _set_lora_b(trained, "default", seed=3)
    export_pretrained(trained, None, tmp_path / "rm" / "model")
    critic = PolicyBaseCritic.from_source(str(tmp_path / "rm" / "model"), lora=lora).attach(load_policy(tiny_dir,
                                                                                                         lora=lora))
    ids, mask, start = _sequences()
    torch.testing.assert_close(response_values(critic, ids, mask, start), response_values(trained, ids, mask, start),
                               **TOL)
    zero = PolicyBaseCritic.from_source(str(tmp_path / "rm" / "model"), head="zero", lora=lora)
    assert zero.adapter_state is not None and zero.head_state is None  # the adapter still comes; the head is new
    assert zero.attach(load_policy(tiny_dir, lora=lora)).score.weight.abs().max() == 0

    load_scalar_model(tiny_dir, seed=2).save_pretrained(tmp_path / "full")  # a trained head, no adapter
    with pytest.raises(ValueError, match="has a trained head but no LoRA adapter"):
        PolicyBaseCritic.from_source(str(tmp_path / "full"), lora=lora)
    fresh = PolicyBaseCritic.from_source(str(tmp_path / "full"), head="normal", seed=7, lora=lora)
    assert fresh.adapter_state is None and fresh.head_state is None
    with pytest.raises(ValueError, match="critic.share_base='yes': expected true or false"):
        load_critic("gae", share_base="yes", name_or_path=tiny_dir, lora=lora)
    assert isinstance(load_critic("gae", share_base=True, name_or_path=tiny_dir, lora=lora), PolicyBaseCritic)
    assert load_critic("grpo", share_base=True, name_or_path=tiny_dir, lora=lora) is None
    with pytest.raises(ValueError, match="needs model.lora.r"):
        PolicyBaseCritic.from_source(tiny_dir, lora={"r": None})
    with pytest.raises(ValueError, match="no LoRA adapter to share"):
        PolicyBaseCritic.from_source(tiny_dir, lora=lora).attach(load_policy(tiny_dir))
    value = load_scalar_model(str(tmp_path / "rm" / "model"), lora={"r": 2})  # a value stage on the merged export
    _set_lora_b(value, "default", seed=4)
    with torch.no_grad():
        value.score.weight.mul_(-2.0)
    export_pretrained(value, None, tmp_path / "value" / "model")
    stacked = PolicyBaseCritic.from_source(str(tmp_path / "value" / "model"), lora=lora)
    assert stacked.adapter_config.r == 4 + 2  # its adapter on the reward model's: one adapter of rank 6
    critic = stacked.attach(load_policy(tiny_dir, lora=lora))
    torch.testing.assert_close(response_values(critic, ids, mask, start), response_values(value, ids, mask, start),
                               rtol=1e-4, atol=1e-5)
    load_scalar_model(tiny_dir, seed=2).save_pretrained(tmp_path / "other")  # a base that is not the policy's
    elsewhere = load_scalar_model(str(tmp_path / "other"), lora=lora)
    export_pretrained(elsewhere, None, tmp_path / "elsewhere" / "model")
    with pytest.raises(ValueError, match="was trained on .*other, not on the policy's base"):
        PolicyBaseCritic.from_source(str(tmp_path / "elsewhere" / "model"), lora=lora).attach(
            load_policy(tiny_dir, lora=lora))
    source = PolicyBaseCritic.from_source(str(tmp_path / "rm" / "model"), lora=lora)
    source.adapter_state.pop(next(iter(source.adapter_state)))  # an adapter file without one of its tensors
    with pytest.raises(ValueError, match="does not fit the policy.*1 missing"):
        source.attach(load_policy(tiny_dir, lora=lora))


def test_stacked_adapter_computes_the_sum_of_the_two_deltas():
    from peft import LoraConfig

    gen = torch.Generator().manual_seed(0)
    lower = LoraConfig(r=2, lora_alpha=8, target_modules=["m.q", "m.k"])
    upper = LoraConfig(r=3, lora_alpha=32, target_modules=["m.q", "m.v"])
    upper.base_model_name_or_path = "/runs/reward/model"
    lower.base_model_name_or_path = "/models/base"
    shapes = {"m.q": (5, 7), "m.k": (4, 7), "m.v": (5, 6)}  # (out, in)

    def adapter(config):
        return {f"{name}.lora_{m}.weight": torch.randn(*(config.r, i) if m == "A" else (o, config.r), generator=gen)
                for name, (o, i) in shapes.items() if name in config.target_modules for m in "AB"}

    lower_state, upper_state = adapter(lower), adapter(upper)
    config, state = stacked_adapter(lower, lower_state, upper, upper_state)
    assert (config.r, config.lora_alpha, config.base_model_name_or_path) == (5, 5, "/models/base")
    assert config.target_modules == ["m.k", "m.q", "m.v"]
    for name, (out, inp) in shapes.items():
        expected = torch.zeros(out, inp)
        for cfg, tensors in ((lower, lower_state), (upper, upper_state)):
            if name in cfg.target_modules:  # s·B·A, s = alpha / r
                expected += cfg.lora_alpha / cfg.r * tensors[f"{name}.lora_B.weight"] @ tensors[f"{name}.lora_A.weight"]
        got = config.lora_alpha / config.r * state[f"{name}.lora_B.weight"] @ state[f"{name}.lora_A.weight"]
        torch.testing.assert_close(got, expected, **TOL)
    del upper_state["m.v.lora_B.weight"]
    with pytest.raises(ValueError, match="m.v has lora_A without lora_B"):
        stacked_adapter(lower, lower_state, upper, upper_state)


def _shared_ppo(tiny_dir, tokenizer) -> PPOModule:
    L.seed_everything(3)
    return PPOModule(load_policy(tiny_dir, lora=LORA), None,
                     PolicyBaseCritic.from_source(tiny_dir, head="normal", lora=LORA),
                     load_scalar_model(tiny_dir, frozen=True, seed=1), tokenizer,
                     ppo={"ppo_epochs": 1, "num_minibatches": 2, "num_sample_prompts": 0,
                          "log_samples_every_n_steps": 0, "generation": {"max_new_tokens": 4}},
                     policy_optim={"lr": 1e-2}, critic_optim={"lr": 1e-2})


def test_ppo_with_the_critic_on_the_policys_base_checkpoints_resumes_and_exports(tiny_dir, tokenizer, hh_file,
                                                                                  tmp_path):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    full = fit_ppo_with_checkpoints(_shared_ppo(tiny_dir, tokenizer), tokenizer, hh_file, tmp_path / "full",
                                    iterations=2)
    assert full.critic.model is full.policy.model
    assert full.trunk is not None and any({"policy", "critic"} <= set(names) for names, _ in full.trunk.groups)
    for adapter in ("default", CRITIC_ADAPTER):  # both adapters trained
        assert any(p.abs().max() > 0 for n, p in full.policy.named_parameters()
                   if ".lora_B." in n and adapter_name_of(n) == adapter), adapter

    cut = fit_ppo_with_checkpoints(_shared_ppo(tiny_dir, tokenizer), tokenizer, hh_file, tmp_path / "cut",
                                   iterations=1)
    last = tmp_path / "cut" / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(last, weights_only=True)
    policy_keys = {f"policy.{n}" for n, p in cut.policy.named_parameters() if adapter_name_of(n) == "default"}
    critic_keys = {f"critic.{n}" for n, p in cut.critic.named_parameters()
                   if adapter_name_of(n) == CRITIC_ADAPTER or n.startswith("score.")}
    assert set(checkpoint["state_dict"]) == policy_keys | critic_keys  # each adapter once, no base weight
    assert len(checkpoint["optimizer_states"]) == 2
    resumed = fit_ppo_with_checkpoints(_shared_ppo(tiny_dir, tokenizer), tokenizer, hh_file, tmp_path / "cut",
                                       iterations=2, ckpt_path=str(last))
    got = dict(resumed.critic.named_parameters())
    for name, param in full.critic.named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(got[name], param, **TOL, msg=name)

    export_pretrained(full.policy, tokenizer, tmp_path / "export" / "model")
    export_pretrained(full.critic, tokenizer, tmp_path / "export" / "model_critic")
    ids, mask, start = _sequences()
    with torch.no_grad():
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / "export" / "model")
        torch.testing.assert_close(response_logprobs(merged, ids, mask, start),
                                   response_logprobs(full.policy, ids, mask, start), rtol=1e-4, atol=1e-5)
        critic = AutoModelForSequenceClassification.from_pretrained(tmp_path / "export" / "model_critic")
        torch.testing.assert_close(response_values(critic, ids, mask, start),
                                   response_values(full.critic, ids, mask, start), rtol=1e-4, atol=1e-5)
    # the exported critic adapter is the critic's, and a new run's critic starts from it
    again = PolicyBaseCritic.from_source(str(tmp_path / "export" / "model_critic"), lora=LORA)
    restarted = again.attach(load_policy(tiny_dir, lora=LORA))
    with torch.no_grad():
        torch.testing.assert_close(response_values(restarted, ids, mask, start),
                                   response_values(full.critic, ids, mask, start), rtol=1e-4, atol=1e-5)


def test_critic_warmup_trains_the_critics_adapter_on_the_policys_base(tiny_dir, tokenizer, hh_file, tmp_path):
    """During ``ppo.critic_warmup_iterations`` the policy's own adapter stays put while the critic's adapter (which
    lives in the policy's module) and head train: dropping the policy's gradients must not drop the critic's."""
    L.seed_everything(0)
    policy = load_policy(tiny_dir, lora=LORA)
    module = PPOModule(policy, None, PolicyBaseCritic.from_source(tiny_dir, lora=LORA), load_scalar_model(
                       tiny_dir, frozen=True, seed=1), tokenizer,
                       ppo={"ppo_epochs": 2, "critic_warmup_iterations": 1, "num_sample_prompts": 0,
                            "log_samples_every_n_steps": 0, "generation": {"max_new_tokens": 4}},
                       policy_optim={"lr": 1e-2}, critic_optim={"lr": 1e-2})
    adapters = {name: {key: p.detach().clone() for key, p in module.policy.named_parameters()
                       if p.requires_grad and adapter_name_of(key) == name} for name in ("default", CRITIC_ADAPTER)}
    assert all(adapters.values())
    head = {key: p.detach().clone() for key, p in module.critic.score.named_parameters()}
    fit_ppo_with_checkpoints(module, tokenizer, hh_file, tmp_path, iterations=1)
    changed = {name: [key for key, p in module.policy.named_parameters() if key in before
                      and not torch.equal(p, before[key])] for name, before in adapters.items()}
    assert changed["default"] == []  # the policy is frozen in the warm-up
    assert changed[CRITIC_ADAPTER], "the critic's adapter did not train during the warm-up"
    assert any(not torch.equal(p, head[key]) for key, p in module.critic.score.named_parameters())
