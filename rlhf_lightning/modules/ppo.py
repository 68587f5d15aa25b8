"""PPOModule: the policy and the critic trained together on sampled responses (RLHF with PPO)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

import lightning as L
import torch
from torch import nn

from rlhf_lightning.algorithms.advantages import (
    gae,
    group_advantages,
    reinforce_pp_advantages,
    reinforce_pp_baseline_advantages,
    rloo_advantages,
    sequence_to_token_advantages,
)
from rlhf_lightning.algorithms.kl import compute_rewards, make_kl_controller
from rlhf_lightning.algorithms.losses import kl_loss, ppo_policy_loss, tis_weights, value_loss
from rlhf_lightning.algorithms.ops import explained_variance, masked_whiten, token_mean
from rlhf_lightning.config.schema import EvalConfig, OptimConfig, PPOConfig, as_config
from rlhf_lightning.evaluation.diagnostics import check_alarms, rollout_diagnostics
from rlhf_lightning.evaluation.heldout import HeldOutEvaluation, write_samples
from rlhf_lightning.evaluation.judges import load_judges
from rlhf_lightning.models.builders import PolicyBaseCritic
from rlhf_lightning.models.forward import packs_by_default, response_logprobs, response_values
from rlhf_lightning.models.lora import has_lora, log_network_memory, own_parameters
from rlhf_lightning.models.trunk import SharedTrunk, Trunks
from rlhf_lightning.modules.common import (
    batch_counts,
    check_lora_strategy,
    drop_frozen_lora_weights,
    export_trained,
    find_shared_trunk,
    gather_rows,
    make_grouped_optimizer,
    make_optimizer,
    scheduler_total_steps,
    sum_over_ranks,
)
from rlhf_lightning.rewards.functions import load_reward_functions
from rlhf_lightning.rollout.agent import load_environment_factory, run_episodes, sample_turn
from rlhf_lightning.rollout.experience import (
    Experience,
    adapter_off_logprobs,
    function_rewards,
    logprob_diff,
    make_experience,
)
from rlhf_lightning.rollout.sampler import Rollout, generate, prompt_noise, run_seed, select_rows, stack_rollouts
from rlhf_lightning.training.fsdp2 import shard_networks

log = logging.getLogger(__name__)

#: Keys of the frozen networks, left out of checkpoints (they are reloaded from their sources).
FROZEN_PREFIXES = ("ref_policy.", "reward_model.")


def _as_list(value) -> list:
    """``LightningModule.optimizers()``/``lr_schedulers()`` return a bare object when there is one."""
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def configure_deepspeed_clipping(strategy, ppo: PPOConfig) -> None:
    """Make a DeepSpeed strategy clip PPO's gradients at ``ppo.max_grad_norm``; other strategies: nothing.

    Under DeepSpeed, ``LightningModule.clip_gradients`` does nothing (the precision plugin leaves
    clipping to DeepSpeed, which clips one global norm inside ``engine.step()`` at its config's
    ``gradient_clipping``), and Lightning refuses ``Trainer(gradient_clip_val=...)`` under manual
    optimization, so the value goes into the strategy's DeepSpeed config before the engine is built
    (Lightning only fills ``gradient_clipping`` from the trainer when the key is absent). A config that
    already sets ``gradient_clipping`` (a user's DeepSpeed JSON) is kept; a value different from
    ``ppo.max_grad_norm`` is logged as a warning. ``max_grad_norm`` None writes 0.0 (DeepSpeed: off).

    Args:
        strategy: the trainer's strategy; only a ``lightning.pytorch.strategies.DeepSpeedStrategy``
            (``config`` a dict) is changed.
        ppo: the module's :class:`PPOConfig`.

    Raises:
        ValueError: a DeepSpeed strategy with ``ppo.joint_optimizer`` false or
            ``ppo.critic_warmup_iterations`` > 0.
    """
    from lightning.pytorch.strategies import DeepSpeedStrategy

    if not isinstance(strategy, DeepSpeedStrategy):
        return
    if not ppo.joint_optimizer:
        raise ValueError("DeepSpeedStrategy takes one optimizer and PPO has two (policy, critic): "
                         "set ppo.joint_optimizer=true (one optimizer, two parameter groups)")
    if ppo.critic_warmup_iterations:
        raise ValueError("ppo.critic_warmup_iterations needs plain gradients; DeepSpeed keeps its own: "
                         "set ppo.critic_warmup_iterations=0 or warm the critic up with stage=value")
    config = strategy.config
    if not isinstance(config, dict):
        return
    wanted = float(ppo.max_grad_norm or 0.0)
    if "gradient_clipping" not in config:
        config["gradient_clipping"] = wanted
    elif float(config["gradient_clipping"]) != wanted:
        log.warning("the DeepSpeed config sets gradient_clipping=%s; it is used instead of ppo.max_grad_norm=%s",
                    config["gradient_clipping"], ppo.max_grad_norm)


def check_ppo_precision(precision_plugin) -> None:
    """Refuse a precision plugin with a ``GradScaler`` (``trainer.precision=16-mixed`` on GPUs, FSDP's too).

    PPO optimizes manually: its ``clip_gradients`` runs after ``manual_backward`` on gradients that are
    still multiplied by the loss scale (Lightning's ``MixedPrecision`` unscales only inside
    ``optimizer.step``), so ``ppo.max_grad_norm`` would clip scaled norms; and with fused AdamW (the
    default) Lightning raises "does not allow for gradient clipping because it performs unscaling of
    gradients internally" (``MixedPrecision.clip_gradients``, lightning/pytorch/plugins/precision/amp.py).
    DeepSpeed's precision plugin has no ``scaler`` (DeepSpeed scales, unscales and clips in its engine)
    and passes. The same rule as :func:`rlhf_lightning.training.validate.validate_config` on ``trainer.precision``.

    Raises:
        ConfigError: the plugin has a ``scaler``; one line naming ``trainer.precision=bf16-mixed``.
    """
    from rlhf_lightning.training.validate import PPO_FP16_ERROR, ConfigError

    if getattr(precision_plugin, "scaler", None) is not None:
        raise ConfigError(PPO_FP16_ERROR.format(precision=getattr(precision_plugin, "precision", "16-mixed")))


class PPOModule(L.LightningModule):
    """PPO for language models, one iteration per ``training_step`` (manual optimization).

    Each iteration, for a batch of B prompts (``input_ids``/``attention_mask`` (B, P),
    left-padded, from :class:`~rlhf_lightning.data.PromptCollator`), runs four phases:

    1. :meth:`collect`: sample responses (KV-cached decoding, cut after EOS), score them with the
       reward model (minus a missing-EOS penalty), and compute the old log-probabilities, the
       reference log-probabilities and the values without autograd →
       :class:`~rlhf_lightning.rollout.experience.Experience`;
    2. :meth:`compute_advantages`: per-token rewards −β·KL_t plus the score at the last token
       (:mod:`rlhf_lightning.algorithms.kl`), GAE advantages (whitened) and returns;
    3. :meth:`update`: ``ppo_epochs`` passes over minibatches: clipped policy loss and clipped value
       loss, one ``manual_backward``, ``clip_gradients`` per optimizer, then the policy and the
       critic optimizers both stepped (``ppo.joint_optimizer``: one optimizer with a policy and a
       critic parameter group), then the LR schedulers; then the adaptive KL controller's update;
    4. :meth:`log_iteration`: metrics (with the reward-hacking ``diagnostics/*`` and the ``ppo.alarms``
       warnings, :mod:`rlhf_lightning.evaluation.diagnostics`) and sample generations.

    With a critic-free ``ppo.adv_estimator`` (GRPO, RLOO, REINFORCE++, ...) there is no critic: phase
    2 takes its baseline from the other responses to the same prompt (``ppo.num_generations``) or from
    the batch, and phase 3 steps the policy's optimizer alone.

    With ``ppo.agent`` (tools or an environment) phase 1 samples multi-turn episodes
    (:func:`~rlhf_lightning.rollout.agent.run_episodes`) and every later phase reads the rollout's ``loss_mask``
    (the policy's own tokens) where a single-turn rollout has its response mask.

    Args:
        policy: causal LM to train. ref_policy: frozen copy of its initial weights; ``None`` when the policy is a
            LoRA model (:mod:`rlhf_lightning.models.lora`): the reference is then the policy with its
            adapters switched off (no second copy).
        critic: ``AutoModelForSequenceClassification`` (one label) giving V(s_t) at every token
            — the ValueModule's network, loaded from its export; ``None`` with a critic-free estimator; a
            :class:`~rlhf_lightning.models.builders.PolicyBaseCritic` (``critic.share_base=true``) is built here as a
            second adapter on the LoRA policy's base.
        reward_model: frozen ``AutoModelForSequenceClassification`` (one label); ``None`` when the
            reward comes from ``reward_functions`` alone.
        reward_functions: ``[{"fn": "module.function", "weight": w}, ...]`` with TRL's signature
            (:func:`~rlhf_lightning.rewards.functions.load_reward_functions`), added to the reward
            model's score (weighted sum), each logged as ``reward/<name>``.
        tokenizer: for EOS/pad ids, decoding samples, and the export.
        ppo: :class:`PPOConfig` or dict. policy_optim, critic_optim: :class:`OptimConfig` or dict.
        export_dir: where the trained policy is written at the end of fit (critic beside it in
            ``<export_dir>_critic``); samples_path: JSON-lines file for sample generations.
        eval: :class:`~rlhf_lightning.config.schema.EvalConfig` or dict: the held-out evaluation's judges and
            schedule (:class:`~rlhf_lightning.evaluation.heldout.HeldOutEvaluation`, with ``ppo``'s
            ``num_sample_prompts``, ``eval_seed``, ``eval_greedy`` and ``kl_estimator``).
    """

    def __init__(self, policy: nn.Module, ref_policy: nn.Module | None, critic: nn.Module | None,
                 reward_model: nn.Module | None, tokenizer, ppo: PPOConfig | dict | None = None,
                 policy_optim: OptimConfig | dict | None = None, critic_optim: OptimConfig | dict | None = None,
                 export_dir: str | None = None, samples_path: str | None = None,
                 reward_functions: list[dict] | None = None, eval: EvalConfig | dict | None = None):
        super().__init__()
        self.automatic_optimization = False
        self.strict_loading = False  # frozen networks are not in checkpoints
        if isinstance(critic, PolicyBaseCritic):
            critic = critic.attach(policy)  # critic.share_base: a second adapter on the policy's base
        self.policy, self.ref_policy, self.critic, self.reward_model = policy, ref_policy, critic, reward_model
        if ref_policy is None and not has_lora(policy):
            raise ValueError("PPO needs a reference: pass ref_policy, or a LoRA policy (model.lora.r) whose "
                             "adapters switched off are the reference")
        self.tokenizer = tokenizer
        self.ppo = as_config(PPOConfig, ppo, "ppo")
        if self.ppo.uses_critic and critic is None:
            raise ValueError(f"ppo.adv_estimator={self.ppo.adv_estimator} needs a critic (got none)")
        if not self.ppo.uses_critic and critic is not None:
            raise ValueError(f"ppo.adv_estimator={self.ppo.adv_estimator} is critic-free: pass critic=None "
                             "(the configs load none for it)")
        self.reward_functions = load_reward_functions(reward_functions) if reward_functions else []
        #: one environment per episode (ppo.agent), or None: one response per prompt
        self.make_environment = load_environment_factory(self.ppo.agent) if self.ppo.agent.enabled else None
        if reward_model is None and not self.reward_functions and self.ppo.agent.environment_factory is None:
            raise ValueError("PPO needs a reward: a reward model (reward_model_path), reward functions "
                             "(reward.functions), an environment (ppo.agent.environment_factory), or some of them")
        self.policy_optim = as_config(OptimConfig, policy_optim, "policy_optim")
        self.critic_optim = as_config(OptimConfig, critic_optim, "critic_optim")
        self.export_dir, self.samples_path = export_dir, samples_path
        eval_config = as_config(EvalConfig, eval, "eval")
        gen = self.ppo.generation
        self.heldout = HeldOutEvaluation(self._eval_collect, self.ppo.num_sample_prompts, self.ppo.kl_estimator,
                                         self.ppo.eval_seed, self.ppo.eval_greedy, samples_path,
                                         eval_config.every_n_iterations, load_judges(eval_config),
                                         int(tokenizer.eos_token_id) if gen.score_with_eos else None)
        self.kl_ctl = make_kl_controller(self.ppo.kl_coef, self.ppo.adaptive_kl, self.ppo.kl_target,
                                         self.ppo.kl_horizon)
        self.save_hyperparameters(ignore=["policy", "ref_policy", "critic", "reward_model", "tokenizer"])
        self.trunk: SharedTrunk | None = None  # set in on_fit_start
        self._alarms_fired: set[str] = set()  # ppo.alarms kinds that warned already
        self.engine = None  # the vLLM rollout engine (ppo.generation.backend=vllm), built in on_fit_start
        self.sampling_seed = run_seed()  # the sampling noise's seed (responses keyed by prompt, not by rank)
        self.packed = bool(self.ppo.packed_sequences)  # ppo.packed_sequences resolved (auto) in on_fit_start

    def configure_model(self) -> None:
        """Under FSDP2 (``trainer=fsdp``), shard the policy and the critic, and the frozen networks unless
        ``trainer.strategy.frozen_networks=replicate`` (:func:`~rlhf_lightning.training.fsdp2.shard_networks`)."""
        shard_networks(self, trained=("policy", "critic"), frozen=("ref_policy", "reward_model"))

    def on_fit_start(self) -> None:
        """Log each network's size; find the frozen lower blocks the four networks share (``ppo.share_trunk``);
        with ``ppo.generation.backend=vllm``, build this rank's vLLM engine from the policy (:meth:`build_engine`)."""
        log_network_memory({"policy": self.policy, "reference": self.ref_policy, "critic": self.critic,
                            "reward model": self.reward_model},
                           aliases={"reference": "the LoRA policy with its adapters off"}
                           if self.ref_policy is None else None)
        self.trunk = find_shared_trunk(self, self.ppo.share_trunk)
        self.sampling_seed = run_seed()
        self.packed = self.ppo.packed_sequences if self.ppo.packed_sequences is not None else \
            packs_by_default(self.policy)
        if self.ppo.generation.backend == "vllm" and self.engine is None:
            self.engine = self.build_engine()

    def on_fit_end(self) -> None:
        if self.engine is not None:
            self.engine.close()
            self.engine = None

    def build_engine(self):
        """This rank's :class:`~rlhf_lightning.rollout.vllm_engine.VLLMEngine` on its device, from the policy's config,
        dtype and weights; ``max_model_len`` from ``ppo.generation.vllm.max_model_len``, else the datamodule's
        ``max_prompt_length`` + ``max_new_tokens`` (single-turn rollouts), else the model's
        ``max_position_embeddings``.

        Raises:
            ImportError: vLLM is not installed (one line naming the extra).
            ValueError: a sharded strategy (FSDP, DeepSpeed): the engine needs each rank's whole policy.
        """
        from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy

        from rlhf_lightning.rollout.vllm_engine import VLLMEngine

        if isinstance(self.trainer.strategy, (FSDPStrategy, ModelParallelStrategy, DeepSpeedStrategy)):
            raise ValueError("ppo.generation.backend=vllm needs each rank's whole policy: use a single device or "
                             "DDP (trainer=ddp), not FSDP or DeepSpeed")
        gen = self.ppo.generation
        max_len = gen.vllm.max_model_len
        if max_len is None:
            prompt = getattr(getattr(self.trainer, "datamodule", None), "max_prompt_length", None)
            max_len = (prompt + gen.max_new_tokens if prompt is not None and not self.ppo.agent.enabled
                       else self.policy.config.max_position_embeddings)  # multi-turn: reset() may change the prompt
        return VLLMEngine(self.policy, self.tokenizer, gen.vllm, gen, max_model_len=max_len, rank=self.global_rank,
                          world_size=self.trainer.world_size, device=self.device)

    def sync_engine(self, weights=None) -> None:
        """Load the policy's current weights into the vLLM engine (no engine: nothing).

        Args:
            weights: ``(name, tensor)`` pairs with the policy's Hugging Face names (merged adapter weights);
                ``None``: the policy's trainable parameters (all of them when the engine released its weights
                in sleep mode), :func:`~rlhf_lightning.rollout.vllm_engine.policy_weights`.
        """
        if self.engine is None:
            return
        from rlhf_lightning.rollout.vllm_engine import policy_weights

        self.engine.load_weights(weights if weights is not None else
                                 policy_weights(self.policy, trainable_only=not self.engine.asleep))

    @property
    def optimizer_steps_per_iteration(self) -> int:
        """Optimizer steps per iteration, as Lightning's ``global_step`` counts them (``ppo``'s
        :attr:`~rlhf_lightning.config.schema.PPOConfig.optimizer_steps_per_iteration`)."""
        return self.ppo.optimizer_steps_per_iteration

    @property
    def iteration(self) -> int:
        """PPO iterations completed (rollout batches trained on)."""
        return self.global_step // self.optimizer_steps_per_iteration

    # ------------------------------------------------------------------ one iteration
    def training_step(self, batch: dict, batch_idx: int) -> None:
        """One PPO iteration on a batch of prompts: collect → compute_advantages → update → log.

        Args:
            batch: ``input_ids`` and ``attention_mask``, (B, P) int64, left-padded.
            batch_idx: unused.

        Raises:
            ValueError: B is not a multiple of ``ppo.num_minibatches``.
        """
        batch_size = batch["input_ids"].shape[0]
        if batch_size % self.ppo.num_minibatches:
            raise ValueError(f"prompt batch size {batch_size} is not divisible by "
                             f"ppo.num_minibatches={self.ppo.num_minibatches}")
        exp = self.collect(batch["input_ids"], batch["attention_mask"], batch.get("prompt_index"))
        exp = self.compute_advantages(exp)
        if self.engine is not None:
            self.engine.sleep()  # with ppo.generation.vllm.enable_sleep_mode: its memory is free for the update
        stats = self.update(exp)
        self.sync_engine()  # the next rollout samples from the updated policy
        self.log_iteration(exp, stats)

    def collect(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_index: torch.Tensor | None = None,
                do_sample: bool = True, for_update: bool = True, seed: int | None = None) -> Experience:
        """Phase 1: sample responses, score them, and compute old and reference log-probabilities and
        values without autograd.

        For an update each prompt is answered ``ppo.num_generations`` times (rows repeated, each
        prompt's responses contiguous). A response's sampling noise is keyed by (iteration, the prompt's
        dataset index, its generation index) (:func:`~rlhf_lightning.rollout.sampler.prompt_noise`), so the responses
        do not depend on the rank or the batch a prompt is in. The score is the reward model's (minus the
        missing-EOS penalty) plus the weighted reward functions. With ``ppo.dynamic_sampling`` the batch is
        filled with groups whose scores differ (:meth:`dynamic_sampling`). With one minibatch
        (``for_update`` and ``ppo.num_minibatches == 1``) the first PPO epoch's forward sees the whole
        batch before any update: it runs here, with autograd, and its detached outputs are the old
        log-probabilities and values, its graph kept in ``Experience.reused_forward`` for the first
        update (one policy and one critic forward fewer per iteration). The shared frozen trunk, if
        any, runs once here for all four networks and all PPO epochs (``Experience.trunks``).

        Args:
            input_ids, attention_mask: (B, P) left-padded prompts.
            prompt_index: (B,) long, the prompts' indices in the datamodule (the sampling noise's keys, the
                reward functions' dataset columns); ``None``: the sampler draws from torch's generator.
            do_sample: False decodes greedily.
            for_update: False for evaluation: one response per prompt, old log-probabilities without
                autograd, no values, sampled by the policy's own forward whatever ``ppo.generation.backend``
                (the evaluation's seeded sampling is the same before and after training).
            seed: the sampling noise's seed; ``None``: the run's (:func:`~rlhf_lightning.rollout.sampler.run_seed`) and
                the iteration in the keys; an evaluation passes its own (``ppo.eval_seed``), keyed by prompt only.

        Returns:
            The :class:`~rlhf_lightning.rollout.experience.Experience` (no advantages yet).
        """
        cfg, gen = self.ppo, self.ppo.generation
        stats: dict[str, float] = {}
        functions = None  # the reward functions' results, when dynamic sampling already has them
        if for_update and cfg.dynamic_sampling and cfg.num_generations > 1:
            rollout, prompt_index, functions, stats = self.dynamic_sampling(input_ids, attention_mask, prompt_index)
        else:
            rollout, prompt_index = self._sample(input_ids, attention_mask, prompt_index, do_sample=do_sample,
                                                 for_update=for_update, seed=seed)
        reuse = for_update and cfg.num_minibatches == 1
        reference = not for_update or cfg.uses_reference  # an evaluation logs eval/kl
        exp = make_experience(rollout, self.reward_model, policy=None if reuse else self.policy,
                              ref_policy=self.ref_policy if reference else None,
                              critic=self.critic if for_update and not reuse else None,
                              temperature=gen.temperature, missing_eos_penalty=gen.missing_eos_penalty,
                              trunk=self.trunk, packed=self.packed,
                              score_eos_token_id=int(self.tokenizer.eos_token_id) if gen.score_with_eos else None)
        if self.ref_policy is None and reference:  # LoRA policy: the reference is the policy with its adapters off
            exp = replace(exp, ref_logprobs=adapter_off_logprobs(self.policy, rollout, gen.temperature,
                                                                 exp.trunks.ref_policy, self.packed))
        if self.reward_functions:
            total, per_function = functions or self._function_rewards(rollout, prompt_index)
            exp = replace(exp, scores=exp.scores + total, reward_components=per_function)
        if self.ppo.agent.environment_factory is not None:  # the environment's rewards, summed per episode
            exp = replace(exp, scores=exp.scores + rollout.env_rewards,
                          reward_components={**exp.reward_components, "environment": rollout.env_rewards})
        exp = replace(exp, sampling_stats=stats)
        if not reuse:
            return exp
        first = self._train_forward(rollout.input_ids, rollout.attention_mask, rollout.response_start, exp.trunks)
        invalid = ~rollout.policy_mask
        values = first[2].detach().masked_fill(invalid, 0.0) if first[2] is not None else None
        return replace(exp, logprobs=first[0].detach().masked_fill(invalid, 0.0), values=values, reused_forward=first)

    def _sample(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_index: torch.Tensor | None,
                do_sample: bool = True, for_update: bool = True, seed: int | None = None, round_: int = 0
                ) -> tuple[Rollout, torch.Tensor | None]:
        """Answer each prompt ``ppo.num_generations`` times (once when not ``for_update``), rows of one prompt
        contiguous, with the noise of :meth:`collect` (keys ``(iteration, round_, prompt, generation)``, or
        ``(prompt, generation)`` under an evaluation's ``seed``); each prompt prefilled once, and the policy's
        shared frozen trunk (if any) kept while sampling (``Rollout.trunk``), not computed again. Returns the
        rollout and the rows' prompt indices (``None`` without ``prompt_index``)."""
        gen = self.ppo.generation
        group = self.ppo.num_generations if for_update else 1
        seed, key = (self.sampling_seed, (self.iteration, round_)) if seed is None else (seed, ())
        if self.make_environment is not None:  # multi-turn: each prompt's rows repeated (no shared prefill)
            if group > 1:
                input_ids, attention_mask = (t.repeat_interleave(group, 0) for t in (input_ids, attention_mask))
            rollout = self._sample_episodes(input_ids, attention_mask, prompt_index, group, do_sample,
                                            self.engine if for_update else None, seed, key)
            return rollout, None if prompt_index is None else prompt_index.repeat_interleave(group, 0)
        noise = prompt_noise(seed, prompt_index, gen.max_new_tokens, *key, group=group)
        engine = self.engine if for_update else None
        rollout = generate(self.policy, input_ids, attention_mask, gen, self.tokenizer.eos_token_id,
                           self.tokenizer.pad_token_id, do_sample=do_sample, engine=engine, noise=noise, group=group,
                           trunk_depth=self.trunk.depth_of("policy") if self.trunk is not None else None,
                           score_eos_token_id=int(self.tokenizer.eos_token_id) if gen.score_with_eos else None)
        if prompt_index is not None and group > 1:
            prompt_index = prompt_index.repeat_interleave(group, 0)
        return rollout, prompt_index

    def _sample_episodes(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_index: torch.Tensor | None,
                         group: int, do_sample: bool, engine, seed: int, key: tuple) -> Rollout:
        """Multi-turn episodes (``ppo.agent``; :func:`~rlhf_lightning.rollout.agent.run_episodes`) from the rows of
        ``input_ids`` (each prompt already repeated ``group`` times): each environment's ``reset`` reads the prompt
        row (the datamodule's chat messages and columns), and turn ``k`` of a row draws the noise keyed by
        ``(*key, k, prompt index, generation index)`` (:func:`~rlhf_lightning.rollout.sampler.prompt_noise`).

        Raises:
            ValueError: no ``prompt_index``, or a datamodule without ``prompts`` and ``columns``
                (:class:`~rlhf_lightning.data.PromptDataModule` has them).
        """
        gen, tokenizer = self.ppo.generation, self.tokenizer
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if prompt_index is None or not hasattr(datamodule, "columns"):
            raise ValueError("ppo.agent: multi-turn rollouts read each prompt's row (reset(row)): they need batches "
                             "with prompt_index from a datamodule with prompts and columns (PromptDataModule)")
        index = prompt_index.repeat_interleave(group, 0).tolist()
        columns = datamodule.columns(index)
        rows = [{"prompt": datamodule.prompts[i], **{name: values[k] for name, values in columns.items()}}
                for k, i in enumerate(index)]
        prompts = [ids[mask.bool()].tolist() for ids, mask in zip(input_ids, attention_mask, strict=True)]

        def sample(contexts, rows_now, turn, limit):
            noise = prompt_noise(seed, prompt_index, gen.max_new_tokens, *key, turn, group=group)
            return sample_turn(self.policy, contexts, gen, limit, tokenizer.eos_token_id, tokenizer.pad_token_id,
                               do_sample=do_sample, engine=engine,
                               noise=None if noise is None else noise[torch.tensor(rows_now, device=noise.device)])

        return run_episodes(sample, prompts, rows, self.make_environment, self.ppo.agent, gen.max_new_tokens,
                            tokenizer, tokenizer.pad_token_id, device=input_ids.device)

    def compute_advantages(self, exp: Experience) -> Experience:
        """Phase 2: per-token rewards −β·KL_t plus the score at the last token, then the advantages of
        ``ppo.adv_estimator``:

        - ``gae``: GAE advantages and returns with the critic's values (whitened with ``ppo.whiten``,
          across ranks with ``ppo.whiten_across_ranks``);
        - ``grpo`` / ``dr_grpo`` / ``rloo``: each response's total reward (score − β·Σ_t KL_t) against
          the other responses to its prompt, the same advantage at every token;
        - ``reinforce_pp`` / ``reinforce_pp_baseline``: whitened returns-to-go of the per-token rewards
          (the latter with the group's mean score subtracted first).

        Every per-token quantity is on the policy's tokens (``exp.loss_mask``): a multi-turn trajectory's
        environment tokens get no KL, no reward and no advantage, and GAE and the returns-to-go step over them
        (:func:`~rlhf_lightning.algorithms.advantages.gae`: one γλ per policy token).

        Returns:
            ``exp`` with ``kl_coef`` (the β used), ``kl`` (``None`` when the reference did not run:
            ``ppo.uses_reference`` false), ``rewards``, ``advantages`` and ``returns`` (critic-free: the returns
            are the advantages' targets only for logging).
        """
        cfg, mask = self.ppo, exp.loss_mask
        kl_coef = self.kl_ctl.value
        if exp.ref_logprobs is None:  # no reference pass (ppo.uses_reference false): β = 0, no KL term, kl None
            rewards, _ = compute_rewards(exp.scores, exp.logprobs, exp.logprobs, mask, kl_coef, cfg.kl_estimator)
            kl = None
        else:
            rewards, kl = compute_rewards(exp.scores, exp.logprobs, exp.ref_logprobs, mask, kl_coef,
                                          cfg.kl_estimator)
        estimator, group = cfg.adv_estimator, cfg.num_generations
        if estimator == "gae":
            advantages, returns = gae(rewards, exp.values, mask, cfg.gamma, cfg.lam)
            if cfg.whiten:
                advantages = self.whiten_advantages(advantages, mask)
        elif estimator in ("grpo", "dr_grpo", "rloo"):
            totals = rewards.sum(1)  # (N,): score − β·Σ KL_t
            per_sequence = (rloo_advantages(totals, group) if estimator == "rloo"
                            else group_advantages(totals, group, std_normalize=estimator == "grpo"))
            advantages = returns = sequence_to_token_advantages(per_sequence, mask)
        elif estimator == "reinforce_pp":
            advantages, returns = reinforce_pp_advantages(rewards, mask, cfg.gamma, all_reduce=self._rank_sum())
        else:  # reinforce_pp_baseline
            penalty = -kl_coef * kl if kl is not None else torch.zeros_like(rewards)
            advantages, returns = reinforce_pp_baseline_advantages(exp.scores, penalty, mask, group, cfg.gamma,
                                                                   all_reduce=self._rank_sum())
        return replace(exp, kl_coef=kl_coef, kl=kl, rewards=rewards, advantages=advantages, returns=returns)

    def update(self, exp: Experience) -> dict[str, torch.Tensor]:
        """Phase 3: ``ppo.ppo_epochs`` passes over ``ppo.num_minibatches`` shuffled minibatches, each one
        backward of policy loss (+ ``vf_coef`` · value loss with a critic, + ``kl_loss_coef`` · KL loss when
        set) and one step of every optimizer; then the LR
        schedulers (once per iteration) and the adaptive KL controller (on the KL averaged over ranks,
        so every rank keeps the same β).

        Under data parallelism each loss is this rank's share of the loss of every rank's minibatch together
        (:func:`~rlhf_lightning.modules.common.batch_counts`: token and sequence counts summed over ranks), so
        that the gradients DDP averages are those of one process holding the whole minibatch; the logged
        statistics are shares too, and their mean over ranks is the whole minibatch's.

        Returns:
            The minibatch statistics averaged over the iteration, and ``ppo/policy_frozen`` (1 during
            the critic warm-up), 0-d tensors by metric name.
        """
        cfg, ro, mask = self.ppo, exp.rollout, exp.loss_mask
        optimizers = _as_list(self.optimizers())  # [policy, critic], or [joint] with ppo.joint_optimizer
        policy_frozen = self.iteration < cfg.critic_warmup_iterations
        batch_size, reused = exp.batch_size, exp.reused_forward
        budget = cfg.response_budget  # Dr. GRPO's constant normaliser (loss_agg=seq_mean_token_sum_norm)
        weights = (tis_weights(exp.logprobs, ro.sampler_logprobs, mask, cfg.tis_cap)
                   if cfg.tis_cap is not None and ro.sampler_logprobs is not None else None)  # (B, R) or None
        stats: dict[str, list[torch.Tensor]] = {}
        for _epoch in range(cfg.ppo_epochs):
            order = torch.randperm(batch_size, device=mask.device) if cfg.num_minibatches > 1 else \
                torch.arange(batch_size, device=mask.device)
            for mb in order.tensor_split(cfg.num_minibatches):
                if reused is not None:  # epoch 0, whole batch: computed by collect
                    (logprobs, entropy, values), reused = reused, None
                else:
                    logprobs, entropy, values = self._train_forward(ro.input_ids[mb], ro.attention_mask[mb],
                                                                    ro.response_start, exp.trunks.rows(mb))
                m = mask[mb]
                counts = batch_counts(self, m)  # every rank's part of the minibatch: each rank's losses are its shares
                pg_loss, pg_stats = ppo_policy_loss(logprobs, exp.logprobs[mb], exp.advantages[mb], m, cfg.clip_eps,
                                                    cfg.clip_eps_high, cfg.loss_agg, cfg.ratio_level,
                                                    token_weights=weights[mb] if weights is not None else None,
                                                    counts=counts, max_response_length=budget)
                step_stats = {"ppo/policy_loss": pg_loss, "ppo/clipfrac": pg_stats["clipfrac"],
                              "ppo/approx_kl": pg_stats["approx_kl"], "ppo/ratio": pg_stats["ratio_mean"],
                              "objective/entropy": token_mean(entropy, m, counts)}
                loss = pg_loss
                if values is not None:
                    vf_loss, vf_stats = value_loss(values, exp.returns[mb], m, exp.values[mb], cfg.cliprange_value,
                                                   counts=counts)
                    loss = pg_loss + cfg.vf_coef * vf_loss
                    step_stats.update({"value/loss": vf_loss, "value/clipfrac": vf_stats["clipfrac"]})
                if weights is not None:
                    step_stats["ppo/tis_weight"] = token_mean(weights[mb], m, counts)
                if cfg.kl_loss_coef:
                    kl_term = kl_loss(logprobs, exp.ref_logprobs[mb], m, cfg.kl_loss_estimator, cfg.loss_agg,
                                      counts=counts, max_response_length=budget)
                    loss = loss + cfg.kl_loss_coef * kl_term
                    step_stats["ppo/kl_loss"] = kl_term
                self._step(optimizers, loss, policy_frozen)
                for key, value in step_stats.items():
                    stats.setdefault(key, []).append(value.detach())
        for scheduler in _as_list(self.lr_schedulers()):
            scheduler.step()
        if cfg.adaptive_kl:
            kl_per_seq = (exp.kl * mask).sum(1).mean()
            kl_all_ranks = self.trainer.strategy.reduce(kl_per_seq.detach().clone(), reduce_op="mean")  # in place
            self.kl_ctl.update(float(kl_all_ranks), batch_size * self.trainer.world_size)
        means = {key: torch.stack(values).mean() for key, values in stats.items()}
        return {**means, "ppo/policy_frozen": torch.tensor(float(policy_frozen))}

    def log_iteration(self, exp: Experience, stats: dict[str, torch.Tensor]) -> None:
        """Phase 4: log the iteration's metrics and, every ``ppo.log_samples_every_n_steps`` iterations, sample
        generations. Every metric is the whole batch's (all ranks): means over responses (each rank holds as
        many), token means as shares (:func:`~rlhf_lightning.modules.common.batch_counts`), the explained
        variance pooled, and the ``diagnostics/*`` computed on the rows of every rank (so every rank's alarms
        agree). Without a reference pass (``ppo.uses_reference`` false) no KL was measured: ``objective/kl``,
        ``objective/non_score_reward`` and ``diagnostics/kl_per_token`` are left out."""
        mask, kl_coef = exp.loss_mask, exp.kl_coef
        metrics = dict(stats)
        if exp.kl is not None:  # else no reference pass ran (ppo.uses_reference false): no KL measured
            kl_per_seq = (exp.kl * mask).sum(1).mean()
            metrics.update({"objective/kl": kl_per_seq,
                            "objective/non_score_reward": -(kl_coef * exp.kl * mask).sum(1).mean(),
                            "objective/rlhf_reward": exp.scores.mean() - kl_coef * kl_per_seq})
        else:
            metrics["objective/rlhf_reward"] = exp.scores.mean()  # β = 0: the reward is the score
        metrics.update({
            "objective/score": exp.scores.mean(),
            "response/length": mask.sum(1).float().mean(),
            "response/eos_frac": exp.rollout.ends_with_eos.float().mean(),
            "rollout/logprob_diff": logprob_diff(exp, batch_counts(self, mask)),
            "ppo/kl_coef": torch.tensor(kl_coef),
            "ppo/iteration": torch.tensor(float(self.iteration)),
        })
        if self.reward_model is not None:
            metrics["objective/rm_score"] = exp.rm_scores.mean()  # without the missing-EOS penalty and functions
        if exp.values is not None:
            metrics["value/explained_var"] = explained_variance(exp.values, exp.returns, mask, sum_over_ranks(self))
        metrics.update({f"reward/{name}": values.mean() for name, values in exp.reward_components.items()})
        metrics.update({f"rollout/{name}": torch.tensor(float(value)) for name, value in exp.sampling_stats.items()})
        if exp.rollout.episode_stats is not None:  # multi-turn: means per episode (cuts: the share of episodes)
            metrics.update({f"agent/{name}": values.mean() for name, values in exp.rollout.episode_stats.items()})
        if self.ppo.num_generations > 1:
            groups = exp.scores.view(-1, self.ppo.num_generations)
            metrics["rollout/mixed_groups"] = (groups.amax(1) > groups.amin(1)).float().mean()
        diagnostics = rollout_diagnostics(exp.scores, exp.rollout.response_ids, mask, exp.kl, self.ppo.alarms.ngram,
                                          gather=gather_rows(self))
        metrics.update({f"diagnostics/{name}": value for name, value in diagnostics.items()})  # floats: on self.device
        for line in check_alarms(diagnostics, self.ppo.alarms, self._alarms_fired):  # each kind once per run
            log.warning("iteration %d: %s", self.iteration, line)
        batch_size = exp.batch_size
        self.log_dict(metrics, on_step=True, on_epoch=False, batch_size=batch_size, sync_dist=True)
        bar = {"score": metrics["objective/score"]}
        if "objective/kl" in metrics:
            bar["kl"] = metrics["objective/kl"]
        self.log_dict(bar, prog_bar=True, logger=False, on_step=True, batch_size=batch_size, sync_dist=True)
        every = self.ppo.log_samples_every_n_steps
        if every and (self.iteration - 1) % every == 0:
            self._write_samples(exp, phase="train")

    # ------------------------------------------------------------------ pieces of the phases
    def _train_forward(self, ids: torch.Tensor, attn: torch.Tensor, start: int, trunks: Trunks):
        """Policy log-probabilities and entropy, and critic values (``None`` without a critic), with
        autograd: each (b, R).

        ``trunks``: the shared frozen blocks' outputs for these rows (``Trunks()``: none); padding-free with
        ``ppo.packed_sequences`` (:func:`~rlhf_lightning.models.forward.pack`)."""
        logprobs, entropy = response_logprobs(self.policy, ids, attn, start, self.ppo.generation.temperature,
                                              with_entropy=True, trunk=trunks.policy, packed=self.packed)
        if self.critic is None:
            return logprobs, entropy, None
        return logprobs, entropy, response_values(self.critic, ids, attn, start, trunk=trunks.critic,
                                                  packed=self.packed)

    def _function_rewards(self, rollout: Rollout, prompt_index: torch.Tensor | None
                          ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The reward functions' weighted total (N,) and unweighted rewards by name on the rollout
        (:func:`~rlhf_lightning.rollout.experience.function_rewards`, with the datamodule's prompts and columns;
        multi-turn: the whole trajectory as ``completions``, the policy's last turn as ``final_turns``).

        Raises:
            RewardFunctionError: a function raised or returned a bad value (one line naming it and the row).
        """
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        return function_rewards(self.reward_functions, rollout, self.tokenizer, datamodule, prompt_index)

    def _scores(self, rollout: Rollout, prompt_index: torch.Tensor | None):
        """The responses' scores (reward model minus the missing-EOS penalty, plus reward functions), (N,),
        and the reward functions' :meth:`_function_rewards` (``None`` without functions)."""
        gen = self.ppo.generation
        scores = make_experience(rollout, self.reward_model, missing_eos_penalty=gen.missing_eos_penalty,
                                 packed=self.packed,
                                 score_eos_token_id=int(self.tokenizer.eos_token_id) if gen.score_with_eos else None
                                 ).scores
        if self.ppo.agent.environment_factory is not None:
            scores = scores + rollout.env_rewards
        functions = self._function_rewards(rollout, prompt_index) if self.reward_functions else None
        return (scores + functions[0] if functions else scores), functions

    def dynamic_sampling(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                         prompt_index: torch.Tensor | None) -> tuple[Rollout, torch.Tensor, tuple | None, dict]:
        """DAPO's dynamic sampling (Yu et al. 2025, §3.2 and Algorithm 1): a group whose G scores are all equal
        gives a group estimator no signal, so the batch is filled with groups whose scores differ.

        1. The batch's prompts are answered G times and scored.
        2. While the groups with a signal, counted over every rank (one all-reduce per round), are fewer than the
           global batch (B prompts per rank × world size) and fewer than ``ppo.max_resample_rounds`` further
           rounds were drawn, a further global batch of prompts is drawn from the datamodule
           (``draw_prompts``: seeded by the iteration and the round, split between the ranks as the sampler
           splits a batch) and answered. Every rank runs the same rounds.
        3. From all groups drawn, in the order (round, position in the global batch): those with a signal
           first, then, if the bound was reached without enough of them, flat ones; the first B × world size
           are kept and dealt to the ranks as the sampler deals a batch (rank r: the r-th of every world-size
           groups), so every rank trains on B groups and the kept set is the same whatever the world size.
           When only the batch's own groups were drawn, each rank keeps its own; else the ranks exchange their
           candidate groups (one ``all_gather_object`` of token ids and scores).

        Counts (the same on every rank): ``resample_rounds`` (further rounds drawn), ``flat_groups`` (flat
        groups among all drawn), ``flat_groups_kept`` (flat groups in the batch: the bound was reached).

        Returns:
            ``(rollout, prompt_index, functions, stats)``: the kept rows (B × G), their prompt indices, the reward
            functions' results on them (``None`` without functions), and the counts.

        Raises:
            ValueError: no ``prompt_index`` in the batch, or a datamodule without ``draw_prompts``.
        """
        cfg, group = self.ppo, self.ppo.num_generations
        datamodule = getattr(self.trainer, "datamodule", None)
        if prompt_index is None or not hasattr(datamodule, "draw_prompts"):
            raise ValueError("ppo.dynamic_sampling draws further prompts: it needs batches with prompt_index from a "
                             "datamodule with draw_prompts (PromptDataModule)")
        world, rank = self.trainer.world_size, self.global_rank
        wanted = input_ids.shape[0] * world  # groups in the global batch
        rounds, with_signal = [], 0  # this rank's groups of each round, and the groups with a signal on every rank
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "prompt_index": prompt_index}
        while True:
            rollout, index = self._sample(batch["input_ids"], batch["attention_mask"], batch["prompt_index"],
                                          round_=len(rounds))
            scores, functions = self._scores(rollout, index)
            grouped = scores.view(-1, group)
            flat = grouped.amax(1) == grouped.amin(1)  # (prompts,)
            rounds.append(_Drawn(rollout, index, scores, functions, flat))
            with_signal += int(self.trainer.strategy.reduce(
                (~flat).sum().to(torch.float64), reduce_op="sum"))  # every rank: the same count, the same rounds
            if with_signal >= wanted or len(rounds) > cfg.max_resample_rounds:
                break
            batch = {k: v.to(self.device) for k, v in
                     datamodule.draw_prompts((self.iteration, len(rounds)), wanted, rank, world).items()}
        stats = {"resample_rounds": float(len(rounds) - 1), "flat_groups": float(wanted * len(rounds) - with_signal),
                 "flat_groups_kept": float(max(wanted - with_signal, 0))}
        if len(rounds) == 1:  # the batch's own groups, all kept: each rank keeps its own
            only = rounds[0]
            return only.rollout, only.prompt_index, only.functions, stats
        drawn = [rounds] if world == 1 else _all_gather_objects([d.to("cpu") for d in rounds])  # [rank][round]
        # every group drawn as (flat, round, position in the round's global batch, rank, group on that rank)
        order = sorted((bool(d.flat[g]), k, g * world + q, q, g)
                       for q, per_rank in enumerate(drawn) for k, d in enumerate(per_rank) for g in range(len(d.flat)))
        pieces = [(drawn[q][k], torch.arange(g * group, (g + 1) * group))
                  for _, k, _, q, g in order[:wanted][rank::world]]
        device = self.device
        rollout = stack_rollouts([select_rows(d.rollout.to("cpu"), rows) for d, rows in pieces],
                                 self.tokenizer.pad_token_id).to(device)
        prompt_index = torch.cat([d.prompt_index.cpu()[rows] for d, rows in pieces]).to(device)
        functions = None
        if self.reward_functions:
            functions = (torch.cat([d.functions[0].cpu()[rows] for d, rows in pieces]).to(device),
                         {name: torch.cat([d.functions[1][name].cpu()[rows] for d, rows in pieces]).to(device)
                          for name in pieces[0][0].functions[1]})
        return rollout, prompt_index, functions, stats

    def _step(self, optimizers: list, loss: torch.Tensor, policy_frozen: bool) -> None:
        """One backward of ``loss``, gradient-norm clipping per optimizer (``ppo.max_grad_norm``; the joint
        optimizer clips one norm over both groups), then every optimizer stepped and zeroed. While
        ``policy_frozen`` (critic warm-up) the policy's own gradients are dropped first (not those of a
        critic adapter on the policy's base, ``critic.share_base``): AdamW skips parameters without a gradient,
        and the step still counts in ``global_step``."""
        self.manual_backward(loss)
        if policy_frozen:
            for param in own_parameters(self.policy):
                param.grad = None
        if self.ppo.max_grad_norm is not None:
            for opt in optimizers:
                self.clip_gradients(opt, gradient_clip_val=self.ppo.max_grad_norm, gradient_clip_algorithm="norm")
        for opt in optimizers:
            opt.step()
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)

    def whiten_advantages(self, advantages: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Step 5's whitening: :func:`~rlhf_lightning.algorithms.ops.masked_whiten` of ``advantages`` (B, R) float over
        ``mask`` (B, R) bool, with the statistics of every rank's valid tokens when
        ``ppo.whiten_across_ranks`` and the world size is > 1 (summed with the strategy's ``reduce``)."""
        return masked_whiten(advantages, mask, all_reduce=self._rank_sum())

    def _rank_sum(self):
        """:func:`~rlhf_lightning.modules.common.sum_over_ranks` when ``ppo.whiten_across_ranks`` (whitening
        statistics of every rank's batch), else ``None`` (each rank whitens its own batch)."""
        return sum_over_ranks(self) if self.ppo.whiten_across_ranks else None

    def configure_optimizers(self):
        """AdamW and LR schedules for the policy and the critic (:mod:`~rlhf_lightning.modules.common`).

        The schedulers step once per PPO iteration (end of :meth:`training_step`); a decaying
        ``scheduler`` runs over ``ceil(trainer.max_steps / optimizer_steps_per_iteration)`` iterations
        (:func:`~rlhf_lightning.modules.common.scheduler_total_steps`).

        Returns:
            ``[policy optimizer, critic optimizer], [policy scheduler, critic scheduler]``; with
            ``ppo.joint_optimizer``, ``[optimizer], [scheduler]``: one AdamW whose param groups are
            ``"policy"`` (``policy_optim``) and ``"critic"`` (``critic_optim``), one ``LambdaLR`` with
            each group's own warm-up; with a critic-free estimator ``[policy optimizer], [policy scheduler]``.

        Raises:
            ValueError: the policy or the critic has no trainable parameter; a decaying schedule in a run
                without an end.
        """
        trainer = self._trainer
        total = None
        if trainer is not None and {self.policy_optim.scheduler, self.critic_optim.scheduler} != {"constant"}:
            total = scheduler_total_steps(trainer, self.optimizer_steps_per_iteration)
        policy_params = own_parameters(self.policy)  # a critic on the policy's base: its adapter is the critic's
        if self.critic is None:  # critic-free estimator: the policy alone
            opt_policy, sched_policy = make_optimizer(policy_params, self.policy_optim, total)
            return [opt_policy], [sched_policy]
        critic_params = own_parameters(self.critic)
        if self.ppo.joint_optimizer:
            optimizer, scheduler = make_grouped_optimizer([("policy", policy_params, self.policy_optim),
                                                           ("critic", critic_params, self.critic_optim)], total)
            return [optimizer], [scheduler]
        opt_policy, sched_policy = make_optimizer(policy_params, self.policy_optim, total)
        opt_value, sched_value = make_optimizer(critic_params, self.critic_optim, total)
        return [opt_policy, opt_value], [sched_policy, sched_value]

    def setup(self, stage: str) -> None:
        """Refuse fp16 loss scaling; under DeepSpeed, check for the joint optimizer and hand
        ``ppo.max_grad_norm`` to DeepSpeed.

        Raises:
            ConfigError: the precision plugin has a ``GradScaler`` (:func:`check_ppo_precision`).
            ValueError: a DeepSpeed strategy without ``ppo.joint_optimizer`` (it takes one optimizer); LoRA
                networks under FSDP or DeepSpeed (:func:`~rlhf_lightning.modules.common.check_lora_strategy`).
        """
        check_ppo_precision(self.trainer.precision_plugin)
        check_lora_strategy(self.trainer.strategy, {"policy": self.policy, "critic": self.critic})
        configure_deepspeed_clipping(self.trainer.strategy, self.ppo)

    # ------------------------------------------------------------------ samples
    def _write_samples(self, exp: Experience, phase: str, limit: int | None = None) -> list[dict]:
        """Decode the first ``limit`` (default ``ppo.num_sample_prompts``) rows of ``exp`` (with its ``kl``)
        to ``samples_path`` and to every logger with tables, on the global-zero rank; return the rows
        (:func:`~rlhf_lightning.evaluation.heldout.write_samples`)."""
        return write_samples(self, self.tokenizer, exp, phase, self.iteration, limit or self.ppo.num_sample_prompts,
                             self.samples_path)

    def _eval_collect(self, input_ids, attention_mask, prompt_index, do_sample, seed) -> Experience:
        """The held-out evaluation's rollout: :meth:`collect` with ``for_update=False`` (one response per prompt,
        the policy's own forward, noise keyed by the evaluation's seed and the prompt)."""
        return self.collect(input_ids, attention_mask, prompt_index, do_sample=do_sample, for_update=False, seed=seed)

    def configure_callbacks(self):
        """The held-out evaluation (:class:`~rlhf_lightning.evaluation.heldout.HeldOutEvaluation`): before the first
        iteration, every ``eval.every_n_iterations`` and after the last."""
        return [self.heldout]

    def evaluate_samples(self, phase: str) -> dict[str, float] | None:
        """Answer the fixed evaluation prompts, score them with the proxy and the judges, and record the result
        under ``phase`` (:meth:`~rlhf_lightning.evaluation.heldout.HeldOutEvaluation.evaluate`, shared with DPO):
        ``ppo.num_sample_prompts`` prompts sampled with ``ppo.eval_seed`` (greedy with ``ppo.eval_greedy``), one
        response each (:meth:`collect` with ``for_update=False``), split between the ranks and gathered;
        ``eval/score``, ``eval/rm_score``, ``eval/kl`` (estimator ``ppo.kl_estimator``), ``eval/eos_frac``,
        ``eval/reward/<name>``, ``eval/judge/<name>``, intervals and paired changes
        (:func:`~rlhf_lightning.evaluation.heldout.evaluate_policy`).

        Returns:
            The metrics as floats, or ``None`` when there is nothing to evaluate (``num_sample_prompts`` 0 or a
            datamodule without ``sample_batch``).
        """
        return self.heldout.evaluate(self, phase)

    def on_train_end(self) -> None:
        """Export the trained policy (and critic) after the held-out evaluation's ``after`` (which its callback runs
        first), gathered with every rank taking part under FSDP2
        (:func:`~rlhf_lightning.modules.common.export_trained`)."""
        if self.export_dir:
            export_trained(self, self.policy, self.tokenizer, self.export_dir)
            export_trained(self, self.critic, self.tokenizer, str(self.export_dir).rstrip("/") + "_critic")

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Leave the frozen reference and reward model out (they are reloaded from their sources), and the
        frozen base weights of LoRA networks (their adapters and heads stay)."""
        state = checkpoint["state_dict"]
        for key in [k for k in state if k.startswith(FROZEN_PREFIXES)]:
            del state[key]
        drop_frozen_lora_weights(state, {"policy": self.policy, "critic": self.critic})
        checkpoint["kl_controller"] = self.kl_ctl.state_dict()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if "kl_controller" in checkpoint:
            self.kl_ctl.load_state_dict(checkpoint["kl_controller"])


@dataclass(frozen=True)
class _Drawn:
    """One round of :meth:`PPOModule.dynamic_sampling` on one rank: the rollout (G rows per prompt), the rows'
    prompt indices, scores and reward-function results, and which of its groups are flat (``(prompts,)`` bool)."""

    rollout: Rollout
    prompt_index: torch.Tensor
    scores: torch.Tensor
    functions: tuple | None
    flat: torch.Tensor

    def to(self, device) -> _Drawn:
        """The same on ``device`` (CPU before an exchange between ranks)."""
        functions = None if self.functions is None else (
            self.functions[0].to(device), {k: v.to(device) for k, v in self.functions[1].items()})
        return _Drawn(self.rollout.to(device), self.prompt_index.to(device), self.scores.to(device), functions,
                      self.flat.to(device))


def _all_gather_objects(obj) -> list:
    """``obj`` of every rank, in rank order (``torch.distributed.all_gather_object``; a collective)."""
    gathered = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, obj)
    return gathered
