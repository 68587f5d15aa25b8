"""GPU presets on the tiny model through train.py: bf16, DDP over NCCL, FSDP2 (trainer=fsdp: every stage, LoRA,
a sharded resume), DeepSpeed ZeRO 2/3 (reward and PPO; PPO under DeepSpeed runs with ppo.joint_optimizer, which the
presets turn on).

Marked ``gpu`` (left out of the default run: ``pytest -m gpu``) and skipped without CUDA (or with
fewer GPUs / no ``deepspeed`` where a test needs them).
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from test_train import _train

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
needs_deepspeed = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="needs deepspeed")


def _reward(tmp_path, hh_file, *overrides: str):
    run_dir = tmp_path / "reward"
    _train("stage=reward", "model=tiny", f"data.path={hh_file}", "data.val_size=8", "reward.max_length=64",
           "reward.batch_size=4", "trainer.max_steps=4", "trainer.enable_checkpointing=false", *overrides,
           run_dir=run_dir)
    assert (run_dir / "model" / "model.safetensors").exists()
    return run_dir


def _ppo(tmp_path, hh_file, reward_model: str, *overrides: str):
    run_dir = tmp_path / "ppo"
    _train("stage=ppo", "model=tiny", f"data.path={hh_file}", f"reward_model_path={reward_model}", "iterations=2",
           "batch_size=4", "ppo.ppo_epochs=1", "ppo.generation.max_new_tokens=8", "trainer.enable_checkpointing=false",
           *overrides, run_dir=run_dir)
    assert (run_dir / "model" / "model.safetensors").exists()
    return run_dir


def test_reward_and_ppo_bf16_on_one_gpu(tmp_path, hh_file):
    reward_dir = _reward(tmp_path, hh_file, "trainer=gpu")
    _ppo(tmp_path, hh_file, f"{reward_dir}/model", "trainer=gpu")


@two_gpus
def test_ppo_ddp_nccl_two_gpus(tmp_path, hh_file, tiny_dir):
    _ppo(tmp_path, hh_file, tiny_dir, "trainer=ddp", "trainer.devices=2")


@two_gpus
def test_reward_fsdp_two_gpus(tmp_path, hh_file):
    """FSDP2 over NCCL (trainer=fsdp: bf16 params, fp32 reduction), a sharded checkpoint resumed with
    ckpt_path=last, and the export gathered on every rank."""
    run_dir = _reward(tmp_path, hh_file, "trainer=fsdp", "trainer.devices=2", "trainer.enable_checkpointing=true")
    assert (run_dir / "checkpoints" / "last.ckpt" / "meta.pt").is_file()  # a directory of DCP shards
    _train("stage=reward", "model=tiny", f"data.path={hh_file}", "data.val_size=8", "reward.max_length=64",
           "reward.batch_size=4", "trainer.max_steps=6", "trainer=fsdp", "trainer.devices=2", "ckpt_path=last",
           run_dir=run_dir)
    from transformers import AutoModelForSequenceClassification

    AutoModelForSequenceClassification.from_pretrained(run_dir / "model")


@two_gpus
@pytest.mark.parametrize("extra", [[], ["model.lora.r=4"]], ids=["full", "lora"])
def test_ppo_grpo_and_dpo_fsdp_two_gpus(extra, tmp_path, hh_file, tiny_dir):
    """FSDP2 over NCCL: critic-free PPO and DPO, with full weights and with LoRA adapters."""
    ppo_dir = _ppo(tmp_path, hh_file, tiny_dir, "trainer=fsdp", "trainer.devices=2", "algorithm=grpo",
                   "ppo.num_generations=2", *extra)
    if extra:
        assert (ppo_dir / "model_adapter" / "adapter_model.safetensors").exists()
    dpo_dir = tmp_path / "dpo"
    _train("stage=dpo", "model=tiny", f"data.path={hh_file}", "dpo.max_length=64", "dpo.batch_size=2",
           "trainer.max_steps=2", "trainer.enable_checkpointing=false", "trainer=fsdp", "trainer.devices=2", *extra,
           run_dir=dpo_dir)
    assert (dpo_dir / "model" / "model.safetensors").exists()


@two_gpus
@needs_deepspeed
@pytest.mark.parametrize("preset", ["deepspeed_zero2", "deepspeed_zero3"])
def test_reward_deepspeed_two_gpus(preset, tmp_path, hh_file):
    _reward(tmp_path, hh_file, f"trainer={preset}", "trainer.devices=2")


@two_gpus
@needs_deepspeed
@pytest.mark.parametrize("preset", ["deepspeed_zero2", "deepspeed_zero3"])
def test_ppo_deepspeed_two_gpus(preset, tmp_path, hh_file, tiny_dir):
    import csv

    from omegaconf import OmegaConf

    run_dir = _ppo(tmp_path, hh_file, tiny_dir, f"trainer={preset}", "trainer.devices=2")
    config = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
    assert config.ppo.joint_optimizer is True  # conf/stage_trainer/ppo_<preset>.yaml
    with open(run_dir / "csv" / "metrics.csv", newline="") as f:
        rows = [row for row in csv.DictReader(f) if row.get("objective/score")]
    assert len(rows) == 2  # iterations=2: max_steps = 2 x 1 epoch x 1 minibatch, one optimizer
    assert (run_dir / "model_critic" / "model.safetensors").exists()


@two_gpus
def test_value_and_ppo_fsdp_two_gpus(tmp_path, hh_file, tiny_dir):
    """Value and PPO under FSDP2: generation with sharded parameters, both PPO optimizers stepping."""
    value_dir = tmp_path / "value"
    _train("stage=value", "model=tiny", f"data.path={hh_file}", f"reward_model_path={tiny_dir}", "iterations=2",
           "batch_size=4", "value.generation.max_new_tokens=8", "trainer.enable_checkpointing=false",
           "trainer=fsdp", "trainer.devices=2", run_dir=value_dir)
    assert (value_dir / "model" / "model.safetensors").exists()
    _ppo(tmp_path, hh_file, tiny_dir, f"critic_path={value_dir}/model", "trainer=fsdp", "trainer.devices=2")
