"""Sampling: our KV-cached decoding loop against transformers' generate, and the sampler's distribution."""

from __future__ import annotations

import math

import pytest
import torch

from rlhf_lightning.ops import sample_from_logits
from rlhf_lightning.rollout import GenerationConfig, Rollout, generate, sample_responses


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
    from rlhf_lightning.rollout import Rollout, make_experience

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
    from rlhf_lightning.rollout import Rollout, scoring_inputs

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
    from rlhf_lightning.rollout import make_experience

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
