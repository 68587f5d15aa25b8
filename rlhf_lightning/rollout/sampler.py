"""Sampling responses from the policy: :func:`generate` → :class:`Rollout`.

The HF backend (``ppo.generation.backend=hf``): a KV-cached decoding loop over the policy's own forward
(:func:`sample_responses`) that records the log-probability each token was drawn with. The vLLM backend
(:mod:`rlhf_lightning.rollout.vllm_engine`) fills the same :class:`Rollout`. What the update needs about the
responses (scores, reference log-probabilities, values) is computed from it by
:func:`rlhf_lightning.rollout.experience.make_experience`.

A rollout's sequences are laid out as ``[left padding | prompt (P columns) | response (R columns)]``:
prompts come left-padded from :class:`~rlhf_lightning.data.PromptCollator`, and ``generate``
appends R ≤ ``max_new_tokens`` columns. Everything after a response's first EOS is padding. A multi-turn
rollout (:mod:`rlhf_lightning.rollout.agent`) has the same layout, its response columns holding the whole
trajectory (the policy's turns and the environment's answers), with a ``loss_mask`` marking the policy's own
tokens."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn

from rlhf_lightning.algorithms.ops import (
    logprobs_from_logits,
    position_ids_from_mask,
    response_mask_from_eos,
    sample_from_logits,
    sampling_noise,
    truncates,
    truncation_log_mass,
)
from rlhf_lightning.config.schema import GenerationConfig
from rlhf_lightning.models.trunk import TrunkOutput, backbone_of, trunk_view


@dataclass(frozen=True)
class Rollout:
    """Sampled responses to a batch of prompts (what :func:`generate` returns).

    Shapes: B prompts, P prompt columns, R response columns, T = P + R.

    Attributes:
        input_ids: (B, T) long, prompt + response (padding after each response's EOS).
        attention_mask: (B, T) long, 1 on prompt tokens and on response tokens up to EOS.
        response_start: P, the column of the first response token.
        response_mask: (B, R) bool, True up to and including the first EOS; in a multi-turn rollout, on every
            token of the trajectory (the policy's and the environment's: what is attended).
        ends_with_eos: (B,) bool; multi-turn: whether the policy's last turn ended with its EOS (not cut by a
            token budget).
        sampler_logprobs: (B, R) float32, the log-probability each response token was drawn with: under
            the distribution it was sampled from (temperature, then top-k/top-p, renormalised: the
            "processed" log-probability, as vLLM's ``processed_logprobs`` and TRL record it; 0 where masked).
            Compared with the trainer's by :func:`logprob_diff`, and the denominator of the TIS weights.
        loss_mask: (B, R) bool, True on the tokens the policy sampled (verl's ``response_mask``, SkyRL's
            ``loss_masks``): a multi-turn rollout's environment and tool tokens are False. ``None``: every response
            token is the policy's (a single-turn rollout); read it through :attr:`policy_mask`.
        env_rewards: (B,) float32, multi-turn: the environment's rewards summed over each episode (``None``: none).
        episode_stats: multi-turn: name → (B,) float32 per-episode counts
            (:func:`~rlhf_lightning.rollout.agent.run_episodes`: turns, tool calls, errors and cuts by kind).
        trunk: the output of the policy's frozen lower blocks kept while sampling (``generate``'s
            ``trunk_depth``): (B, T, H), or (B, T + 1, H) on the scoring inputs (:func:`scoring_inputs`) with
            ``score_eos_token_id``; what :meth:`~rlhf_lightning.models.trunk.SharedTrunk.compute` would compute for
            those columns, so it is not computed again. ``None``: not kept (vLLM, rows padded or stacked).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    response_start: int
    response_mask: torch.Tensor
    ends_with_eos: torch.Tensor
    sampler_logprobs: torch.Tensor | None = None
    loss_mask: torch.Tensor | None = None
    env_rewards: torch.Tensor | None = None
    episode_stats: dict[str, torch.Tensor] | None = None

    @property
    def policy_mask(self) -> torch.Tensor:
        """(B, R) bool, the tokens the policy sampled: ``loss_mask``, or ``response_mask`` when there is none. Every
        loss, the KL, the values, GAE, the entropy, ``rollout/logprob_diff`` and the TIS weights read this mask."""
        return self.response_mask if self.loss_mask is None else self.loss_mask

    @property
    def multi_turn(self) -> bool:
        """Whether the rollout has environment tokens among its responses' (a ``loss_mask``)."""
        return self.loss_mask is not None
    trunk: TrunkOutput | None = None

    @property
    def response_ids(self) -> torch.Tensor:
        """(B, R) long response tokens (padding after EOS)."""
        return self.input_ids[:, self.response_start :]

    def to(self, device) -> Rollout:
        """The same rollout with its tensors on ``device``."""
        return self.map_rows(lambda t: t.to(device))

    def map_rows(self, fn) -> Rollout:
        """The same rollout with ``fn`` applied to each of its per-row tensors (all but ``response_start``; the kept
        trunk's (B, T, H) ``hidden`` too)."""
        apply = lambda t: None if t is None else fn(t)  # noqa: E731
        stats = None if self.episode_stats is None else {k: fn(v) for k, v in self.episode_stats.items()}
        return replace(self, input_ids=fn(self.input_ids), attention_mask=fn(self.attention_mask),
                       response_mask=fn(self.response_mask), ends_with_eos=fn(self.ends_with_eos),
                       sampler_logprobs=apply(self.sampler_logprobs), loss_mask=apply(self.loss_mask),
                       env_rewards=apply(self.env_rewards), episode_stats=stats,
                       trunk=None if self.trunk is None else replace(self.trunk, hidden=fn(self.trunk.hidden)))


def run_seed() -> int:
    """The run's seed: ``PL_GLOBAL_SEED``, which Lightning's ``seed_everything`` sets (``train.py`` calls it with
    the config's ``seed``) and passes to every process; without it, torch's initial seed of this process."""
    import os

    base = os.environ.get("PL_GLOBAL_SEED")
    return int(base) if base is not None else torch.initial_seed()


def prompt_noise(seed: int, prompt_index: torch.Tensor | None, steps: int, *key: int,
                 group: int = 1) -> torch.Tensor | None:
    """The sampling numbers (:func:`~rlhf_lightning.algorithms.ops.sampling_noise`) of rows that answer the prompts
    ``prompt_index`` ``group`` times each (the rows of one prompt contiguous, as
    ``repeat_interleave(group)`` lays them out): row keys ``(*key, prompt index, generation index)``.

    Args:
        seed: the run's seed (:func:`run_seed`) or an evaluation's seed.
        prompt_index: ``(n,)`` long, the prompts' dataset indices; ``None``: no keys, returns ``None``
            (the sampler then draws from torch's generator).
        steps: numbers per row (the generation budget).
        key: what else identifies the draw (PPO: iteration and dynamic-sampling round).
        group: responses per prompt.

    Returns:
        ``(n * group, steps)`` float64 on ``prompt_index``'s device, or ``None``.
    """
    if prompt_index is None:
        return None
    rows = prompt_index.reshape(-1).long().repeat_interleave(group)
    generation = torch.arange(group, device=rows.device).repeat(prompt_index.numel())
    head = torch.tensor(key, dtype=torch.long, device=rows.device).expand(rows.numel(), len(key))
    return sampling_noise(seed, torch.cat([head, rows[:, None], generation[:, None]], 1), steps)


#: Decoding drops the rows that ended (their rows of the KV cache selected away) once they are at least this share of
#: the rows it still runs: a drop copies every layer's cache, so it waits until enough rows go at once. A decode step's
#: time grows with its rows (SmolLM2 on one CPU thread: ≈ 98 ms + 4.9 ms a row, ``bench/profile_issue26.md``).
DROP_FINISHED_SHARE = 0.25


class _HiddenKeeper:
    """The residual stream entering block ``depth`` of the policy at every column the sampler feeds, written
    into one (N, width, H) buffer by a forward pre-hook on that block (``width``: every column a rollout can
    have, the scoring inputs' extra one included; columns never fed stay 0). The sampler sets :attr:`rows`
    (the original rows of the batch it runs, ``None``: all), :attr:`column` (the first column fed) and
    :attr:`repeat` (prompts prefilled once for ``repeat`` rows each) before each forward."""

    def __init__(self, block: nn.Module, rows: int, width: int):
        self.buffer: torch.Tensor | None = None
        self.shape = (rows, width)
        self.rows: torch.Tensor | None = None
        self.column, self.repeat = 0, 1
        self.handle = block.register_forward_pre_hook(self._keep, with_kwargs=True)

    def _keep(self, module, args, kwargs) -> None:
        hidden = args[0] if args else kwargs["hidden_states"]  # (b, w, H)
        if self.buffer is None:
            self.buffer = hidden.new_zeros(*self.shape, hidden.shape[-1])
        if self.repeat > 1:
            hidden = hidden.repeat_interleave(self.repeat, 0)
        columns = slice(self.column, self.column + hidden.shape[1])
        if self.rows is None:
            self.buffer[:, columns] = hidden
        else:
            self.buffer[self.rows, columns] = hidden


@torch.no_grad()
def sample_responses(policy: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                     config: GenerationConfig, eos_token_id: int | list[int], pad_token_id: int,
                     do_sample: bool = True, noise: torch.Tensor | None = None, group: int = 1,
                     trunk_depth: int | None = None, score_eos_token_id: int | None = None):
    """Decode up to ``config.max_new_tokens`` tokens for each of ``group`` responses per prompt, with a KV cache.

    A plain loop over the causal LM's forward (``past_key_values``, ``logits_to_keep=1``): one
    prefill of the distinct prompts, their KV cache then repeated ``group`` times (each prompt's
    responses contiguous: row ``b · group + g`` is prompt b's g-th response), then one token per step,
    drawn by :func:`~rlhf_lightning.algorithms.ops.sample_from_logits` (temperature, top-k, top-p) or
    greedily. Rows that have produced an EOS get ``pad_token_id`` afterwards; decoding stops when every
    row has or at the length limit. A row that ended leaves the decoded batch once its EOS has been fed
    (rows are dropped together, when at least :data:`DROP_FINISHED_SHARE` of the batch can go): its
    tokens and log-probabilities are already final, and every other row's are computed from its own
    cache rows, so what each row samples is what it samples in the full batch (up to the rounding of
    products over fewer rows); without ``noise`` the step's numbers are still drawn for every row (the
    same stream of torch's generator as with no row dropped).

    Distributed: every rank runs the same number of forwards (sharded models all-gather their
    weights in each), whatever its rows and its own ``max_new_tokens``: the ranks agree on the
    largest limit (one all-reduce), a rank past its own limit, or whose rows all ended, keeps stepping
    with at least one row, and decoding stops when every row of every rank has ended (one all-reduce a
    step).

    Args:
        policy: a transformers causal LM (accepts ``past_key_values``, ``position_ids`` and
            ``logits_to_keep``), in eval mode.
        input_ids, attention_mask: (B, P) left-padded prompts, each answered ``group`` times.
        config: sampling settings. eos_token_id, pad_token_id: the tokenizer's.
        do_sample: False for greedy decoding.
        noise: ``(B · group, S)`` numbers in [0, 1), S >= ``max_new_tokens``: row r's step t reads
            ``noise[r, t]`` (:func:`prompt_noise`: responses independent of the batch); ``None``: drawn from
            torch's global generator at each step (one number per row).
        group: responses per prompt (≥ 1).
        trunk_depth: d ≥ 1: also keep the residual stream entering the policy's block d (the output of a
            frozen trunk of d blocks, :mod:`rlhf_lightning.models.trunk`) at every column of the rollout,
            the last sampled token's computed by one more forward of the first d blocks on the KV cache;
            ``None``: nothing kept.
        score_eos_token_id: with ``trunk_depth``, the scoring inputs' extra column is kept too
            (:func:`scoring_inputs`: this EOS after the rows cut without one).

    Returns:
        tokens (B · group, R) long, R ≤ ``config.max_new_tokens``, and the log-probability of each under the
        distribution it was drawn from (B · group, R) float32: the policy's at ``config.temperature`` (what
        the trainer's :func:`~rlhf_lightning.models.forward.response_logprobs` computes for the same token),
        renormalised over the tokens top-k/top-p keep when they truncate (the "processed"
        log-probability); greedy decoding records the temperature distribution's; 0 after EOS. With
        ``trunk_depth``, a third item: the kept states (B · group, P + R (+ 1 with ``score_eos_token_id``),
        H) in the policy's dtype, or ``None`` when this rank decoded past its own limit (the others' was
        larger).

    Raises:
        ValueError: ``noise`` not ``(B · group, S)`` with S >= ``max_new_tokens``; ``group`` < 1.
    """
    from transformers import DynamicCache

    limit = config.max_new_tokens
    if group < 1:
        raise ValueError(f"group must be >= 1, got {group}")
    batch, prompt_len = input_ids.shape[0] * group, input_ids.shape[1]
    if noise is not None and (noise.dim() != 2 or noise.shape[0] != batch or noise.shape[1] < limit):
        raise ValueError(f"noise must be ({batch}, >= {limit}), got {tuple(noise.shape)}")
    device = input_ids.device
    eos = torch.as_tensor(eos_token_id, device=device).reshape(-1)
    steps = max_over_ranks(limit, device)
    keeper = None
    if trunk_depth is not None:
        keeper = _HiddenKeeper(backbone_of(policy).layers[trunk_depth], batch, prompt_len + steps + 1)
        keeper.repeat = group
    try:
        cache = DynamicCache(config=policy.config)
        mask = attention_mask.long()
        positions = position_ids_from_mask(mask)
        out = policy(input_ids=input_ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                     use_cache=True, logits_to_keep=1)
        logits = out.logits[:, -1]  # (B, V)
        if group > 1:  # each prompt prefilled once, its cache repeated for its responses
            cache.batch_repeat_interleave(group)
            logits, mask, positions = (t.repeat_interleave(group, 0) for t in (logits, mask, positions))
        if keeper is not None:
            keeper.repeat = 1
        next_position = positions[:, -1:] + 1  # (N, 1): prompts end at the last column
        rows = torch.arange(batch, device=device)  # the original row of each decoded row
        finished = torch.zeros(batch, dtype=torch.bool, device=device)
        tokens = torch.full((batch, steps), pad_token_id, dtype=torch.long, device=device)
        logprobs = None  # (N, steps), in the dtype of the log-probabilities (float32; float64 for a float64 policy)
        processed = do_sample and truncates(config.top_k, config.top_p)
        everyone = rows.numel()
        for step in range(steps):
            if do_sample:
                if noise is not None:
                    uniform = noise[rows, step] if step < noise.shape[1] else None
                else:  # torch's generator: one number per row of the whole batch, as without dropped rows
                    uniform = torch.rand(batch, dtype=torch.float64, device=device)[rows]
                token = sample_from_logits(logits, config.temperature, config.top_k, config.top_p, uniform=uniform)
            else:
                token = logits.argmax(-1)
            logprob = logprobs_from_logits(logits, token, config.temperature)
            if processed:
                logprob = logprob - truncation_log_mass(logits, config.temperature, config.top_k, config.top_p)
            ended = finished[rows]  # rows that ended before this step: their EOS was fed at the last forward
            token = token.masked_fill(ended, pad_token_id)
            tokens[rows, step] = token
            if logprobs is None:
                logprobs = torch.zeros(batch, steps, dtype=logprob.dtype, device=device)
            logprobs[rows, step] = logprob.masked_fill(ended, 0.0)
            finished[rows] |= torch.isin(token, eos)
            if step + 1 >= limit:
                finished.fill_(True)  # this rank's limit: its rows are done, its forwards go on with the others'
            if step + 1 == steps or all_finished(finished):
                break
            dropped = int(ended.sum())
            if dropped and dropped >= DROP_FINISHED_SHARE * rows.numel():
                keep = ~ended
                keep[0] |= not bool(keep.any())  # a row stays: the forwards go on in lock-step with the ranks
                index = keep.nonzero().squeeze(1)
                cache.batch_select_indices(index)
                rows, mask, next_position, token = rows[index], mask[index], next_position[index], token[index]
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
            if keeper is not None:
                keeper.rows, keeper.column = (None if rows.numel() == everyone else rows), prompt_len + step
            out = policy(input_ids=token[:, None], attention_mask=mask, position_ids=next_position,
                         past_key_values=cache, use_cache=True)
            logits = out.logits[:, -1]
            next_position = next_position + 1
        width = min(step + 1, limit)
        tokens, logprobs = tokens[:, :width], logprobs[:, :width]
        if keeper is None:
            return tokens, logprobs
        if step + 1 > limit:  # decoded past this rank's limit: the cache holds columns the rollout does not
            return tokens, logprobs, None
        # the columns never fed: the last sampled token, and the scoring inputs' extra column
        last = tokens[rows, width - 1]
        tail, tail_mask = last[:, None], mask.new_ones(rows.numel(), 1)
        if score_eos_token_id is not None:
            cut = ~torch.isin(tokens[rows], eos).any(1)  # rows without an EOS get one appended to be scored
            tail = torch.cat([tail, torch.where(cut, score_eos_token_id, last)[:, None]], 1)
            tail_mask = torch.cat([tail_mask, cut.to(mask.dtype)[:, None]], 1)
        keeper.rows, keeper.column = (None if rows.numel() == everyone else rows), prompt_len + width - 1
        _trunk_forward(policy, trunk_depth, tail, torch.cat([mask, tail_mask], 1),
                       next_position + torch.arange(tail.shape[1], device=device), cache, keeper)
        kept = keeper.buffer[:, : prompt_len + width + (score_eos_token_id is not None)]
        return tokens, logprobs, kept
    finally:
        if keeper is not None:
            keeper.handle.remove()


def _trunk_forward(policy: nn.Module, depth: int, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   position_ids: torch.Tensor, cache, keeper: _HiddenKeeper) -> None:
    """Run the policy's first ``depth`` blocks on (b, w) new tokens after the KV cache and write their output,
    the residual stream entering block ``depth``, through ``keeper`` (its hook does not run: the block does not)."""
    hidden = trunk_view(policy, depth)(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                       past_key_values=cache, use_cache=True).last_hidden_state
    keeper._keep(None, (hidden,), {})


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized() \
        and torch.distributed.get_world_size() > 1


def max_over_ranks(value: int, device: torch.device) -> int:
    """The largest ``value`` over all ranks (``value`` itself when not distributed)."""
    if not _distributed():
        return value
    t = torch.tensor(value, dtype=torch.int64, device=device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return int(t)


def all_finished(finished: torch.Tensor) -> bool:
    """Whether every row of every rank has ended (one host sync; one all-reduce when distributed)."""
    done = finished.all()
    if _distributed():
        flag = done.to(torch.int32)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
        done = flag.bool()
    return bool(done)


@torch.no_grad()
def generate(policy: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, config: GenerationConfig,
             eos_token_id: int | list[int], pad_token_id: int, do_sample: bool = True, engine=None,
             noise: torch.Tensor | None = None, group: int = 1, trunk_depth: int | None = None,
             score_eos_token_id: int | None = None) -> Rollout:
    """Sample ``group`` responses to each prompt (:func:`sample_responses`, or a vLLM engine's) and cut each after
    its first EOS.

    Args:
        policy: a causal LM (put in eval mode while sampling, then restored).
        input_ids, attention_mask: (B, P) left-padded prompts.
        config: sampling settings.
        eos_token_id, pad_token_id: the tokenizer's.
        do_sample: False for greedy decoding (sample tables before/after training).
        engine: a :class:`~rlhf_lightning.rollout.vllm_engine.VLLMEngine` holding the policy's current weights
            samples instead of the policy's own forward (``ppo.generation.backend=vllm``); ``None``: the
            KV-cached loop.
        noise: the KV-cached loop's per-row numbers, (B · group, S) (:func:`sample_responses`;
            :func:`prompt_noise`); ``None``: torch's global generator. vLLM draws from its own generator
            (seeded per engine) and ignores it.
        group: responses per prompt (rows of one prompt contiguous); the KV-cached loop prefills each prompt once.
        trunk_depth, score_eos_token_id: the KV-cached loop keeps the output of the policy's first
            ``trunk_depth`` blocks at every column (of the scoring inputs with ``score_eos_token_id``) in
            ``Rollout.trunk`` (:func:`sample_responses`); ``None``: not kept (nor with an engine).

    Returns:
        A :class:`Rollout` of B · group rows with tokens and masks (no scores yet).
    """
    if engine is not None:
        if group > 1:
            input_ids, attention_mask = (t.repeat_interleave(group, 0) for t in (input_ids, attention_mask))
        response, sampler_logprobs = engine.sample(input_ids, attention_mask, eos_token_id, pad_token_id,
                                                   do_sample=do_sample)  # (B, R) each
        return _cut_at_eos(input_ids, attention_mask, response, sampler_logprobs, eos_token_id, pad_token_id)
    was_training = policy.training
    policy.eval()
    try:
        out = sample_responses(policy, input_ids, attention_mask, config, eos_token_id, pad_token_id,
                               do_sample=do_sample, noise=noise, group=group, trunk_depth=trunk_depth,
                               score_eos_token_id=score_eos_token_id)  # (N, R) each [, kept states]
    finally:
        policy.train(was_training)
    if group > 1:
        input_ids, attention_mask = (t.repeat_interleave(group, 0) for t in (input_ids, attention_mask))
    rollout = _cut_at_eos(input_ids, attention_mask, out[0], out[1], eos_token_id, pad_token_id)
    if trunk_depth is not None and out[2] is not None:
        rollout = replace(rollout, trunk=TrunkOutput(out[2], trunk_depth))
    return rollout


def _cut_at_eos(input_ids: torch.Tensor, attention_mask: torch.Tensor, response: torch.Tensor,
                sampler_logprobs: torch.Tensor, eos_token_id: int | list[int], pad_token_id: int) -> Rollout:
    """The :class:`Rollout` of prompts (B, P) and sampled responses (B, R): padding after each first EOS."""
    prompt_len = input_ids.shape[1]
    response_mask, ends_with_eos = response_mask_from_eos(response, eos_token_id)
    response = response.masked_fill(~response_mask, pad_token_id)
    return Rollout(
        input_ids=torch.cat([input_ids, response], dim=1),
        attention_mask=torch.cat([attention_mask, response_mask.long()], dim=1),
        response_start=prompt_len, response_mask=response_mask, ends_with_eos=ends_with_eos,
        sampler_logprobs=sampler_logprobs.masked_fill(~response_mask, 0.0),
    )


def pad_responses(rollout: Rollout, width: int, pad_token_id: int) -> Rollout:
    """The rollout with its response columns padded to ``width`` (≥ R): pad tokens, masked, log-probability 0."""
    extra = width - rollout.response_mask.shape[1]
    if extra <= 0:
        return rollout
    batch = rollout.input_ids.shape[0]

    def widen(t: torch.Tensor, value) -> torch.Tensor:
        return torch.cat([t, t.new_full((batch, extra), value)], 1)

    return replace(rollout, input_ids=widen(rollout.input_ids, pad_token_id),
                   attention_mask=widen(rollout.attention_mask, 0), response_mask=widen(rollout.response_mask, False),
                   sampler_logprobs=(widen(rollout.sampler_logprobs, 0.0) if rollout.sampler_logprobs is not None
                                     else None),
                   loss_mask=widen(rollout.loss_mask, False) if rollout.loss_mask is not None else None,
                   trunk=None)  # the kept trunk covers the old columns only


def select_rows(rollout: Rollout, index: torch.Tensor) -> Rollout:
    """The rollout restricted to rows ``index`` ((n,) long), in that order."""
    return rollout.map_rows(lambda t: t[index])


def pad_prompts(rollout: Rollout, width: int, pad_token_id: int) -> Rollout:
    """The rollout with its prompt columns left-padded to ``width`` (≥ P): pad tokens, not attended. Positions
    come from the attention mask (:func:`~rlhf_lightning.algorithms.ops.position_ids_from_mask`), so every
    network reads the same sequence."""
    extra = width - rollout.response_start
    if extra <= 0:
        return rollout
    ids, mask = rollout.input_ids, rollout.attention_mask
    return replace(rollout, input_ids=torch.cat([ids.new_full((ids.shape[0], extra), pad_token_id), ids], 1),
                   attention_mask=torch.cat([mask.new_zeros(mask.shape[0], extra), mask], 1), response_start=width,
                   trunk=None)


def stack_rollouts(rollouts: list[Rollout], pad_token_id: int) -> Rollout:
    """One rollout of the rows of ``rollouts`` in order, their prompts left-padded to the widest prompt
    (:func:`pad_prompts`) and their responses right-padded to the longest response (:func:`pad_responses`).

    Raises:
        ValueError: no rollout, or some with sampler log-probabilities (or a ``loss_mask``) and some without.
    """
    if not rollouts:
        raise ValueError("stack_rollouts: no rollout")
    if len({r.sampler_logprobs is None for r in rollouts}) > 1:
        raise ValueError("stack_rollouts: some rollouts have sampler log-probabilities and some do not")
    if len({r.loss_mask is None for r in rollouts}) > 1 or len({r.episode_stats is None for r in rollouts}) > 1:
        raise ValueError("stack_rollouts: some rollouts are multi-turn (a loss_mask) and some are not")
    prompt = max(r.response_start for r in rollouts)
    response = max(r.response_mask.shape[1] for r in rollouts)
    parts = [pad_responses(pad_prompts(r, prompt, pad_token_id), response, pad_token_id) for r in rollouts]
    cat = lambda name: (None if getattr(parts[0], name) is None  # noqa: E731
                        else torch.cat([getattr(p, name) for p in parts]))
    return Rollout(input_ids=cat("input_ids"), attention_mask=cat("attention_mask"), response_start=prompt,
                   response_mask=cat("response_mask"), ends_with_eos=cat("ends_with_eos"),
                   sampler_logprobs=cat("sampler_logprobs"), loss_mask=cat("loss_mask"), env_rewards=cat("env_rewards"),
                   episode_stats=None if parts[0].episode_stats is None else
                   {k: torch.cat([p.episode_stats[k] for p in parts]) for k in parts[0].episode_stats})


def final_turns(tokenizer, rollout: Rollout) -> list[str]:
    """The text of each row's last run of policy tokens (:attr:`Rollout.policy_mask`): a multi-turn trajectory's
    final turn (the answer, when the episode ended with one), special tokens skipped; a row without a policy
    token gives ``""``."""
    out = []
    for ids, mask in zip(rollout.response_ids.cpu(), rollout.policy_mask.cpu(), strict=True):
        where = mask.nonzero().flatten().tolist()
        if not where:
            out.append("")
            continue
        start = end = where[-1]
        while start > 0 and bool(mask[start - 1]):
            start -= 1
        out.append(tokenizer.decode(ids[start:end + 1].tolist(), skip_special_tokens=True))
    return out


def decode_responses(tokenizer, rollout: Rollout) -> list[str]:
    """The rollout's responses as text: special tokens skipped; a multi-turn trajectory whole, its role markers kept
    (so the turns and the environment's messages stay apart), its padding left out."""
    if not rollout.multi_turn:
        return tokenizer.batch_decode(rollout.response_ids, skip_special_tokens=True)
    return [tokenizer.decode(ids[mask].tolist(), skip_special_tokens=False)
            for ids, mask in zip(rollout.response_ids.cpu(), rollout.response_mask.cpu(), strict=True)]
