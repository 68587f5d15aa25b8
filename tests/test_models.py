"""Model sources (tiny, GGUF package, local dirs, Hub ids) and the RLHF forward passes."""

from __future__ import annotations

import pytest
import torch

from rlhf_lightning.models import (
    SMOLLM2,
    SMOLLM2_GGUF,
    load_policy,
    load_reference,
    load_scalar_model,
    resolve_pretrained,
    score_head,
    train_top_layers,
)
from rlhf_lightning.models.forward import (
    call_cost_tokens,
    length_groups,
    response_logits,
    response_logprobs,
    response_values,
    right_padded_scores,
    sequence_scores,
    token_scores,
)


def test_resolve_pretrained_sources(tmp_path):
    assert resolve_pretrained("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert resolve_pretrained(str(tmp_path)) == str(tmp_path)
    with pytest.raises(FileNotFoundError, match="model directory not found"):
        resolve_pretrained(str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="not_a_real_package_xyz"):
        resolve_pretrained("pkg://not_a_real_package_xyz")
    with pytest.raises(FileNotFoundError, match="GGUF file not found"):
        resolve_pretrained(str(tmp_path), gguf_file="missing.gguf")


@pytest.mark.slow
def test_smollm2_from_gguf_package_matches_transformers_gguf_loader():
    """The cached safetensors conversion is the GGUF model transformers dequantises, weight for weight."""
    from transformers import AutoModelForCausalLM

    from rlhf_lightning.models.loading import package_dir

    cached = resolve_pretrained(SMOLLM2, SMOLLM2_GGUF)
    assert resolve_pretrained(SMOLLM2, SMOLLM2_GGUF) == cached  # converted once
    ours = load_policy(SMOLLM2, SMOLLM2_GGUF).eval()
    assert ours.config.num_hidden_layers == 30 and ours.config.hidden_size == 576
    assert getattr(ours.config, "quantization_config", None) is None  # a plain model: save_pretrained works
    direct = AutoModelForCausalLM.from_pretrained(str(package_dir(SMOLLM2)), gguf_file=SMOLLM2_GGUF).eval()
    ids = torch.tensor([[1, 4093, 28, 2683, 314, 253, 1345, 30, 2]])
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, direct(ids).logits, atol=1e-4, rtol=1e-4)


def test_frozen_models_and_top_layer_training(tiny_dir):
    ref = load_reference(tiny_dir)
    assert not ref.training and not any(p.requires_grad for p in ref.parameters())
    rm = load_scalar_model(tiny_dir, frozen=True)
    assert not rm.training and not any(p.requires_grad for p in rm.parameters())
    policy = load_policy(tiny_dir)
    assert policy.training and all(p.requires_grad for p in policy.parameters())
    train_top_layers(policy, 1)
    grads = {n for n, p in policy.named_parameters() if p.requires_grad}
    assert any(".layers.1." in n for n in grads) and not any(".layers.0." in n for n in grads)
    assert "model.embed_tokens.weight" not in grads and "model.norm.weight" in grads
    with pytest.raises(ValueError, match="trainable_layers"):
        train_top_layers(policy, -1)


def test_scalar_head_init_is_seeded_and_kept_after_export(tmp_path, tiny_dir, tokenizer):
    a, b = load_scalar_model(tiny_dir, seed=3), load_scalar_model(tiny_dir, seed=3)
    torch.testing.assert_close(a.score.weight, b.score.weight)
    assert not torch.equal(a.score.weight, load_scalar_model(tiny_dir, seed=4).score.weight)
    a.save_pretrained(tmp_path)
    torch.testing.assert_close(load_scalar_model(str(tmp_path), seed=99).score.weight, a.score.weight)
    # head=: a saved head dropped for zeros or a fresh seeded one; the backbone is the checkpoint's either way.
    zero = load_scalar_model(str(tmp_path), head="zero")
    assert not zero.score.weight.any()
    ids = torch.tensor([[1, 4093, 28, 2683]])
    assert not sequence_scores(zero, ids, torch.ones_like(ids)).any()
    fresh = load_scalar_model(str(tmp_path), head="normal", seed=3)
    torch.testing.assert_close(fresh.score.weight, load_scalar_model(tiny_dir, seed=3).score.weight)
    torch.testing.assert_close(zero.model.layers[0].mlp.up_proj.weight, a.model.layers[0].mlp.up_proj.weight)
    with pytest.raises(ValueError, match="head="):
        load_scalar_model(tiny_dir, head="random")


def _padded_pair(tokenizer):
    """Two prompts of different lengths, left-padded, each followed by 3 response tokens."""
    prompts = [[1, 4093, 28, 2683, 314], [1, 4093, 28]]
    response = [[253, 1345, 2], [1345, 30, 2]]
    width = max(map(len, prompts))
    pad = tokenizer.pad_token_id
    ids = [[pad] * (width - len(p)) + p + r for p, r in zip(prompts, response, strict=False)]
    mask = [[0] * (width - len(p)) + [1] * (len(p) + len(r)) for p, r in zip(prompts, response, strict=False)]
    return torch.tensor(ids), torch.tensor(mask), width, prompts, response


def test_response_logprobs_match_a_full_forward_and_ignore_left_padding(tiny_dir, tokenizer):
    policy = load_policy(tiny_dir).eval()
    ids, mask, start, prompts, response = _padded_pair(tokenizer)
    with torch.no_grad():
        ours, entropy = response_logprobs(policy, ids, mask, start, temperature=0.7, with_entropy=True)
        for row, (p, r) in enumerate(zip(prompts, response, strict=False)):
            alone = torch.tensor([p + r])  # no padding at all
            logits = policy(alone).logits[0, len(p) - 1 : -1] / 0.7
            expected = torch.log_softmax(logits, -1).gather(-1, torch.tensor(r)[:, None]).squeeze(-1)
            torch.testing.assert_close(ours[row], expected, atol=1e-5, rtol=1e-5)
            probs = torch.softmax(logits, -1)
            torch.testing.assert_close(entropy[row], -(probs * probs.log()).sum(-1), atol=1e-4, rtol=1e-4)


def test_logprobs_run_the_lm_head_on_valid_response_tokens_only(tiny_dir, tokenizer):
    """The LM head runs on the n valid response tokens only, as one (n, H) matrix (issue 26): log-probabilities,
    entropies and gradients are those of the head on every response position, read at the valid tokens (1e-6), and 0
    at padding; a row cut short (right padding) and a row with no valid token are fine."""
    from rlhf_lightning.algorithms.ops import entropy_from_logits, logprobs_from_logits

    policy = load_policy(tiny_dir)
    ids, mask, start, _, _ = _padded_pair(tokenizer)
    ids, mask = torch.cat([ids, ids[:1]]), torch.cat([mask, mask[:1]])
    mask[0, -1] = 0  # row 0's last token is padding
    mask[2, start:] = 0  # row 2 has no response token
    valid = mask[:, start:].bool()
    heads: list[tuple] = []
    handle = policy.get_output_embeddings().register_forward_hook(lambda m, args, out: heads.append(args[0].shape))
    ours, entropy = response_logprobs(policy, ids, mask, start, temperature=0.7, with_entropy=True)
    handle.remove()
    assert heads == [(int(valid.sum()), policy.config.hidden_size)]  # one 2-D product over the valid tokens
    ours.sum().backward()
    grads = {n: p.grad.clone() for n, p in policy.named_parameters() if p.grad is not None}
    policy.zero_grad(set_to_none=True)
    logits = response_logits(policy, ids, mask, start) / 0.7  # (B, R, V): every response position
    every = logprobs_from_logits(logits, ids[:, start:])
    every.masked_fill(~valid, 0.0).sum().backward()
    torch.testing.assert_close(ours, every.masked_fill(~valid, 0.0), rtol=0, atol=1e-6)
    torch.testing.assert_close(entropy, entropy_from_logits(logits.detach()).masked_fill(~valid, 0.0), rtol=0,
                               atol=1e-6)
    assert (ours[~valid] == 0).all() and (entropy[~valid] == 0).all()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, policy.get_parameter(name).grad, rtol=1e-5, atol=1e-7)


def test_scores_and_values_read_the_right_positions(tiny_dir, tokenizer):
    critic = load_scalar_model(tiny_dir).eval()
    ids, mask, start, _, _ = _padded_pair(tokenizer)
    right_padded = torch.cat([ids, torch.full((2, 2), tokenizer.pad_token_id)], 1)
    right_mask = torch.cat([mask, torch.zeros(2, 2, dtype=mask.dtype)], 1)
    with torch.no_grad():
        per_token = token_scores(critic, ids, mask)
        torch.testing.assert_close(sequence_scores(critic, ids, mask), per_token[:, -1])
        # Extra padding on the right does not move the score: it is read at the last attended token.
        torch.testing.assert_close(sequence_scores(critic, right_padded, right_mask), per_token[:, -1])
        torch.testing.assert_close(response_values(critic, ids, mask, start), per_token[:, start - 1 : -1])


def test_length_groups_partition_rows_with_bounded_padding():
    lengths = [63, 71, 81, 77, 51, 59, 108, 128]
    groups = length_groups(lengths, slack=0.1)
    assert sorted(r for g in groups for r in g) == list(range(8))
    for g in groups:
        padded, real = max(lengths[r] for r in g) * len(g), sum(lengths[r] for r in g)
        assert len(g) == 1 or padded <= 1.1 * real
    assert length_groups([5, 5, 5], slack=0.0) == [[0, 1, 2]] and length_groups([], 0.1) == []


def test_length_groups_merge_when_a_call_costs_more_than_the_padding_it_saves():
    """Groups [100, 90] | [50] | [40] | [10] (slack 0.1): merging [50] into the first pads it by 50 tokens, [40] by
    60, [10] by 90; a call worth 55 tokens merges the first, then [40] (60 more) starts a group and [10] (30 more
    onto [40]) joins it."""
    lengths = [100, 90, 50, 40, 10]
    assert length_groups(lengths, 0.1) == [[0, 1], [2], [3], [4]]
    assert length_groups(lengths, 0.1, call_tokens=55) == [[0, 1, 2], [3, 4]]
    assert length_groups(lengths, 0.1, call_tokens=1e9) == [[0, 1, 2, 3, 4]]
    tiny, smollm2_like = call_cost_tokens(load_scalar_model("tiny")), 2e8 / (2 * 106e6)
    assert tiny > 1000 and smollm2_like < 1  # the tiny model: one padded call; SmolLM2: groups


def test_right_padded_scores_equal_one_padded_forward(tiny_dir):
    model = load_scalar_model(tiny_dir)
    torch.manual_seed(0)
    lengths = [3, 12, 7, 11, 2, 12]
    ids = torch.randint(5, 1000, (6, 12))
    mask = (torch.arange(12) < torch.tensor(lengths)[:, None]).long()
    ids = ids.masked_fill(mask == 0, 0)
    grouped = right_padded_scores(model, ids, mask, slack=0.1)
    grouped.sum().backward()
    grad = score_head(model).weight.grad.clone()
    model.zero_grad()
    padded = sequence_scores(model, ids, mask)
    padded.sum().backward()
    assert torch.allclose(grouped, padded, atol=1e-5)
    assert torch.allclose(grad, score_head(model).weight.grad, atol=1e-5)
    # not right-padded (left padding): falls back to the padded forward
    left = mask.flip(1)
    assert torch.allclose(right_padded_scores(model, ids.flip(1), left), sequence_scores(model, ids.flip(1), left))
