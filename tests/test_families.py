"""Every decoder family trains on the distribution it samples from.

Tiny random models (SmolLM2 tokenizer, 4 blocks, hidden 64) of each family in ``TINY_FAMILIES``, with
the family's per-layer features on (sliding windows shorter than the sequences, alternating layer
types, logit soft-capping, Granite's multipliers) and non-zero dropout rates in their configs.
"""

from __future__ import annotations

import json
import logging

import lightning as L
import pytest
import torch

from rlhf_lightning.data import PromptDataModule
from rlhf_lightning.models import load_policy, load_reference, load_scalar_model, load_tokenizer
from rlhf_lightning.models.forward import response_logprobs, response_values, sequence_scores
from rlhf_lightning.models.loading import TINY_FAMILIES
from rlhf_lightning.models.trunk import SharedTrunk, shared_trunk_for
from rlhf_lightning.modules import PPOModule
from rlhf_lightning.modules.common import export_pretrained
from rlhf_lightning.rollout.sampler import GenerationConfig, generate

FAMILIES = list(TINY_FAMILIES)


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    return request.param


def _prompts(tokenizer):
    tokenizer.padding_side = "left"
    enc = tokenizer(["Tell me a story about the sea and the old lighthouse keeper", "Hi there"],
                    return_tensors="pt", padding=True)
    return enc["input_ids"], enc["attention_mask"]


def test_dropout_is_off_in_train_mode(family):
    source = f"tiny-{family}"
    ids, mask = _prompts(load_tokenizer(source))
    for model in (load_policy(source), load_scalar_model(source)):
        model.train()
        with torch.no_grad():
            first = model(input_ids=ids, attention_mask=mask).logits
            second = model(input_ids=ids, attention_mask=mask).logits
        assert torch.equal(first, second), f"{type(model).__name__}: two train-mode forwards differ"
        assert not any(isinstance(m, torch.nn.Dropout) and m.p for m in model.modules())


def test_sampler_logprobs_equal_training_logprobs(family):
    """Sampled with the KV-cached loop at temperature 0.7 (no top-k/top-p: the sampler's distribution is the
    trainer's; with them the sampler records the renormalised one, tests/test_rollout.py); recomputed by the trainer
    with and without the shared trunk: the same numbers (1e-5)."""
    source = f"tiny-{family}"
    tokenizer = load_tokenizer(source)
    policy, reference = load_policy(source, trainable_layers=1), load_reference(source)
    ids, mask = _prompts(tokenizer)
    torch.manual_seed(0)
    config = GenerationConfig(max_new_tokens=10, temperature=0.7)
    ro = generate(policy, ids, mask, config, eos_token_id=-1, pad_token_id=tokenizer.pad_token_id)
    assert ro.response_mask.all()  # no EOS: every token counts
    trunk = SharedTrunk({"policy": policy, "ref_policy": reference})
    assert trunk.groups and trunk.groups[0][1] == 3 and trunk.probe() is None
    out = trunk.compute(ro.input_ids, ro.attention_mask)
    with torch.no_grad():
        full = response_logprobs(policy, ro.input_ids, ro.attention_mask, ro.response_start, config.temperature)
        split = response_logprobs(policy, ro.input_ids, ro.attention_mask, ro.response_start, config.temperature,
                                  trunk=out["policy"])
        ref_split = response_logprobs(reference, ro.input_ids, ro.attention_mask, ro.response_start,
                                      config.temperature, trunk=out["ref_policy"])
    torch.testing.assert_close(full, ro.sampler_logprobs, rtol=0, atol=1e-5)
    torch.testing.assert_close(split, ro.sampler_logprobs, rtol=0, atol=1e-5)
    torch.testing.assert_close(ref_split, ro.sampler_logprobs, rtol=0, atol=1e-5)  # same weights before training


def test_prefill_once_dropped_rows_and_the_kept_trunk(family, monkeypatch):
    """Each prompt prefilled once for 3 responses, ended rows dropped from decoding, the trunk kept while sampling
    (issue 26): the same tokens and sampler log-probabilities as 3 copies decoded to the end, the kept trunk equal to
    the trunk computed on the scoring inputs at attended columns, and the trainer's log-probabilities on it equal to
    the sampler's (1e-5)."""
    import rlhf_lightning.rollout.sampler as sampler
    from rlhf_lightning.rollout.experience import scoring_inputs

    source = f"tiny-{family}"
    tokenizer = load_tokenizer(source)
    policy, reference = load_policy(source, trainable_layers=1), load_reference(source)
    ids, mask = _prompts(tokenizer)
    eos = [tokenizer.eos_token_id, *range(1, policy.config.vocab_size, 11)]  # responses of different lengths
    config = GenerationConfig(max_new_tokens=8, temperature=0.7)
    trunk = SharedTrunk({"policy": policy, "ref_policy": reference})
    noise = sampler.prompt_noise(5, torch.tensor([0, 1]), config.max_new_tokens, 0, group=3)
    monkeypatch.setattr(sampler, "DROP_FINISHED_SHARE", float("inf"))
    full = generate(policy, ids.repeat_interleave(3, 0), mask.repeat_interleave(3, 0), config, eos,
                    tokenizer.pad_token_id, noise=noise)
    monkeypatch.setattr(sampler, "DROP_FINISHED_SHARE", 0.1)
    ro = generate(policy, ids, mask, config, eos, tokenizer.pad_token_id, noise=noise, group=3,
                  trunk_depth=trunk.depth_of("policy"), score_eos_token_id=tokenizer.eos_token_id)
    assert ro.ends_with_eos.any() and not ro.ends_with_eos.all()
    assert torch.equal(ro.input_ids, full.input_ids)
    torch.testing.assert_close(ro.sampler_logprobs, full.sampler_logprobs, rtol=0, atol=1e-5)
    seq, seq_mask = scoring_inputs(ro, tokenizer.eos_token_id)
    computed = trunk.compute(seq, seq_mask)["policy"].hidden
    attended = seq_mask.bool()
    torch.testing.assert_close(ro.trunk.hidden[attended], computed[attended], rtol=0, atol=1e-5)
    with torch.no_grad():
        split = response_logprobs(policy, ro.input_ids, ro.attention_mask, ro.response_start, config.temperature,
                                  trunk=ro.trunk.columns(ro.input_ids.shape[1]))
    torch.testing.assert_close(split, ro.sampler_logprobs, rtol=0, atol=1e-5)


def test_packed_forwards_equal_padded_forwards(family):
    """Padding-free forwards (ppo.packed_sequences: the rows packed into one with per-row positions and no mask):
    the policy's log-probabilities and entropies (with and without the shared trunk, and their gradients), the
    critic's values and the reward model's scores equal the padded forwards' at the valid tokens (1e-5)."""
    source = f"tiny-{family}"
    tokenizer = load_tokenizer(source)
    policy, reference = load_policy(source, trainable_layers=1), load_reference(source)
    critic = load_scalar_model(source, trainable_layers=1, seed=2)
    ids, mask = _prompts(tokenizer)
    torch.manual_seed(0)
    eos = [tokenizer.eos_token_id, *range(1, policy.config.vocab_size, 11)]  # left and right padding
    ro = generate(policy, ids, mask, GenerationConfig(max_new_tokens=8, temperature=0.7), eos,
                  tokenizer.pad_token_id, group=2)
    ids, mask, start = ro.input_ids, ro.attention_mask.clone(), ro.response_start
    mask[1, -3:] = 0  # a row cut short whatever was sampled
    valid = mask[:, start:].bool()
    trunk = SharedTrunk({"policy": policy, "ref_policy": reference, "critic": critic}).compute(ids, mask)
    for name in ("policy", None):
        results = []
        for packed in (False, True):
            policy.zero_grad(set_to_none=True)
            logprobs, entropy = response_logprobs(policy, ids, mask, start, 0.7, with_entropy=True,
                                                  trunk=trunk[name] if name else None, packed=packed)
            logprobs.sum().backward()
            grads = [p.grad.clone() for p in policy.parameters() if p.grad is not None]
            values = response_values(critic, ids, mask, start, trunk=trunk["critic"] if name else None,
                                     packed=packed).masked_fill(~valid, 0.0)
            with torch.no_grad():
                scores = sequence_scores(critic, ids, mask, packed=packed)
            results.append((logprobs.detach(), entropy, values.detach(), scores, grads))
        for padded, packed in zip(*results, strict=True):
            if isinstance(padded, list):
                for a, b in zip(padded, packed, strict=True):
                    torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
            else:
                torch.testing.assert_close(packed, padded, rtol=0, atol=1e-5)


def test_one_ppo_iteration_with_the_trunk(family, tmp_path, hh_file):
    source = f"tiny-{family}"
    tokenizer = load_tokenizer(source)
    L.seed_everything(0)
    module = PPOModule(load_policy(source, trainable_layers=1), load_reference(source),
                       load_scalar_model(source, trainable_layers=1, head="zero"),
                       load_scalar_model(source, frozen=True, seed=1), tokenizer,
                       ppo={"ppo_epochs": 1, "num_sample_prompts": 0, "log_samples_every_n_steps": 0,
                            "generation": {"max_new_tokens": 6, "temperature": 0.8}},
                       policy_optim={"lr": 1e-3}, critic_optim={"lr": 1e-3})
    before = {k: v.clone() for k, v in module.policy.state_dict().items()}
    trainer = L.Trainer(accelerator="cpu", max_steps=module.optimizer_steps_per_iteration, max_epochs=-1,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, default_root_dir=tmp_path)
    trainer.fit(module, datamodule=PromptDataModule(tokenizer, str(hh_file), batch_size=4, max_prompt_length=48))
    assert module.trunk is not None and module.trunk.groups[0][1] == 3  # shared by all four networks
    diff = float(trainer.callback_metrics["rollout/logprob_diff"])
    assert 0 <= diff <= 1e-3
    assert any(not torch.equal(before[k], v) for k, v in module.policy.state_dict().items()), "no update"


def test_reward_model_export_reloads(family, tmp_path):
    source = f"tiny-{family}"
    tokenizer = load_tokenizer(source)
    model = load_scalar_model(source, seed=3)
    ids, mask = _prompts(tokenizer)
    export_pretrained(model, tokenizer, tmp_path / "rm")
    architectures = json.loads((tmp_path / "rm" / "config.json").read_text())["architectures"]
    assert architectures[0].endswith("ForSequenceClassification")
    reloaded = load_scalar_model(str(tmp_path / "rm"), frozen=True)
    with torch.no_grad():
        torch.testing.assert_close(sequence_scores(reloaded, ids, mask), sequence_scores(model, ids, mask))


def test_probe_turns_an_inexact_trunk_off(monkeypatch, caplog):
    """A trunk whose output is off by 1e-3 (as a view with the wrong per-layer settings was) is not used."""
    import rlhf_lightning.models.trunk as trunk_module

    exact = trunk_module.trunk_view

    class Off(torch.nn.Module):
        def __init__(self, view):
            super().__init__()
            self.view = view

        def forward(self, **kwargs):
            out = self.view(**kwargs)
            out.last_hidden_state = out.last_hidden_state + 1e-3
            return out

    source = "tiny-gemma3"
    models = {"policy": load_policy(source, trainable_layers=1), "ref_policy": load_reference(source)}
    assert shared_trunk_for(object(), True, models) is not None
    monkeypatch.setattr(trunk_module, "trunk_view", lambda model, depth: Off(exact(model, depth)))
    with caplog.at_level(logging.WARNING, logger="rlhf_lightning.models.trunk"):
        assert shared_trunk_for(object(), True, models) is None
    assert "shared frozen trunk off: policy" in caplog.text and "differs from the full forward" in caplog.text
