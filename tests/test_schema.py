"""The settings dataclasses (rlhf_lightning/config/schema.py) are the one source of the stages' defaults: the YAML
under conf/ states only what differs, composes to them, and shares the loader and datamodule nodes."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from conftest import compose_run_config
from rlhf_lightning.config.schema import (
    EvalConfig,
    GenerationConfig,
    LoRASettings,
    OptimConfig,
    PPOConfig,
    RewardConfig,
    ValueConfig,
    as_config,
    ppo_optimizer_steps,
)
from rlhf_lightning.training.run import SCHEMAS, _ppo_optimizers

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"


def _compose(stage: str, tmp_path: Path, *overrides: str):
    extra = [] if stage == "reward" else ["reward_model_path=/nonexistent/rm"]
    return compose_run_config([f"stage={stage}", "model=tiny", *extra, *overrides], tmp_path)


def _built(cfg, key: str, cls: type):
    return as_config(cls, OmegaConf.to_container(cfg[key], resolve=True), key)


def _schema_nodes(stage_file: Path) -> dict[str, type]:
    """``{package: dataclass}`` for the ``- /schema/<name>@<package>`` entries of a stage's defaults list."""
    entries = OmegaConf.load(stage_file).get("defaults", [])
    nodes = {}
    for entry in entries:
        if isinstance(entry, str) and entry.startswith("/schema/"):
            name, package = entry.removeprefix("/schema/").split("@")
            nodes[package] = SCHEMAS[name]
    return nodes


def _leaves(node, prefix: str = "") -> dict[str, object]:
    if isinstance(node, dict):
        return {k: v for key, value in node.items() for k, v in _leaves(value, f"{prefix}{key}.").items()}
    return {prefix[:-1]: node}


@pytest.mark.parametrize("stage, nodes", [
    ("reward", {"reward": RewardConfig}),
    ("value", {"value": ValueConfig, "critic_optim": OptimConfig}),
    ("ppo", {"ppo": PPOConfig, "policy_optim": OptimConfig, "critic_optim": OptimConfig, "eval": EvalConfig}),
])
def test_stage_yaml_states_only_what_differs_from_the_dataclasses(stage, nodes):
    stage_file = CONF / "stage" / f"{stage}.yaml"
    assert _schema_nodes(stage_file) == nodes  # every settings node is typed by its dataclass
    raw = OmegaConf.to_container(OmegaConf.load(stage_file))
    for package, cls in nodes.items():
        defaults = _leaves(OmegaConf.to_container(OmegaConf.structured(cls)))
        for key, value in _leaves(raw.get(package, {})).items():
            assert key in defaults, f"{package}.{key}: not a field of {cls.__name__}"
            assert value != defaults[key], f"{stage_file.name} restates the default {package}.{key}={value}"


def test_composed_settings_are_the_dataclass_defaults(tmp_path):
    reward = _compose("reward", tmp_path)
    assert _built(reward, "reward", RewardConfig) == RewardConfig()
    value = _compose("value", tmp_path)
    assert _built(value, "value", ValueConfig) == ValueConfig()
    assert _built(value, "critic_optim", OptimConfig) == OptimConfig()
    ppo = _compose("ppo", tmp_path)
    assert _built(ppo, "ppo", PPOConfig) == PPOConfig()
    assert _built(ppo, "eval", EvalConfig) == EvalConfig()
    for key in ("policy_optim", "critic_optim"):  # what conf/stage/ppo.yaml changes
        assert _built(ppo, key, OptimConfig) == OptimConfig(lr=3e-6)
    # the defaults the two rollout stages differ in come from the dataclasses, not from YAML
    assert (ValueConfig().lam, ValueConfig().cliprange_value) == (0.0, None)
    assert (PPOConfig().lam, PPOConfig().cliprange_value) == (0.95, 0.2)
    assert ValueConfig().generation == PPOConfig().generation == GenerationConfig()


def test_overrides_presets_and_specializations_reach_the_typed_nodes(tmp_path):
    cfg = _compose("ppo", tmp_path, "experiment=demo_ppo", "trainer=deepspeed_zero2", "ppo.kl_coef=0.1",
                   "ppo.generation.max_new_tokens=8", "policy_optim.warmup_steps=2")
    ppo = _built(cfg, "ppo", PPOConfig)
    assert (ppo.kl_coef, ppo.generation.max_new_tokens) == (0.1, 8)  # the command line over the preset
    assert (ppo.num_minibatches, ppo.log_samples_every_n_steps) == (2, 4)  # the demo preset over the stage
    assert ppo.joint_optimizer is True  # conf/stage_trainer/ppo_deepspeed_zero2.yaml
    assert _built(cfg, "policy_optim", OptimConfig) == OptimConfig(lr=1e-4, warmup_steps=2)
    module = OmegaConf.to_container(cfg.module, resolve=True)
    assert as_config(PPOConfig, module["ppo"]) == ppo
    assert cfg.trainer.max_steps == cfg.iterations * ppo.optimizer_steps_per_iteration == 16 * 4 * 2


def test_value_and_ppo_share_the_loader_and_datamodule_nodes(tmp_path):
    value = OmegaConf.to_container(_compose("value", tmp_path, "seed=3").module, resolve=True)
    ppo_cfg = _compose("ppo", tmp_path, "seed=3", "policy_path=/some/policy", "critic_head=zero")
    ppo = OmegaConf.to_container(ppo_cfg.module, resolve=True)
    scalar = {"_target_": "rlhf_lightning.models.load_scalar_model", "name_or_path": "/nonexistent/rm",
              "gguf_file": None, "dtype": "float32", "trainable_layers": None, "gradient_checkpointing": False,
              "trust_remote_code": False, "lora": dataclasses.asdict(LoRASettings())}
    critic = {**scalar, "_target_": "rlhf_lightning.models.load_critic", "adv_estimator": "gae", "head": "keep",
              "share_base": False}
    assert value["critic"] == critic and ppo["critic"] == {**critic, "head": "zero"}
    shared = _compose("ppo", tmp_path, "critic.share_base=true", "model.lora.r=8").module.critic
    assert shared.share_base is True and shared.lora.r == 8  # PPO's critic.share_base reaches load_critic
    reward_model = {**scalar, "_target_": "rlhf_lightning.models.load_reward_model", "frozen": True, "lora": None}
    assert value["reward_model"] == ppo["reward_model"] == reward_model  # no seed: the head is the export's
    assert ppo["policy"]["_target_"].endswith("load_policy") and ppo["policy"]["name_or_path"] == "/some/policy"
    assert ppo["ref_policy"]["_target_"].endswith("load_reference")
    assert ppo["ref_policy"]["name_or_path"] == "/some/policy"
    assert {k: v for k, v in value["policy"].items() if k != "name_or_path"} == \
        {k: v for k, v in ppo["ref_policy"].items() if k not in ("name_or_path", "lora")}
    assert ppo["ref_policy"]["lora"] == ppo["policy"]["lora"] == scalar["lora"]  # LoRA policy: no reference loaded
    value_dm = OmegaConf.to_container(_compose("value", tmp_path, "seed=3").datamodule, resolve=True)
    ppo_dm = OmegaConf.to_container(ppo_cfg.datamodule, resolve=True)
    assert ppo_dm == {**value_dm, "val_size": ppo_cfg.ppo.num_sample_prompts}
    reward_model_node = OmegaConf.to_container(_compose("reward", tmp_path, "seed=3").module.model, resolve=True)
    assert reward_model_node == {**scalar, "name_or_path": "tiny", "seed": 3}


def test_ppo_optimizer_steps_is_one_formula_for_the_resolver_and_the_module(tmp_path):
    for joint, epochs, minibatches in ((False, 4, 1), (True, 4, 2), (False, 1, 3)):
        steps = PPOConfig(joint_optimizer=joint, ppo_epochs=epochs, num_minibatches=minibatches)
        assert steps.optimizer_steps_per_iteration == ppo_optimizer_steps(joint, epochs, minibatches) == \
            (1 if joint else 2) * epochs * minibatches == _ppo_optimizers(str(joint).lower(), epochs, minibatches)
    assert (_ppo_optimizers(True), _ppo_optimizers(False)) == (1, 2)  # ${ppo_optimizers:${ppo.joint_optimizer}}
    critic_free = PPOConfig(adv_estimator="grpo", num_generations=4, ppo_epochs=2, num_minibatches=3)
    assert critic_free.optimizer_steps_per_iteration == _ppo_optimizers("false", 2, 3, "grpo") == 1 * 2 * 3
    composed = _compose("ppo", tmp_path, "algorithm=grpo", "iterations=5", "ppo.num_minibatches=2")
    assert composed.trainer.max_steps == 5 * 1 * 1 * 2  # grpo preset: one optimizer, one epoch


def test_unknown_keys_and_nested_errors_name_the_full_key():
    with pytest.raises(TypeError, match=r"^ppo\.kl_coeff is not a setting of PPOConfig \(did you mean kl_coef\?\)$"):
        as_config(PPOConfig, {"kl_coeff": 0.1}, "ppo")
    with pytest.raises(TypeError, match=r"^ppo\.generation\.topp is not a setting of GenerationConfig"):
        as_config(PPOConfig, {"generation": {"topp": 0.9}}, "ppo")
    with pytest.raises(ValueError, match=r"^value\.generation\.top_p=0 must be in \(0, 1\]$"):
        as_config(ValueConfig, {"generation": {"top_p": 0}}, "value")
    with pytest.raises(ValueError, match=r"^reward\.optim\.lr=0 must be > 0$"):
        as_config(RewardConfig, {"optim": {"lr": 0}}, "reward")
    with pytest.raises(ValueError, match=r"^clip_eps=1 must be in \(0, 1\)$"):  # no key: the field's own name
        PPOConfig(clip_eps=1)
    with pytest.raises(TypeError, match=r"^ppo\.kl_coef='big' must be a number$"):
        as_config(PPOConfig, {"kl_coef": "big"}, "ppo")


def test_every_field_has_its_own_docstring():
    """litgpt's style: a docstring under each field (what it does, its unit or range), read from the source."""
    import ast
    import inspect

    import rlhf_lightning.config.schema as schema

    tree = ast.parse(inspect.getsource(schema))
    for node in tree.body:
        if not (isinstance(node, ast.ClassDef) and dataclasses.is_dataclass(getattr(schema, node.name, None))):
            continue
        body = node.body
        for i, item in enumerate(body):
            if isinstance(item, ast.AnnAssign):
                doc = body[i + 1] if i + 1 < len(body) else None
                assert isinstance(doc, ast.Expr) and isinstance(doc.value, ast.Constant), \
                    f"{node.name}.{item.target.id} has no docstring"


def test_cfg_job_shows_every_setting_with_the_dataclass_defaults():
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), "stage=ppo", "--cfg", "job"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    shown = OmegaConf.create(proc.stdout)
    for key, cls in (("ppo", PPOConfig), ("policy_optim", OptimConfig), ("critic_optim", OptimConfig)):
        fields = _leaves(OmegaConf.to_container(OmegaConf.structured(cls)))
        assert set(_leaves(OmegaConf.to_container(shown[key]))) == set(fields), key
    assert shown.ppo.clip_eps == 0.2 and shown.ppo.generation.max_new_tokens == 32 and shown.policy_optim.lr == 3e-6
    assert shown.module.critic._target_ == "rlhf_lightning.models.load_critic"
