"""Experience: everything the update needs about a batch of sampled responses, computed without gradients.

:func:`make_experience` takes a :class:`~rlhf_lightning.rollout.sampler.Rollout` and adds the reward model's
scores (a response cut at ``max_new_tokens`` read with an EOS appended, :func:`scoring_inputs`), the
reference's log-probabilities, and the log-probabilities and values of the networks that collected the rollout:
an :class:`Experience`, which the advantage estimators and the losses read. :func:`logprob_diff` compares the
sampler's log-probabilities with the trainer's; :func:`adapter_off_logprobs` gives the reference's for a LoRA
policy (the policy with its adapters off). Shared by the value, PPO and DPO stages."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
from torch import nn

from rlhf_lightning.algorithms.kl import apply_missing_eos_penalty
from rlhf_lightning.algorithms.ops import BatchCounts, token_mean
from rlhf_lightning.models.forward import response_logprobs, response_values, sequence_scores
from rlhf_lightning.models.trunk import SharedTrunk, Trunks
from rlhf_lightning.rewards.functions import score_with_functions
from rlhf_lightning.rollout.sampler import Rollout, decode_responses, final_turns


@dataclass(frozen=True)
class Experience:
    """A rollout and everything the update computes about it, as OpenRLHF's ``Experience``.

    Built once by :func:`make_experience` (no gradients), then completed by the PPO phases with
    ``dataclasses.replace`` (frozen: nothing changes it in place). Shapes as :class:`Rollout`'s;
    per-token tensors are float32, 0 where :attr:`loss_mask` is False (padding, and a multi-turn
    trajectory's environment tokens).

    Attributes:
        rollout: the sampled sequences (:class:`Rollout`).
        scores: (B,) float32 score of each response: the reward model's minus the missing-EOS penalty,
            plus the weighted reward functions' (``reward_components``).
        rm_scores: (B,) float32 the reward model's own score (0 without a reward model).
        ref_logprobs: (B, R) reference log-probabilities of the response tokens (``None``: no reference).
        logprobs: (B, R) old log-probabilities, under the policy that sampled (``None`` until computed).
        values: (B, R) old critic values V(s_t) (``None`` without a critic).
        trunks: outputs of the frozen lower blocks the networks share (:class:`~rlhf_lightning.models.trunk.Trunks`;
            empty when none is shared), reused by the training forwards on the same rows.
        reused_forward: with one minibatch, the first PPO epoch's training forward over the whole
            batch, with autograd: ``(logprobs, entropy, values)``, each (B, R); its detached outputs
            are ``logprobs`` and ``values``, and the first update uses its graph instead of a
            forward of its own (one policy and one critic forward fewer per iteration).
        kl_coef: β used for ``rewards`` (filled by the advantage phase, as the next four fields).
        kl: (B, R) per-token KL estimate to the reference.
        rewards: (B, R) per-token rewards (−β·KL_t, plus the score at the last token).
        advantages: (B, R) advantages (whitened if so configured).
        returns: (B, R) value targets (advantages before whitening + values).
        reward_components: reward function name → (B,) float32 unweighted rewards (empty without functions).
        sampling_stats: counts from dynamic sampling (``resample_rounds``, ``flat_groups``, ``flat_groups_kept``),
            if on.
    """

    rollout: Rollout
    scores: torch.Tensor
    rm_scores: torch.Tensor
    ref_logprobs: torch.Tensor | None = None
    logprobs: torch.Tensor | None = None
    values: torch.Tensor | None = None
    trunks: Trunks = Trunks()
    reused_forward: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
    kl_coef: float | None = None
    kl: torch.Tensor | None = None
    rewards: torch.Tensor | None = None
    advantages: torch.Tensor | None = None
    returns: torch.Tensor | None = None
    reward_components: dict[str, torch.Tensor] = field(default_factory=dict)
    sampling_stats: dict[str, float] = field(default_factory=dict)

    @property
    def response_mask(self) -> torch.Tensor:
        """(B, R) bool, the rollout's valid response tokens (multi-turn: the environment's too)."""
        return self.rollout.response_mask

    @property
    def loss_mask(self) -> torch.Tensor:
        """(B, R) bool, the tokens the policy sampled (:attr:`Rollout.policy_mask
        <rlhf_lightning.rollout.sampler.Rollout.policy_mask>`): what the losses, the KL, the values and the
        advantages are computed on."""
        return self.rollout.policy_mask

    @property
    def batch_size(self) -> int:
        """B, the number of responses."""
        return self.rollout.input_ids.shape[0]


def scoring_inputs(rollout: Rollout, eos_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The rollout's sequences with ``eos_token_id`` appended to responses cut without one.

    One column is added: it holds the EOS (attended) in rows that did not end with EOS, and
    padding (not attended) in rows that did, so every response is read at an EOS. Earlier columns
    are unchanged, and with causal attention so are their hidden states: a trunk computed on these
    inputs serves the other networks through :meth:`~rlhf_lightning.models.trunk.TrunkOutput.columns`
    (:func:`make_experience` does so).

    Returns:
        input_ids (B, T + 1) long and attention_mask (B, T + 1) long.
    """
    ids, mask = rollout.input_ids, rollout.attention_mask
    cut = ~rollout.ends_with_eos  # (B,)
    extra = torch.where(cut, torch.full_like(cut, eos_token_id, dtype=ids.dtype), ids[:, -1])
    return torch.cat([ids, extra[:, None]], 1), torch.cat([mask, cut.to(mask.dtype)[:, None]], 1)


def make_experience(rollout: Rollout, reward_model: nn.Module | None, policy: nn.Module | None = None,
                    ref_policy: nn.Module | None = None, critic: nn.Module | None = None, temperature: float = 1.0,
                    missing_eos_penalty: float | None = None, trunk: SharedTrunk | None = None,
                    score_eos_token_id: int | None = None, packed: bool = False) -> Experience:
    """Scores, reference and old log-probabilities, and values of a rollout, without autograd.

    The reward model and the frozen reference run under ``torch.inference_mode``; the policy
    and critic (trainable) under ``torch.no_grad``. Results are plain tensors (usable as
    constants in a later gradient step). Models passed as ``None`` are skipped (their fields stay
    ``None``).

    Args:
        rollout: the sampled sequences.
        reward_model: scores each response at its last token (:func:`~rlhf_lightning.models.forward.sequence_scores`);
            ``None``: scores 0 (the reward comes from reward functions, added by the caller).
        policy, ref_policy, critic: for ``logprobs``, ``ref_logprobs`` and ``values``.
        temperature: the sampling temperature (log-probabilities are computed at it).
        missing_eos_penalty: see :func:`~rlhf_lightning.algorithms.kl.apply_missing_eos_penalty`.
        trunk: frozen lower blocks shared by the networks (:class:`~rlhf_lightning.models.trunk.SharedTrunk`,
            whose names are ``reward_model``, ``ref_policy``, ``policy``, ``critic``): run once, on
            the reward model's scoring inputs (not at all for the policy's group when the sampler kept
            it, ``Rollout.trunk``); each grouped network runs only its blocks above it,
            the others reading the first T columns (with causal attention, the trunk of the rollout
            itself). Kept in ``Experience.trunks`` for the training forwards on the same rows.
        score_eos_token_id: score responses cut without EOS with this token appended
            (:func:`scoring_inputs`); ``None``: score every row at its last token as it is.
        packed: every network's forward runs its rows padding-free
            (:func:`~rlhf_lightning.models.forward.pack`; ``ppo.packed_sequences``).

    Returns:
        A new :class:`Experience` (advantage fields ``None``); log-probabilities and values are 0 outside the
        rollout's :attr:`~rlhf_lightning.rollout.sampler.Rollout.policy_mask`.
    """
    ids, mask, start = rollout.input_ids, rollout.attention_mask, rollout.response_start
    valid = rollout.policy_mask
    score_ids, score_mask = (ids, mask) if score_eos_token_id is None else scoring_inputs(rollout, score_eos_token_id)
    trunks = Trunks()
    if trunk is not None:
        known = {"policy": rollout.trunk} if rollout.trunk is not None else None  # kept while sampling
        trunks = Trunks.of(trunk.compute(score_ids, score_mask, known), width=ids.shape[1])
    with torch.inference_mode():
        rm_scores = (sequence_scores(reward_model, score_ids, score_mask, trunk=trunks.reward_model,  # (B,)
                                     packed=packed)
                     if reward_model is not None else torch.zeros(ids.shape[0], device=ids.device))
        ref = (response_logprobs(ref_policy, ids, mask, start, temperature, trunk=trunks.ref_policy, packed=packed)
               if ref_policy is not None else None)
    rm_scores = rm_scores.clone()  # out of inference mode
    with torch.no_grad():
        logprobs = (response_logprobs(policy, ids, mask, start, temperature, trunk=trunks.policy, packed=packed)
                    .masked_fill(~valid, 0.0) if policy is not None else None)
        values = (response_values(critic, ids, mask, start, trunk=trunks.critic, packed=packed).masked_fill(~valid, 0.0)
                  if critic is not None else None)
    return Experience(
        rollout=replace(rollout, trunk=None),  # kept in trunks
        scores=apply_missing_eos_penalty(rm_scores, rollout.ends_with_eos, missing_eos_penalty),
        rm_scores=rm_scores, ref_logprobs=ref.clone().masked_fill(~valid, 0.0) if ref is not None else None,
        logprobs=logprobs, values=values, trunks=trunks,
    )


def adapter_off_logprobs(policy: nn.Module, rollout: Rollout, temperature: float = 1.0,
                         trunk: torch.Tensor | None = None, packed: bool = False) -> torch.Tensor:
    """Reference log-probabilities of a LoRA policy: its own forward with its adapters switched off
    (:func:`~rlhf_lightning.models.lora.adapters_disabled`), i.e. the base model's distribution, without autograd
    (the reference of TRL's and verl's LoRA training; no second copy of the model).

    Args:
        policy: a causal LM with LoRA adapters.
        rollout: the sampled sequences.
        temperature: the sampling temperature (log-probabilities are computed at it).
        trunk: the shared frozen trunk's output for these rows (the blocks below the adapters), if any.
        packed: the rows run padding-free (:func:`~rlhf_lightning.models.forward.pack`).

    Returns:
        (B, R) float32 log-probabilities of the response tokens (nats), 0 at padding and at the environment's
        tokens.
    """
    from rlhf_lightning.models.lora import adapters_disabled

    with adapters_disabled(policy), torch.inference_mode():
        ref = response_logprobs(policy, rollout.input_ids, rollout.attention_mask, rollout.response_start,
                                temperature, trunk=trunk, packed=packed)
    return ref.clone().masked_fill(~rollout.policy_mask, 0.0)


def logprob_diff(exp: Experience, counts: BatchCounts | None = None) -> torch.Tensor:
    """``rollout/logprob_diff``: mean |sampler log-probability − trainer log-probability| over the policy's tokens
    (:attr:`Experience.loss_mask`).

    The sampler's log-probabilities are recorded while decoding (``Rollout.sampler_logprobs``), the
    trainer's are the old log-probabilities of the update (``Experience.logprobs``), both at the
    sampling temperature. PPO's ratios assume they are one distribution: with the HF sampler on CPU
    in float32 the difference is rounding; a larger one means the trainer computes another
    distribution than the one sampled (a family's logit transform skipped, dropout on, a trunk that
    is not exact, another inference engine's numerics).

    Args:
        exp: the experience (sampler and old log-probabilities).
        counts: the whole batch's counts over processes (:class:`~rlhf_lightning.algorithms.ops.BatchCounts`): this
            process's share of the mean over every process's tokens (:func:`~rlhf_lightning.algorithms.ops.token_mean`);
            ``None``: this batch's mean.

    Returns:
        () float32 tensor, in nats; NaN when either side is missing.
    """
    if exp.rollout.sampler_logprobs is None or exp.logprobs is None:
        return torch.tensor(float("nan"))
    return token_mean((exp.rollout.sampler_logprobs - exp.logprobs).abs(), exp.loss_mask, counts)


def function_rewards(functions, rollout: Rollout, tokenizer, datamodule=None, prompt_index: torch.Tensor | None = None
                     ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Reward functions on a rollout's decoded responses, with TRL's arguments: ``completions`` (text; a multi-turn
    trajectory whole, the environment's messages and the chat template's role markers included:
    :func:`~rlhf_lightning.rollout.sampler.decode_responses`), ``prompts`` (the dataset's chat messages when the
    datamodule has them, else the decoded prompt), ``completion_ids`` (the trajectory's tokens), multi-turn:
    ``final_turns`` (the policy's last turn, :func:`~rlhf_lightning.rollout.sampler.final_turns`), and the dataset's
    other columns (``PromptDataModule.columns``) (:func:`~rlhf_lightning.rewards.functions.score_with_functions`).

    Args:
        functions: loaded reward functions (:func:`~rlhf_lightning.rewards.functions.load_reward_functions`).
        rollout: the sampled sequences (N rows).
        tokenizer: decodes prompts and responses.
        datamodule: with ``prompts`` and ``columns`` (a :class:`~rlhf_lightning.data.PromptDataModule`), or
            ``None``.
        prompt_index: (N,) long, the rows' prompts' indices in the datamodule; ``None``: decoded prompts, no columns.

    Returns:
        ``(total, per_function)``: the weighted total (N,) float32 and each function's unweighted rewards (N,)
        float32 by name, on the rollout's device.

    Raises:
        RewardFunctionError: a function raised or returned a bad value (one line naming it and the row).
    """
    completions = decode_responses(tokenizer, rollout)
    completion_ids = [ids[mask].tolist() for ids, mask in zip(rollout.response_ids, rollout.response_mask,
                                                              strict=True)]
    rows = prompt_index.tolist() if prompt_index is not None else None
    if rows is not None and datamodule is not None and hasattr(datamodule, "columns"):
        prompts, columns = [datamodule.prompts[i] for i in rows], datamodule.columns(rows)
    else:
        prompts = tokenizer.batch_decode(rollout.input_ids[:, : rollout.response_start], skip_special_tokens=True)
        columns = {}
    total, per_function = score_with_functions(
        functions, completions, prompts, columns, completion_ids=completion_ids, row_ids=rows,
        final_turns=final_turns(tokenizer, rollout) if rollout.multi_turn else None)
    device = rollout.input_ids.device
    return total.to(device), {name: values.to(device) for name, values in per_function.items()}
