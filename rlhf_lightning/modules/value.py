"""ValueModule: warm up the critic V(s_t) on rollouts of a frozen policy before PPO."""

from __future__ import annotations

import lightning as L
import torch
from torch import nn

from rlhf_lightning.algorithms.advantages import gae, td_targets
from rlhf_lightning.algorithms.kl import compute_rewards
from rlhf_lightning.algorithms.losses import value_loss
from rlhf_lightning.algorithms.ops import explained_variance
from rlhf_lightning.config.schema import OptimConfig, ValueConfig, as_config
from rlhf_lightning.models.forward import packs_by_default, response_values
from rlhf_lightning.models.lora import log_network_memory
from rlhf_lightning.models.trunk import SharedTrunk
from rlhf_lightning.modules.common import (
    batch_counts,
    check_lora_strategy,
    drop_frozen_lora_weights,
    export_trained,
    find_shared_trunk,
    fused_adamw_allowed,
    make_optimizer,
    scheduler_total_steps,
    sum_over_ranks,
)
from rlhf_lightning.rollout.experience import make_experience
from rlhf_lightning.rollout.sampler import generate, prompt_noise, run_seed
from rlhf_lightning.training.fsdp2 import shard_networks


class ValueModule(L.LightningModule):
    """Critic regression on the frozen policy's rollouts.

    Each training step samples responses to a batch of prompts from the frozen ``policy``,
    scores them with the reward model, forms per-token rewards r_t = −β·KL_t (+ score at the last
    token), and minimises 0.5·masked-mean (V(s_t) − target_t)², where the target is the TD target
    r_t + γ·V(s_{t+1}) (V = 0 after the last token; Sutton & Barto eq. 6.2) computed from the same
    forward and detached, or the λ-return when ``lam`` > 0 (Schulman et al. 2016). Under data parallelism the
    mean is over the tokens of every rank's batch, and each response's sampling noise is keyed by (step,
    prompt): N processes with B/N prompts train as one process with B.

    Logs ``value/loss``, ``value/explained_var``, ``objective/score`` and ``response/length``; writes
    the critic to ``export_dir`` at the end of fit, which :class:`PPOModule` loads as its critic.

    Args:
        policy: frozen causal LM that generates the rollouts.
        critic: ``AutoModelForSequenceClassification`` (one label) to train.
        reward_model: frozen scorer. ref_policy: frozen reference for the KL (``None``: the policy
            itself, KL = 0).
        tokenizer, value (:class:`ValueConfig` or dict), critic_optim (:class:`OptimConfig` or dict), export_dir.
    """

    def __init__(self, policy: nn.Module, critic: nn.Module, reward_model: nn.Module, tokenizer,
                 ref_policy: nn.Module | None = None, value: ValueConfig | dict | None = None,
                 critic_optim: OptimConfig | dict | None = None, export_dir: str | None = None):
        super().__init__()
        self.strict_loading = False
        self.policy, self.critic, self.reward_model, self.ref_policy = policy, critic, reward_model, ref_policy
        for frozen in (policy, reward_model, ref_policy):
            if frozen is not None:
                frozen.requires_grad_(False).eval()
        self.tokenizer = tokenizer
        self.value = as_config(ValueConfig, value, "value")
        self.critic_optim = as_config(OptimConfig, critic_optim, "critic_optim")
        self.export_dir = export_dir
        self.save_hyperparameters(ignore=["policy", "critic", "reward_model", "ref_policy", "tokenizer"])
        self.trunk: SharedTrunk | None = None  # set in on_fit_start
        self.sampling_seed = run_seed()  # the rollouts' noise: keyed by (step, prompt), not by rank
        self.packed = bool(self.value.packed_sequences)  # value.packed_sequences resolved (auto) in on_fit_start

    def setup(self, stage: str) -> None:
        """Refuse a LoRA critic under FSDP or DeepSpeed (:func:`~rlhf_lightning.modules.common.check_lora_strategy`)."""
        check_lora_strategy(self.trainer.strategy, {"critic": self.critic})

    def configure_model(self) -> None:
        """Under FSDP2 (``trainer=fsdp``), shard the critic, and the frozen networks unless
        ``trainer.strategy.frozen_networks=replicate`` (:func:`~rlhf_lightning.training.fsdp2.shard_networks`)."""
        shard_networks(self, trained=("critic",), frozen=("policy", "ref_policy", "reward_model"))

    def on_fit_start(self) -> None:
        """Log each network's size; find the frozen lower blocks the networks share (``value.share_trunk``)."""
        log_network_memory({"policy": self.policy, "critic": self.critic, "reward model": self.reward_model,
                            "reference": self.ref_policy})
        self.trunk = find_shared_trunk(self, self.value.share_trunk)
        self.sampling_seed = run_seed()
        self.packed = self.value.packed_sequences if self.value.packed_sequences is not None else \
            packs_by_default(self.critic)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        cfg = self.value
        # 1. Rollout of the frozen policy, scored at the last token; each response's noise keyed by (step, prompt).
        noise = prompt_noise(self.sampling_seed, batch.get("prompt_index"), cfg.generation.max_new_tokens,
                             self.global_step)
        score_eos = int(self.tokenizer.eos_token_id) if cfg.generation.score_with_eos else None
        ro = generate(self.policy, batch["input_ids"], batch["attention_mask"], cfg.generation,
                      self.tokenizer.eos_token_id, self.tokenizer.pad_token_id, noise=noise,
                      trunk_depth=self.trunk.depth_of("policy") if self.trunk is not None else None,
                      score_eos_token_id=score_eos)
        with_kl = self.ref_policy is not None and cfg.kl_coef > 0
        exp = make_experience(ro, self.reward_model, self.policy if with_kl else None,
                              self.ref_policy if with_kl else None, None, cfg.generation.temperature,
                              cfg.generation.missing_eos_penalty, trunk=self.trunk, score_eos_token_id=score_eos,
                              packed=self.packed)
        mask = ro.response_mask
        # 2. Per-token rewards: -β·KL_t, plus the score at the last token (KL 0 without a reference).
        logprobs = exp.logprobs if with_kl else torch.zeros_like(mask, dtype=torch.float32)
        ref_logprobs = exp.ref_logprobs if with_kl else logprobs
        rewards, kl = compute_rewards(exp.scores, logprobs, ref_logprobs, mask, cfg.kl_coef, cfg.kl_estimator)
        # 3. V(s_t) with gradient; the target from the same values, detached.
        values = response_values(self.critic, ro.input_ids, ro.attention_mask, ro.response_start,
                                 trunk=exp.trunks.critic, packed=self.packed)  # (B, R)
        if cfg.lam == 0:
            targets = td_targets(rewards, values, mask, cfg.gamma)
        else:
            _, targets = gae(rewards, values.detach(), mask, cfg.gamma, cfg.lam)
        # The mean over every rank's tokens (this rank's share: DDP averages the ranks' gradients).
        old_values = values.detach() if cfg.cliprange_value is not None else None
        loss, _ = value_loss(values, targets, mask, old_values, cfg.cliprange_value, counts=batch_counts(self, mask))
        # 4. Logging (the optimizer step is Lightning's); every metric is the whole batch's (all ranks).
        batch_size = mask.shape[0]
        self.log_dict({
            "value/loss": loss.detach(),
            "value/explained_var": explained_variance(values.detach(), targets, mask, sum_over_ranks(self)),
            "objective/score": exp.scores.mean(),
            "objective/kl": (kl * mask).sum(1).mean(),
            "response/length": mask.sum(1).float().mean(),
        }, on_step=True, batch_size=batch_size, sync_dist=True)
        self.log("loss", loss.detach(), prog_bar=True, logger=False, batch_size=batch_size, sync_dist=True)
        return loss

    def configure_optimizers(self):
        """AdamW with ``critic_optim``'s warm-up and schedule, stepped once per optimizer step
        (:func:`~rlhf_lightning.modules.common.make_optimizer`); fused unless 16-mixed clipping forbids it
        (:func:`~rlhf_lightning.modules.common.fused_adamw_allowed`)."""
        trainer = self._trainer
        decays = trainer is not None and self.critic_optim.scheduler != "constant"
        total = scheduler_total_steps(trainer) if decays else None
        optimizer, scheduler = make_optimizer(self.critic.parameters(), self.critic_optim, total,
                                              fused=fused_adamw_allowed(trainer))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Keep only the critic (its adapters and head only when it is a LoRA model): the frozen policy,
        reference and reward model, and a LoRA critic's base weights, are reloaded."""
        state = checkpoint["state_dict"]
        for key in [k for k in state if not k.startswith("critic.")]:
            del state[key]
        drop_frozen_lora_weights(state, {"critic": self.critic})

    def on_train_end(self) -> None:
        export_trained(self, self.critic, self.tokenizer, self.export_dir)  # every rank: gathered under FSDP2
