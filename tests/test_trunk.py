"""The shared frozen trunk: which networks share it, and that using it changes no result."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from rlhf_lightning.data import PromptDataModule
from rlhf_lightning.models import load_policy, load_reference, load_scalar_model
from rlhf_lightning.models.forward import response_logprobs, response_values, sequence_scores
from rlhf_lightning.models.trunk import SharedTrunk, common_depth, frozen_depth
from rlhf_lightning.modules import PPOModule


def _networks(tiny_dir, trainable_layers=1):
    return {"policy": load_policy(tiny_dir, trainable_layers=trainable_layers), "ref_policy": load_reference(tiny_dir),
            "critic": load_scalar_model(tiny_dir, trainable_layers=trainable_layers),
            "reward_model": load_scalar_model(tiny_dir, frozen=True, seed=1)}


def _batch(tokenizer, n=3):
    texts = ["Hello there, how are you?", "A much longer sentence about the moon and the stars tonight.", "Hi"][:n]
    tokenizer.padding_side = "left"
    enc = tokenizer(texts, return_tensors="pt", padding=True)
    return enc["input_ids"], enc["attention_mask"]


def test_depth_counts_frozen_identical_blocks(tiny_dir):
    nets = _networks(tiny_dir)
    assert frozen_depth(nets["policy"]) == 1 and frozen_depth(nets["ref_policy"]) == 2
    assert common_depth(list(nets.values())) == 1  # the top block always runs in each network
    # Trainable embeddings (trainable_layers=None): nothing is frozen, nothing is shared.
    assert common_depth([load_policy(tiny_dir), load_reference(tiny_dir)]) == 0
    # A frozen block that differs in one weight ends the shared prefix.
    other = load_reference(tiny_dir)
    with torch.no_grad():
        other.model.layers[0].mlp.up_proj.weight[0, 0] += 1e-3
    assert common_depth([nets["policy"], other]) == 0


def test_groups_fall_back_to_pairs(tiny_dir, tokenizer):
    nets = _networks(tiny_dir)
    with torch.no_grad():  # the reward model and critic no longer match the policy's base
        for name in ("critic", "reward_model"):
            nets[name].model.layers[0].self_attn.q_proj.weight.mul_(2)
    trunk = SharedTrunk(nets, groups=[["policy", "ref_policy"], ["critic", "reward_model"]])
    assert [names for names, _ in trunk.groups] == [["policy", "ref_policy"], ["critic", "reward_model"]]
    ids, mask = _batch(tokenizer)
    out = trunk.compute(ids, mask)
    assert out["policy"].hidden is out["ref_policy"].hidden
    assert not torch.allclose(out["policy"].hidden, out["critic"].hidden)


def test_forwards_on_the_trunk_equal_full_forwards(tiny_dir, tokenizer):
    nets = _networks(tiny_dir)
    trunk = SharedTrunk(nets)
    assert trunk.groups == [(list(nets), 1)]
    ids, mask = _batch(tokenizer)
    out = trunk.compute(ids, mask)
    start = 4
    with torch.no_grad():
        for name in ("policy", "ref_policy"):
            torch.testing.assert_close(response_logprobs(nets[name], ids, mask, start, trunk=out[name]),
                                       response_logprobs(nets[name], ids, mask, start), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(response_values(nets["critic"], ids, mask, start, trunk=out["critic"]),
                                   response_values(nets["critic"], ids, mask, start), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(sequence_scores(nets["reward_model"], ids, mask, trunk=out["reward_model"]),
                                   sequence_scores(nets["reward_model"], ids, mask), rtol=1e-5, atol=1e-5)
    # Gradients reach the top block only, and match the full forward's.
    grads = []
    for trunk_out in (out["policy"], None):
        nets["policy"].zero_grad(set_to_none=True)
        response_logprobs(nets["policy"], ids, mask, start, trunk=trunk_out).sum().backward()
        grads.append({n: p.grad.clone() for n, p in nets["policy"].named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and all(".layers.1." in n or "norm" in n for n in grads[0])
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("num_minibatches", [1, 2])
def test_ppo_with_and_without_the_trunk_trains_the_same(tmp_path, tiny_dir, tokenizer, hh_file, num_minibatches):
    """Two PPO iterations with ppo.share_trunk on and off: same samples, same weights after."""
    results = []
    for share in (True, False):
        L.seed_everything(0)
        nets = _networks(tiny_dir)
        dm = PromptDataModule(tokenizer, str(hh_file), batch_size=4, max_prompt_length=48)
        module = PPOModule(nets["policy"], nets["ref_policy"], nets["critic"], nets["reward_model"], tokenizer,
                           ppo={"ppo_epochs": 2, "num_minibatches": num_minibatches, "share_trunk": share,
                                "num_sample_prompts": 0, "log_samples_every_n_steps": 0,
                                "generation": {"max_new_tokens": 6}},
                           policy_optim={"lr": 1e-3}, critic_optim={"lr": 1e-3})
        trainer = L.Trainer(accelerator="cpu", max_steps=2 * module.optimizer_steps_per_iteration, max_epochs=-1,
                            logger=False, enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False, limit_val_batches=0, default_root_dir=tmp_path)
        trainer.fit(module, datamodule=dm)
        assert bool(module.trunk) is share
        results.append({k: v.clone() for k, v in module.state_dict().items() if k.startswith(("policy.", "critic."))})
    shared, full = results
    initial = _networks(tiny_dir)
    moved = [k for k in shared
             if not torch.equal(shared[k], initial[k.split(".", 1)[0]].state_dict()[k.split(".", 1)[1]])]
    assert moved, "PPO did not train"
    for key in shared:
        torch.testing.assert_close(shared[key], full[key], rtol=1e-4, atol=1e-5, msg=key)


def test_value_module_with_and_without_the_trunk_trains_the_same(tmp_path, tiny_dir, tokenizer, hh_file):
    from rlhf_lightning.modules import ValueModule

    results = []
    for share in (True, False):
        L.seed_everything(0)
        nets = _networks(tiny_dir)
        module = ValueModule(load_reference(tiny_dir), nets["critic"], nets["reward_model"], tokenizer,
                             ref_policy=nets["ref_policy"],
                             value={"share_trunk": share, "lam": 0.95, "generation": {"max_new_tokens": 6}},
                             critic_optim={"lr": 1e-3})
        trainer = L.Trainer(accelerator="cpu", max_steps=2, max_epochs=-1, logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                            default_root_dir=tmp_path)
        trainer.fit(module, datamodule=PromptDataModule(tokenizer, str(hh_file), batch_size=4, max_prompt_length=48))
        assert bool(module.trunk) is share
        results.append({k: v.clone() for k, v in module.critic.state_dict().items()})
    for key in results[0]:
        torch.testing.assert_close(results[0][key], results[1][key], rtol=1e-4, atol=1e-5, msg=key)
