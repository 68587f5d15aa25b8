"""Sampling: our KV-cached decoding loop against transformers' generate, and the sampler's distribution."""

from __future__ import annotations

import math

import pytest
import torch

from rlhf_lightning.algorithms.ops import sample_from_logits
from rlhf_lightning.rollout.sampler import GenerationConfig, Rollout, generate, sample_responses


def _draw(logits: torch.Tensor, n: int, **kwargs) -> torch.Tensor:
    """Frequencies of n draws from one (V,) row of logits: (V,) float."""
    gen = torch.Generator().manual_seed(0)
    tokens = sample_from_logits(logits.expand(n, -1), generator=gen, **kwargs)
    return torch.bincount(tokens, minlength=logits.shape[-1]).float() / n


LOGITS = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -math.inf])


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampler_matches_softmax(temperature):
    freq = _draw(LOGITS, 200_000, temperature=temperature)
    expected = torch.softmax(LOGITS / temperature, -1)
    assert torch.allclose(freq, expected, atol=4e-3)
    assert freq[-1] == 0  # -inf is never drawn


def test_sampler_top_k_and_top_p_keep_the_right_tokens():
    probs = torch.softmax(LOGITS, -1)  # ≈ .53 .20 .12 .07 .03 0
    freq = _draw(LOGITS, 100_000, top_k=2)
    assert torch.allclose(freq[:2], probs[:2] / probs[:2].sum(), atol=5e-3) and freq[2:].sum() == 0
    # nucleus 0.7: token 0 (.53) then token 1 (mass before it .53 < .7) are kept; token 2 (mass before .73) is not
    freq = _draw(LOGITS, 100_000, top_p=0.7)
    assert torch.allclose(freq[:2], probs[:2] / probs[:2].sum(), atol=5e-3) and freq[2:].sum() == 0
    # top-k first, then top-p within the k kept (renormalised): 0.5 keeps only the likeliest
    assert _draw(LOGITS, 1000, top_k=3, top_p=0.5)[0] == 1
    assert (_draw(LOGITS, 1000, top_p=1e-6)[0] == 1) and (_draw(LOGITS, 1000, top_k=1)[0] == 1)


def test_sampler_errors():
    for kwargs in ({"temperature": 0.0}, {"top_k": -1}, {"top_p": 0.0}, {"top_p": 1.5}):
        with pytest.raises(ValueError):
            sample_from_logits(LOGITS[None], **kwargs)
    with pytest.raises(ValueError):
        sample_from_logits(LOGITS)


def test_greedy_decoding_matches_transformers_generate(tiny_dir, tokenizer):
    from rlhf_lightning.models import load_policy

    policy = load_policy(tiny_dir).eval()
    torch.manual_seed(0)
    ids = torch.randint(5, 1000, (3, 7))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding
    mask[1, :1] = 0
    ids = ids.masked_fill(mask == 0, tokenizer.pad_token_id)
    config = GenerationConfig(max_new_tokens=12)
    eos = int(ids[2, -1])  # an id greedy decoding may well produce
    ours, _ = sample_responses(policy, ids, mask, config, eos, tokenizer.pad_token_id, do_sample=False)
    theirs = policy.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=12,
                             eos_token_id=eos, pad_token_id=tokenizer.pad_token_id)[:, ids.shape[1]:]
    assert torch.equal(ours, theirs)


def test_generate_cuts_after_eos_and_restores_train_mode(tiny_dir, tokenizer):
    from rlhf_lightning.models import load_policy

    policy = load_policy(tiny_dir)
    ids = torch.randint(5, 1000, (4, 5))
    mask = torch.ones_like(ids)
    vocab = policy.config.vocab_size
    ro = generate(policy, ids, mask, GenerationConfig(max_new_tokens=6, top_k=vocab // 2), list(range(vocab // 2)),
                  tokenizer.pad_token_id)
    assert policy.training
    # half the vocabulary is EOS: some rows end early; everything after the first EOS is masked and padded
    first_eos = ro.response_mask.sum(1)
    for row in range(4):
        assert (ro.response_ids[row, first_eos[row]:] == tokenizer.pad_token_id).all()
    assert torch.equal(ro.attention_mask[:, 5:], ro.response_mask.long())


def test_make_experience_applies_the_missing_eos_penalty_to_scores_only(tiny_dir, tokenizer):
    """``scores`` = reward model − penalty on rows without EOS; ``rm_scores`` keeps the reward model's own."""
    from rlhf_lightning.models import load_scalar_model
    from rlhf_lightning.models.forward import sequence_scores
    from rlhf_lightning.rollout.experience import make_experience
    from rlhf_lightning.rollout.sampler import Rollout

    reward_model = load_scalar_model(tiny_dir, frozen=True, seed=1)
    ids = torch.randint(5, 1000, (3, 7))
    mask = torch.ones_like(ids)
    ends = torch.tensor([True, False, True])
    ro = Rollout(input_ids=ids, attention_mask=mask, response_start=4, response_mask=torch.ones(3, 3, dtype=torch.bool),
                 ends_with_eos=ends)
    exp = make_experience(ro, reward_model, missing_eos_penalty=2.5)
    expected = sequence_scores(reward_model, ids, mask)
    torch.testing.assert_close(exp.rm_scores, expected)
    torch.testing.assert_close(exp.scores, expected - 2.5 * (~ends).float())
    assert exp.logprobs is None and exp.ref_logprobs is None and exp.values is None  # no such network given


def test_scoring_inputs_append_eos_to_cut_responses_only():
    from rlhf_lightning.rollout.experience import scoring_inputs
    from rlhf_lightning.rollout.sampler import Rollout

    ids = torch.tensor([[5, 6, 7, 8], [5, 6, 2, 0]])  # row 0 cut at the limit; row 1 ended with EOS (2), then pad 0
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
    ro = Rollout(input_ids=ids, attention_mask=mask, response_start=1,
                 response_mask=mask[:, 1:].bool(), ends_with_eos=torch.tensor([False, True]))
    score_ids, score_mask = scoring_inputs(ro, eos_token_id=2)
    assert score_ids[0].tolist() == [5, 6, 7, 8, 2] and score_mask[0].tolist() == [1, 1, 1, 1, 1]
    assert score_ids[1, :4].tolist() == [5, 6, 2, 0] and score_mask[1].tolist() == [1, 1, 1, 0, 0]


def test_make_experience_scores_cut_responses_at_an_appended_eos(tiny_dir, tokenizer):
    """With score_eos_token_id, a cut response's score is the reward model's at an EOS after it,
    with or without the shared trunk; a response that ended with EOS keeps its own score."""
    from rlhf_lightning.models import load_reference, load_scalar_model
    from rlhf_lightning.models.forward import sequence_scores
    from rlhf_lightning.models.trunk import SharedTrunk
    from rlhf_lightning.rollout.experience import make_experience

    reward_model = load_scalar_model(tiny_dir, frozen=True, seed=1)
    ref = load_reference(tiny_dir)
    eos = tokenizer.eos_token_id
    ids = torch.randint(5, 1000, (2, 8))
    ids[1, 6], ids[1, 7] = eos, tokenizer.pad_token_id
    mask = torch.ones_like(ids)
    mask[1, 7] = 0
    ro = Rollout(input_ids=ids, attention_mask=mask, response_start=4, response_mask=mask[:, 4:].bool(),
                 ends_with_eos=torch.tensor([False, True]))
    with_eos = torch.cat([ids[:1], torch.tensor([[eos]])], 1)
    expected = torch.stack([sequence_scores(reward_model, with_eos, torch.ones_like(with_eos))[0],
                            sequence_scores(reward_model, ids[1:, :7], mask[1:, :7])[0]])
    plain = make_experience(ro, reward_model, ref_policy=ref, score_eos_token_id=eos)
    torch.testing.assert_close(plain.scores, expected, rtol=1e-5, atol=1e-5)

    trunk = SharedTrunk({"ref_policy": ref, "reward_model": reward_model})
    exp = make_experience(ro, reward_model, ref_policy=ref, trunk=trunk, score_eos_token_id=eos)
    # the reward model's trunk covers the appended column, the reference's the rollout
    assert exp.trunks.reward_model.hidden.shape[1] == 9 and exp.trunks.ref_policy.hidden.shape[1] == 8
    torch.testing.assert_close(exp.scores, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(exp.ref_logprobs, plain.ref_logprobs, rtol=1e-5, atol=1e-5)


def _prompts(n: int, width: int, pad_token_id: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """n left-padded random prompts of at most ``width`` tokens: (n, width) ids and attention mask."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 1000, (n, width), generator=g)
    mask = torch.ones_like(ids)
    for row in range(n):
        mask[row, : row % 3] = 0
    return ids.masked_fill(mask == 0, pad_token_id), mask


def test_sampled_responses_do_not_depend_on_the_batch_with_per_row_noise(tiny_dir, tokenizer):
    """With keyed noise (prompt_noise), a prompt's responses are the same alone, at another position, beside other
    prompts, with another left padding: what makes N processes with B/N prompts sample as one process with B."""
    from rlhf_lightning.models import load_policy
    from rlhf_lightning.rollout.sampler import pad_prompts, prompt_noise

    policy = load_policy(tiny_dir).eval()
    pad = tokenizer.pad_token_id
    ids, mask = _prompts(4, 6, pad)
    index = torch.tensor([11, 5, 7, 30])
    config = GenerationConfig(max_new_tokens=8, top_k=50)
    noise = prompt_noise(3, index, config.max_new_tokens, 2, 0, group=2)  # 4 prompts x 2 generations
    ro = generate(policy, ids.repeat_interleave(2, 0), mask.repeat_interleave(2, 0), config, tokenizer.eos_token_id,
                  pad, noise=noise)
    assert not torch.equal(ro.response_ids[0], ro.response_ids[1])  # generation index: other responses
    # prompt 2 (rows 4, 5) alone, moved to the front, with two more columns of left padding
    alone = pad_prompts(Rollout(ids[2:3], mask[2:3], 6, torch.zeros(1, 0, dtype=torch.bool),
                                torch.zeros(1, dtype=torch.bool)), 8, pad)
    own = generate(policy, alone.input_ids.repeat(2, 1), alone.attention_mask.repeat(2, 1), config,
                   tokenizer.eos_token_id, pad, noise=prompt_noise(3, index[2:3], config.max_new_tokens, 2, 0, group=2))
    width = own.response_mask.shape[1]
    assert torch.equal(own.response_ids, ro.response_ids[4:6, :width])
    torch.testing.assert_close(own.sampler_logprobs, ro.sampler_logprobs[4:6, :width], rtol=1e-4, atol=1e-5)
    other_iteration = generate(policy, ids[2:3].repeat(2, 1), mask[2:3].repeat(2, 1), config, tokenizer.eos_token_id,
                               pad, noise=prompt_noise(3, index[2:3], config.max_new_tokens, 3, 0, group=2))
    assert not torch.equal(other_iteration.response_ids[:, :2], own.response_ids[:, :2])
    with pytest.raises(ValueError, match="noise"):
        generate(policy, ids, mask, config, tokenizer.eos_token_id, pad, noise=torch.zeros(4, 3))


def test_sampler_records_the_processed_logprob_of_the_distribution_it_drew_from(tiny_dir, tokenizer):
    """The sampler's log-probability is the trainer's (temperature) minus the log of the mass top-k keeps: the
    probability under the distribution the token was drawn from, as vLLM's processed_logprobs; without
    truncation it is the trainer's."""
    from rlhf_lightning.algorithms.ops import position_ids_from_mask, truncation_log_mass
    from rlhf_lightning.models import load_policy
    from rlhf_lightning.models.forward import response_logprobs

    policy = load_policy(tiny_dir).eval()
    ids, mask = _prompts(3, 5, tokenizer.pad_token_id, seed=1)
    for config in (GenerationConfig(max_new_tokens=4, temperature=0.7), GenerationConfig(max_new_tokens=4, top_k=20)):
        torch.manual_seed(0)
        ro = generate(policy, ids, mask, config, tokenizer.eos_token_id, tokenizer.pad_token_id)
        trainer = response_logprobs(policy, ro.input_ids, ro.attention_mask, ro.response_start, config.temperature)
        logits = policy(input_ids=ro.input_ids, attention_mask=ro.attention_mask,
                            position_ids=position_ids_from_mask(ro.attention_mask)).logits[:, ro.response_start - 1:-1]
        kept = torch.stack([truncation_log_mass(logits[:, t], config.temperature, config.top_k, config.top_p)
                            for t in range(logits.shape[1])], 1)
        expected = (trainer - kept).masked_fill(~ro.response_mask, 0.0)
        torch.testing.assert_close(ro.sampler_logprobs, expected, rtol=1e-4, atol=1e-4)
        assert (kept == 0).all() == (config.top_k == 0)
        if config.top_k:
            assert (ro.sampler_logprobs[ro.response_mask] > trainer[ro.response_mask]).all()  # renormalised


def test_stack_rollouts_pads_prompts_left_and_responses_right():
    from rlhf_lightning.rollout.sampler import stack_rollouts

    a = Rollout(input_ids=torch.tensor([[5, 6, 7, 2]]), attention_mask=torch.tensor([[1, 1, 1, 1]]), response_start=2,
                response_mask=torch.tensor([[True, True]]), ends_with_eos=torch.tensor([True]),
                sampler_logprobs=torch.tensor([[-1.0, -2.0]]))
    b = Rollout(input_ids=torch.tensor([[0, 8, 9, 4, 5, 6]]), attention_mask=torch.tensor([[0, 1, 1, 1, 1, 1]]),
                response_start=3, response_mask=torch.tensor([[True, True, True]]), ends_with_eos=torch.tensor([False]),
                sampler_logprobs=torch.tensor([[-0.5, -0.5, -0.5]]))
    out = stack_rollouts([a, b], pad_token_id=0)
    assert out.response_start == 3
    assert out.input_ids.tolist() == [[0, 5, 6, 7, 2, 0], [0, 8, 9, 4, 5, 6]]
    assert out.attention_mask.tolist() == [[0, 1, 1, 1, 1, 0], [0, 1, 1, 1, 1, 1]]
    assert out.response_mask.tolist() == [[True, True, False], [True, True, True]]
    assert out.sampler_logprobs.tolist() == [[-1.0, -2.0, 0.0], [-0.5, -0.5, -0.5]]
    assert out.ends_with_eos.tolist() == [True, False]
    assert torch.equal(out.response_ids[0, :2], a.response_ids[0])
    with pytest.raises(ValueError):
        stack_rollouts([], 0)


def _rows_per_forward(policy) -> tuple[list[int], object]:
    """The rows of every forward of ``policy``'s first block (a list filled by a hook), and the hook's handle."""
    from rlhf_lightning.models.trunk import backbone_of

    rows: list[int] = []
    handle = backbone_of(policy).layers[0].register_forward_pre_hook(
        lambda module, args, kwargs: rows.append((args[0] if args else kwargs["hidden_states"]).shape[0]),
        with_kwargs=True)
    return rows, handle


@pytest.mark.parametrize("keyed", [True, False])
def test_prefill_once_and_dropping_ended_rows_sample_what_the_full_batch_samples(tiny_dir, tokenizer, monkeypatch,
                                                                                 keyed):
    """Each prompt prefilled once for its G responses, and rows that ended dropped from the decoded batch: every
    row's tokens and log-probabilities are those of the full batch of G copies decoded to the end (with keyed noise,
    and with torch's generator: the same numbers are drawn), with fewer rows in the forwards."""
    import rlhf_lightning.rollout.sampler as sampler
    from rlhf_lightning.models import load_policy
    from rlhf_lightning.rollout.sampler import prompt_noise

    policy = load_policy(tiny_dir).eval()
    pad, group = tokenizer.pad_token_id, 4
    ids, mask = _prompts(3, 6, pad)
    eos = list(range(0, policy.config.vocab_size, 7))  # 1 token in 7 ends a response: rows end at different steps
    config = GenerationConfig(max_new_tokens=8, temperature=0.7)
    noise = prompt_noise(3, torch.tensor([4, 9, 2]), config.max_new_tokens, 1, 0, group=group) if keyed else None

    def sample(drop_share: float, **kwargs):
        monkeypatch.setattr(sampler, "DROP_FINISHED_SHARE", drop_share)
        rows, handle = _rows_per_forward(policy)
        torch.manual_seed(0)
        try:
            return generate(policy, config=config, eos_token_id=eos, pad_token_id=pad, noise=noise, **kwargs), rows
        finally:
            handle.remove()

    full, full_rows = sample(math.inf, input_ids=ids.repeat_interleave(group, 0),
                             attention_mask=mask.repeat_interleave(group, 0))
    once, once_rows = sample(0.25, input_ids=ids, attention_mask=mask, group=group)
    assert full_rows == [12] * len(full_rows)  # never dropped
    assert once_rows[0] == 3 and once_rows[1] == 12 and once_rows[-1] < 12  # prompts once; rows dropped
    assert len(once_rows) == len(full_rows)  # the same number of forwards
    ended = full.response_mask.sum(1)
    assert ended.min() < ended.max() and full.ends_with_eos.any()
    assert torch.equal(once.input_ids, full.input_ids) and torch.equal(once.attention_mask, full.attention_mask)
    torch.testing.assert_close(once.sampler_logprobs, full.sampler_logprobs, rtol=0, atol=1e-6)


@pytest.mark.parametrize("score_eos", [True, False])
def test_the_trunk_kept_while_sampling_is_the_trunk_of_the_rollout(tiny_dir, tokenizer, score_eos):
    """Rollout.trunk: the policy's first block's output at every column, from the prefill, the decoding (rows
    dropped included) and one forward of that block on the last token (and the scoring inputs' EOS column), equals
    SharedTrunk.compute on the rollout's (scoring) sequences at every attended column (1e-5)."""
    from rlhf_lightning.models import load_policy, load_reference
    from rlhf_lightning.models.trunk import SharedTrunk
    from rlhf_lightning.rollout.experience import scoring_inputs

    policy, reference = load_policy(tiny_dir, trainable_layers=1).eval(), load_reference(tiny_dir)
    trunk = SharedTrunk({"policy": policy, "ref_policy": reference})
    pad, eos_id = tokenizer.pad_token_id, tokenizer.eos_token_id
    ids, mask = _prompts(3, 6, pad)
    eos = [eos_id, *range(1, policy.config.vocab_size, 9)]
    config = GenerationConfig(max_new_tokens=7, temperature=0.7)
    torch.manual_seed(0)
    ro = generate(policy, ids, mask, config, eos, pad, group=3, trunk_depth=trunk.depth_of("policy"),
                  score_eos_token_id=eos_id if score_eos else None)
    assert ro.ends_with_eos.any() and not ro.ends_with_eos.all()
    seq, seq_mask = scoring_inputs(ro, eos_id) if score_eos else (ro.input_ids, ro.attention_mask)
    computed = trunk.compute(seq, seq_mask)["policy"]
    assert ro.trunk.depth == computed.depth == 1 and ro.trunk.hidden.shape == computed.hidden.shape
    attended = seq_mask.bool()
    torch.testing.assert_close(ro.trunk.hidden[attended], computed.hidden[attended], rtol=0, atol=1e-5)
    # SharedTrunk.compute takes it instead of running the trunk
    assert trunk.compute(seq, seq_mask, known={"policy": ro.trunk})["ref_policy"] is ro.trunk
    assert generate(policy, ids, mask, config, eos, pad).trunk is None  # not asked: not kept
