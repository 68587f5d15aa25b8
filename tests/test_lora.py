"""LoRA (``model.lora``): adapters on the trained networks, the reference as the policy with its adapters off,
adapter-only checkpoints with exact resume, merged and adapter exports, DDP, and the three stages via train.py."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

from conftest import fit_ppo_with_checkpoints
from rlhf_lightning.config.schema import LoRASettings
from rlhf_lightning.data import PromptDataModule
from rlhf_lightning.models import load_policy, load_reference, load_scalar_model
from rlhf_lightning.models.forward import response_logprobs, sequence_scores
from rlhf_lightning.models.lora import (
    adapters_disabled,
    has_lora,
    merged_named_weights,
    network_memory,
    target_module_names,
)
from rlhf_lightning.modules import PPOModule
from rlhf_lightning.modules.common import check_lora_strategy, export_pretrained
from rlhf_lightning.rollout.experience import logprob_diff

pytest.importorskip("peft")

ROOT = Path(__file__).resolve().parents[1]
TOL = {"rtol": 1e-5, "atol": 1e-6}


def _perturb(model: torch.nn.Module, seed: int = 0, std: float = 0.2) -> None:
    """Give the adapters' B matrices (0 at the start) random values: the adapted model then differs from its base."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_B." in name:
                param.copy_(torch.randn(param.shape, generator=gen) * std)


def _batch(vocab: int = 1000):
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (3, 12), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    return ids, mask


def test_lora_settings_check_their_ranges():
    assert not LoRASettings().enabled and LoRASettings(r=8).enabled
    for bad in ({"r": 0}, {"r": 4, "dropout": 1.0}, {"r": 4, "alpha": 0}, {"r": 4, "layers": 0},
                {"r": 4, "target_modules": []}):
        with pytest.raises(ValueError):
            LoRASettings(**bad)


def test_lora_trains_adapters_in_the_top_blocks_and_the_head_only(tiny_dir):
    base = load_scalar_model(tiny_dir, seed=1)
    model = load_scalar_model(tiny_dir, seed=1, lora={"r": 4, "layers": 1, "target_modules": ["q_proj", "v_proj"]})
    assert has_lora(model) and not has_lora(base)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"score.weight"} | {f"model.layers.1.self_attn.{m}.lora_{ab}.default.weight"
                                            for m in ("q_proj", "v_proj") for ab in "AB"}
    ids, mask = _batch()
    # B starts at 0: the adapted model computes exactly what its base computes
    torch.testing.assert_close(sequence_scores(model, ids, mask), sequence_scores(base, ids, mask), rtol=0, atol=0)
    stats = network_memory(model)
    assert stats["trainable"] == sum(p.numel() for p in model.parameters() if p.requires_grad) < stats["parameters"]
    with pytest.raises(ValueError, match="no linear layer named qkv"):
        target_module_names(base, LoRASettings(r=4, target_modules=["qkv"]))
    with pytest.raises(ValueError, match="exclusive"):
        load_policy(tiny_dir, trainable_layers=1, lora={"r": 4})
    with pytest.raises(ValueError, match="model.lora.r=0"):
        load_policy(tiny_dir, lora={"r": 0})


def test_adapters_off_give_the_base_models_logprobs_and_keep_requires_grad(tiny_dir):
    policy, reference = load_policy(tiny_dir, lora={"r": 4}), load_reference(tiny_dir)
    assert load_reference(tiny_dir, lora={"r": 4}) is None  # PPO loads no copy for a LoRA policy
    _perturb(policy)
    ids, mask = _batch()
    base = response_logprobs(reference, ids, mask, 6)
    assert (response_logprobs(policy, ids, mask, 6) - base).abs().max() > 1e-2
    flags = {n: p.requires_grad for n, p in policy.named_parameters()}
    with adapters_disabled(policy):
        off = response_logprobs(policy, ids, mask, 6)
    assert torch.equal(off, base)
    assert {n: p.requires_grad for n, p in policy.named_parameters()} == flags
    torch.testing.assert_close(response_logprobs(policy, ids, mask, 6).detach(),
                               response_logprobs(policy, ids, mask, 6).detach())  # adapters back on


def test_exports_write_the_merged_model_and_the_adapter(tiny_dir, tokenizer, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    policy = load_policy(tiny_dir, lora={"r": 4})
    critic = load_scalar_model(tiny_dir, seed=1, lora={"r": 4, "layers": 1})
    _perturb(policy)
    _perturb(critic, seed=1)
    with torch.no_grad():
        critic.score.weight.mul_(3.0)  # the head trains in full: it must travel with the adapter
    export_pretrained(policy, tokenizer, tmp_path / "model")
    export_pretrained(critic, None, tmp_path / "critic")
    ids, mask = _batch()
    expected = policy(input_ids=ids, attention_mask=mask).logits
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    torch.testing.assert_close(merged(input_ids=ids, attention_mask=mask).logits, expected, rtol=1e-4, atol=1e-5)
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_dir), tmp_path / "model_adapter")
    torch.testing.assert_close(adapted(input_ids=ids, attention_mask=mask).logits, expected, rtol=1e-4, atol=1e-5)
    scores = sequence_scores(critic, ids, mask)
    plain = AutoModelForSequenceClassification.from_pretrained(tmp_path / "critic")
    torch.testing.assert_close(sequence_scores(plain, ids, mask), scores, rtol=1e-4, atol=1e-5)
    base = AutoModelForSequenceClassification.from_pretrained(tiny_dir, num_labels=1)
    with_head = PeftModel.from_pretrained(base, tmp_path / "critic_adapter")
    torch.testing.assert_close(with_head(input_ids=ids[:1]).logits[:, 0], scores[:1], rtol=1e-4, atol=1e-5)
    # the pairs for a generation engine: the plain model's names, the merged values
    weights = dict(merged_named_weights(policy))
    assert weights.keys() == merged.state_dict().keys()
    for key, value in merged.state_dict().items():
        torch.testing.assert_close(weights[key], value, rtol=1e-5, atol=1e-6, msg=key)


def test_lora_is_refused_under_sharded_strategies(tiny_dir):
    policy = load_policy(tiny_dir, lora={"r": 4})
    for name in ("DeepSpeedStrategy", "FSDPStrategy"):
        strategy = type(name, (), {})()
        with pytest.raises(ValueError, match=f"model.lora.r is set but {name}"):
            check_lora_strategy(strategy, {"policy": policy})
    check_lora_strategy(type("DDPStrategy", (), {})(), {"policy": policy})
    check_lora_strategy(type("DeepSpeedStrategy", (), {})(), {"policy": load_policy(tiny_dir)})


def _lora_ppo(tiny_dir, tokenizer, lora: dict) -> PPOModule:
    L.seed_everything(3)  # the adapters' A matrices are drawn from the global RNG, as train.py seeds first
    return PPOModule(load_policy(tiny_dir, lora=lora), load_reference(tiny_dir, lora=lora),
                     load_scalar_model(tiny_dir, lora=lora), load_scalar_model(tiny_dir, frozen=True, seed=1),
                     tokenizer,
                     ppo={"ppo_epochs": 1, "num_minibatches": 2, "num_sample_prompts": 0,
                          "log_samples_every_n_steps": 0, "generation": {"max_new_tokens": 4}},
                     policy_optim={"lr": 1e-2}, critic_optim={"lr": 1e-2})


def test_ppo_with_lora_reference_trunk_checkpoint_and_exact_resume(tiny_dir, tokenizer, hh_file, tmp_path):
    """LoRA in the top block of the policy and the critic: the reference is the policy with its adapters off (the
    base model's log-probabilities, on the shared trunk too); checkpoints hold the adapters and the critic's head
    only, and a run resumed from one ends with the uninterrupted run's adapters."""
    lora = {"r": 4, "layers": 1}
    full = fit_ppo_with_checkpoints(_lora_ppo(tiny_dir, tokenizer, lora), tokenizer, hh_file, tmp_path / "full",
                                    iterations=2)
    assert full.ref_policy is None and full.trunk is not None
    assert any({"policy", "ref_policy"} <= set(names) for names, _ in full.trunk.groups)
    # the trained adapters moved the policy away from its base, and the reference is still the base
    prompts = torch.tensor([[tokenizer.pad_token_id] * 2 + list(range(100, 110)), list(range(200, 212))])
    attention = (prompts != tokenizer.pad_token_id).long()
    with torch.random.fork_rng():
        torch.manual_seed(0)
        exp = full.collect(prompts, attention, for_update=False)
    ro = exp.rollout
    base = response_logprobs(load_reference(tiny_dir), ro.input_ids, ro.attention_mask, ro.response_start)
    base = base.masked_fill(~ro.response_mask, 0.0)
    torch.testing.assert_close(exp.ref_logprobs, base, rtol=1e-5, atol=1e-5)
    assert (exp.logprobs - exp.ref_logprobs).abs().max() > 1e-4
    assert float(logprob_diff(exp)) < 1e-4  # sampler and trainer agree with the adapters on
    assert all(p.requires_grad for n, p in full.policy.named_parameters() if ".lora_" in n)

    cut = fit_ppo_with_checkpoints(_lora_ppo(tiny_dir, tokenizer, lora), tokenizer, hh_file, tmp_path / "cut",
                                   iterations=1)
    last = tmp_path / "cut" / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(last, weights_only=True)
    keys = set(checkpoint["state_dict"])
    assert keys == {f"policy.{k}" for k, p in cut.policy.named_parameters() if p.requires_grad} | \
        {f"critic.{k}" for k, p in cut.critic.named_parameters() if p.requires_grad}
    assert "critic.score.weight" in keys and all(".lora_" in k for k in keys - {"critic.score.weight"})
    assert len(checkpoint["optimizer_states"]) == 2
    resumed = fit_ppo_with_checkpoints(_lora_ppo(tiny_dir, tokenizer, lora), tokenizer, hh_file, tmp_path / "cut",
                                       iterations=2, ckpt_path=str(last))
    assert resumed.iteration == full.iteration == 2
    for name in ("policy", "critic"):
        expected = {k: p for k, p in getattr(full, name).named_parameters() if p.requires_grad}
        got = dict(getattr(resumed, name).named_parameters())
        for key, value in expected.items():
            torch.testing.assert_close(got[key], value, **TOL, msg=f"{name}.{key}")


@pytest.mark.slow  # ~20 s alone, more under load: four train.py processes
def test_three_stages_train_with_lora_through_train_py(tmp_path, hh_file):
    def run(stage: str, *overrides: str, name: str | None = None) -> Path:
        run_dir = tmp_path / (name or stage)
        command = [sys.executable, str(ROOT / "train.py"), f"stage={stage}", "model=tiny", "model.lora.r=16",
                   f"data.path={hh_file}", "data.limit=16", f"hydra.run.dir={run_dir}",
                   "trainer.enable_progress_bar=false", "~callbacks.progress_bar", *overrides]
        proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "MiB of weights" in (run_dir / "train.log").read_text()
        return run_dir

    reward = run("reward", "data.val_size=4", "trainer.max_steps=2")
    value = run("value", f"reward_model_path={reward}/model", "iterations=2", "batch_size=4",
                "value.generation.max_new_tokens=4")
    ppo = run("ppo", f"reward_model_path={reward}/model", f"critic_path={value}/model", "iterations=2",
              "batch_size=4", "ppo.generation.max_new_tokens=4", "ppo.num_sample_prompts=2", "model.lora.layers=1")
    shared = run("ppo", f"reward_model_path={reward}/model", f"critic_path={value}/model", "iterations=2",
                 "batch_size=4", "ppo.generation.max_new_tokens=4", "ppo.num_sample_prompts=2",
                 "critic.share_base=true", name="ppo_shared")
    log = (shared / "train.log").read_text()
    assert "LoRA r=32 on the policy's base" in log  # the value stage's adapter stacked on the reward model's
    for run_dir, names in ((reward, ["model"]), (value, ["model"]), (ppo, ["model", "model_critic"]),
                           (shared, ["model", "model_critic"])):
        for name in names:
            assert (run_dir / name / "model.safetensors").exists()
            assert (run_dir / f"{name}_adapter" / "adapter_model.safetensors").exists()
    assert "reference: the LoRA policy with its adapters off" in (ppo / "train.log").read_text()


class LocalLoRAPPOModule(PPOModule):
    """PPO recording each rank's ``log_dict`` values (for :class:`test_ddp.RankRecorder`)."""

    def log_dict(self, dictionary, *args, **kwargs):
        self.__dict__.setdefault("local_metrics", []).append({k: float(v) for k, v in dictionary.items()})
        return super().log_dict(dictionary, *args, **kwargs)


@pytest.mark.slow  # ~25 s each (spawned workers); tests/test_equivalence.py's default LoRA case covers 2 processes
@pytest.mark.parametrize("share_base", [False, True], ids=["critic_own_base", "critic_share_base"])
def test_ddp_cpu_ppo_with_lora_keeps_the_adapters_equal_on_every_rank(tmp_path, tiny_dir, tokenizer, hh_file,
                                                                     share_base):
    from rlhf_lightning.models.builders import PolicyBaseCritic
    from test_ddp import RankRecorder, _assert_disjoint_rows, _assert_same_trained_parameters, _ddp_trainer, _ranks

    L.seed_everything(0)
    lora = {"r": 4}
    critic = (PolicyBaseCritic.from_source(tiny_dir, head="normal", lora=lora) if share_base
              else load_scalar_model(tiny_dir, lora=lora))
    module = LocalLoRAPPOModule(
        load_policy(tiny_dir, lora=lora), load_reference(tiny_dir, lora=lora), critic,
        load_scalar_model(tiny_dir, frozen=True, seed=1), tokenizer,
        ppo={"ppo_epochs": 1, "num_minibatches": 2, "num_sample_prompts": 0, "log_samples_every_n_steps": 0,
             "generation": {"max_new_tokens": 4}},
        policy_optim={"lr": 1e-2}, critic_optim={"lr": 1e-2})
    dm = PromptDataModule(tokenizer, str(hh_file), batch_size=2, max_prompt_length=32)
    recorder = RankRecorder(str(tmp_path), ["objective/score", "objective/kl"])
    trainer = _ddp_trainer(tmp_path, [recorder], max_steps=2 * module.optimizer_steps_per_iteration, max_epochs=-1,
                           limit_val_batches=0)
    trainer.fit(module, datamodule=dm)
    ranks = _ranks(tmp_path)
    _assert_same_trained_parameters(ranks)  # the adapters and the critic's head, trained, equal on both ranks
    _assert_disjoint_rows(ranks, expected_per_rank=4)
    assert all(".lora_" in key or key.endswith("score.weight") for key in ranks[0]["final"])
    assert any(".lora_B.critic." in key for key in ranks[0]["final"]) == share_base
    kl = [d["objective/kl"] for r in ranks for d in r["local"] if "objective/kl" in d]
    assert kl and max(abs(v) for v in kl) > 0  # the reference (adapters off) differs from the trained policy


def test_model_lora_is_a_typed_node_of_every_model_config(tmp_path):
    from omegaconf import OmegaConf

    from conftest import compose_run_config
    from rlhf_lightning.config.schema import as_config

    for model in ("tiny", "smollm2"):
        cfg = compose_run_config(["stage=ppo", f"model={model}", "reward_model_path=/x", "model.lora.r=16",
                                  "model.lora.layers=2"], tmp_path)
        assert as_config(LoRASettings, OmegaConf.to_container(cfg.model.lora)) == LoRASettings(r=16, layers=2)
        module = OmegaConf.to_container(cfg.module, resolve=True)
        assert module["policy"]["lora"] == module["critic"]["lora"] == module["ref_policy"]["lora"]
        assert module["reward_model"]["lora"] is None  # the reward model stays as it is
    default = compose_run_config(["stage=reward", "model=tiny"], tmp_path)
    assert as_config(LoRASettings, OmegaConf.to_container(default.model.lora)) == LoRASettings()  # off
    with pytest.raises(Exception, match="rank"):
        compose_run_config(["stage=reward", "model=tiny", "model.lora.rank=3"], tmp_path)


@pytest.mark.parametrize("overrides, message", [
    (["model.lora.r=0"], "model.lora.r=0 must be a positive integer"),
    (["model.lora.r=8", "model.lora.dropout=1.5"], "model.lora.dropout=1.5 must be in [0, 1)"),
    (["model.lora.r=8", "model.trainable_layers=2"], "model.trainable_layers and model.lora.r are exclusive"),
    (["model.lora.r=8", "trainer=deepspeed_zero2"], "model.lora.r is set but trainer.strategy="),
])
def test_bad_lora_configs_stop_before_anything_loads(tmp_path, overrides, message):
    from conftest import compose_run_config
    from rlhf_lightning.training.validate import ConfigError, validate_config

    cfg = compose_run_config(["stage=reward", "model=tiny", *overrides], tmp_path)
    with pytest.raises(ConfigError, match=re.escape(message)):
        validate_config(cfg)
    validate_config(compose_run_config(["stage=reward", "model=tiny", "model.lora.r=8"], tmp_path))


def test_reward_and_value_checkpoints_keep_the_adapters_and_head_only(tiny_dir, tokenizer):
    from rlhf_lightning.modules import RewardModule, ValueModule

    lora = {"r": 4, "layers": 1}
    reward = RewardModule(load_scalar_model(tiny_dir, lora=lora), tokenizer)
    value = ValueModule(load_reference(tiny_dir), load_scalar_model(tiny_dir, lora=lora),
                        load_scalar_model(tiny_dir, frozen=True, seed=1), tokenizer)
    assert not reward.strict_loading and RewardModule(load_scalar_model(tiny_dir), tokenizer).strict_loading
    for module, prefix in ((reward, "model"), (value, "critic")):
        checkpoint = {"state_dict": module.state_dict()}
        module.on_save_checkpoint(checkpoint)
        network = getattr(module, prefix)
        assert set(checkpoint["state_dict"]) == {f"{prefix}.{k}" for k, p in network.named_parameters()
                                                 if p.requires_grad}
        assert f"{prefix}.score.weight" in checkpoint["state_dict"]
