"""Every trainer, sweep, hparams_search and launcher preset composes and instantiates (none is run)."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf

import rlhf_lightning.training.run  # noqa: F401  (registers the resolvers)
from conftest import compose_run_config
from rlhf_lightning.training import launch

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"


def _compose(overrides: list[str], tmp_path: Path):
    return compose_run_config(["stage=ppo", "model=tiny", "reward_model_path=x", *overrides], tmp_path)


def test_every_trainer_preset_is_tested():
    assert {p.stem for p in (CONF / "trainer").glob("*.yaml")} == {
        "cpu", "gpu", "gpu_per_job", "ddp", "ddp_cpu", "fsdp", "fsdp_cpu", "deepspeed_zero2", "deepspeed_zero3"}


def test_cpu_trainer_presets_instantiate(tmp_path):
    from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy

    trainer = instantiate(_compose(["trainer=cpu"], tmp_path).trainer, logger=False)
    assert isinstance(trainer.strategy, SingleDeviceStrategy)
    trainer = instantiate(_compose(["trainer=ddp_cpu"], tmp_path).trainer, logger=False)
    assert isinstance(trainer.strategy, DDPStrategy) and trainer.num_devices == 2
    assert trainer.strategy._start_method == "spawn" and trainer.strategy._process_group_backend == "gloo"


def test_fsdp_cpu_preset_is_fsdp2_over_gloo(tmp_path):
    """trainer=fsdp_cpu: FSDP2 (ModelParallelStrategy) on 2 CPU processes, spawned, every rank data-parallel, its
    sharding settings in one FSDP2Settings; no FSDP1 wrap policy anywhere."""
    from lightning.pytorch.strategies import ModelParallelStrategy

    from rlhf_lightning.config.schema import FSDP2Settings
    from rlhf_lightning.training.fsdp2 import FSDP2Strategy

    trainer = instantiate(_compose(["trainer=fsdp_cpu"], tmp_path).trainer, logger=False)
    strategy = trainer.strategy
    assert isinstance(strategy, FSDP2Strategy) and isinstance(strategy, ModelParallelStrategy)
    assert trainer.num_devices == 2 and strategy._start_method == "spawn"
    assert strategy._process_group_backend == "gloo" and strategy._tensor_parallel_size == 1
    assert strategy.settings == FSDP2Settings()  # fp32, shards freed after each forward, frozen networks sharded
    assert not any("auto_wrap" in str(v) for v in OmegaConf.to_container(_compose(["trainer=fsdp_cpu"], tmp_path)
                                                                         .trainer.strategy).keys())


def test_fsdp2_settings_are_checked_with_one_line_naming_the_key(tmp_path):
    from rlhf_lightning.training.fsdp2 import FSDP2Strategy
    from rlhf_lightning.training.validate import ConfigError, _check_fsdp2, validate_config

    with pytest.raises(ValueError, match=r"^trainer.strategy.frozen_networks='copy': expected one of shard, "):
        FSDP2Strategy(frozen_networks="copy")
    with pytest.raises(TypeError, match=r"^trainer.strategy.cpu_offload='yes' must be true or false$"):
        FSDP2Strategy(cpu_offload="yes")
    for override, message in [
            ("trainer.strategy.param_dtype=fp8", r"^trainer.strategy.param_dtype='fp8': expected one of float32, "),
            ("trainer.precision=bf16-mixed", r"^trainer.precision=bf16-mixed under FSDP2: use 32-true"),
            ("critic.share_base=true", r"^critic.share_base=true is not supported under FSDP2"),
            ("trainer.strategy.frozen_networks=replicate trainer.strategy.cpu_offload=true",
             r"^trainer.strategy.cpu_offload=True needs frozen_networks=shard")]:
        cfg = _compose(["trainer=fsdp_cpu", *override.split()], tmp_path)
        with pytest.raises(ConfigError, match=message):
            validate_config(cfg)
    # DAPO's dynamic sampling is taken: the ranks decide its rounds together (the same sharded forwards on each)
    _check_fsdp2(_compose(["trainer=fsdp_cpu", "algorithm=dapo"], tmp_path), "ppo")


@pytest.mark.parametrize("preset, strategy", [
    ("gpu", None), ("ddp", "lightning.pytorch.strategies.DDPStrategy"),
    ("fsdp", "rlhf_lightning.training.fsdp2.FSDP2Strategy"),
    ("deepspeed_zero2", "lightning.pytorch.strategies.DeepSpeedStrategy"),
    ("deepspeed_zero3", "lightning.pytorch.strategies.DeepSpeedStrategy"),
])
def test_gpu_trainer_presets_compose(preset, strategy, tmp_path):
    trainer = _compose([f"trainer={preset}"], tmp_path).trainer
    assert trainer.accelerator == "gpu"
    assert trainer.precision == ("32-true" if preset == "fsdp" else "bf16-mixed")  # FSDP2: bf16 param_dtype
    if strategy is None:
        assert trainer.strategy == "auto"
        return
    assert trainer.strategy._target_ == strategy
    resolved = OmegaConf.to_container(trainer.strategy, resolve=True)
    if preset == "ddp":
        assert resolved["start_method"] == "spawn" and resolved["process_group_backend"] == "nccl"
    if preset == "fsdp":  # the strategy object itself needs no GPU
        fsdp = instantiate(trainer.strategy)
        assert resolved["start_method"] == "spawn" and resolved["process_group_backend"] == "nccl"
        assert (fsdp.settings.param_dtype, fsdp.settings.reduce_dtype) == ("bfloat16", "float32")
        assert fsdp.settings.reshard_after_forward and fsdp.settings.frozen_networks == "shard"


@pytest.mark.parametrize("preset", ["deepspeed_zero2", "deepspeed_zero3"])
def test_deepspeed_presets_turn_on_ppos_joint_optimizer(preset, tmp_path):
    """One optimizer under DeepSpeed: ppo.joint_optimizer true, one step per minibatch in max_steps."""
    cfg = _compose([f"trainer={preset}", "iterations=3", "ppo.ppo_epochs=2", "ppo.num_minibatches=2"], tmp_path)
    assert cfg.ppo.joint_optimizer is True and cfg.module.ppo.joint_optimizer is True
    assert cfg.trainer.max_steps == 3 * 2 * 2  # iterations x epochs x minibatches
    # the command line wins
    off = _compose([f"trainer={preset}", "iterations=3", "ppo.joint_optimizer=false"], tmp_path)
    assert off.ppo.joint_optimizer is False and off.trainer.max_steps == 2 * 3 * 4 * 1


def test_ppo_max_steps_follows_the_joint_optimizer(tmp_path):
    from types import SimpleNamespace

    from rlhf_lightning.config.schema import as_config
    from rlhf_lightning.modules import PPOConfig, PPOModule

    for extra, optimizers in (([], 2), (["ppo.joint_optimizer=true"], 1), (["trainer=ddp_cpu"], 2)):
        cfg = _compose(["iterations=5", "ppo.num_minibatches=2", *extra], tmp_path)
        assert cfg.trainer.max_steps == optimizers * 5 * 4 * 2, extra  # ppo_epochs 4 by default
        # The module counts the same steps per iteration (its iteration counter divides global_step by them).
        ppo = as_config(PPOConfig, OmegaConf.to_container(cfg.ppo, resolve=True))
        assert cfg.trainer.max_steps == 5 * PPOModule.optimizer_steps_per_iteration.fget(SimpleNamespace(ppo=ppo))
    reward = compose_run_config(["stage=reward", "model=tiny", "trainer=deepspeed_zero2"], tmp_path)
    assert "ppo" not in reward  # the specialization is PPO's only


def test_ppo_optimizers_resolver():
    from rlhf_lightning.training.run import _ppo_optimizers

    assert [_ppo_optimizers(v) for v in (True, False, "TRUE", "false")] == [1, 2, 1, 2]
    assert _ppo_optimizers(False, 4, 2) == 16 and _ppo_optimizers("true", 3, "2") == 6  # per iteration
    with pytest.raises(TypeError, match="ppo.joint_optimizer"):
        _ppo_optimizers("yes")


def test_stage_trainer_specializations_name_a_stage_and_a_trainer():
    """conf/stage_trainer/<stage>_<trainer>.yaml is only picked when both names exist: no typo goes unseen."""
    pairs = {f"{s.stem}_{t.stem}" for s in (CONF / "stage").glob("*.yaml") for t in (CONF / "trainer").glob("*.yaml")}
    files = {p.stem for p in (CONF / "stage_trainer").glob("*.yaml")}
    assert files == {"ppo_deepspeed_zero2", "ppo_deepspeed_zero3"} and files <= pairs


def test_ddp_start_method_is_popen_only_where_processes_exist(monkeypatch):
    for name in ("SLURM_NTASKS", "SLURM_JOB_NAME", "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(name, raising=False)
    assert launch.ddp_start_method() == "spawn"
    monkeypatch.setenv("SLURM_NTASKS", "4")
    monkeypatch.setenv("SLURM_JOB_NAME", "train")
    assert launch.ddp_start_method() == "popen"


def test_claim_device_gives_each_process_its_own_device(tmp_path, monkeypatch):
    monkeypatch.setattr(launch, "_CLAIMED", {})
    assert launch.claim_device(2, tmp_path) == 0
    assert launch.claim_device(2, tmp_path) == 0  # the same process keeps its device
    code = ("import sys; from rlhf_lightning.training.launch import claim_device; "
            "print(claim_device(int(sys.argv[1]), sys.argv[2]))")
    other = subprocess.run([sys.executable, "-c", code, "2", str(tmp_path)], capture_output=True, text=True, cwd=ROOT)
    assert other.returncode == 0 and other.stdout.strip() == "1", other.stderr
    full = subprocess.run([sys.executable, "-c", code, "1", str(tmp_path)], capture_output=True, text=True, cwd=ROOT)
    assert full.returncode != 0 and "held by other processes" in full.stderr
    launch._CLAIMED.pop(0).close()


def test_ppo_grid_sweep_runs_every_beta_eps_combination(tmp_path):
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    cfg = _compose(["sweep=ppo_grid"], tmp_path)
    assert cfg.hydra.mode.name == "MULTIRUN" and cfg.module._target_.endswith("PPOModule")
    params = cfg.hydra.sweeper.params
    parsed = OverridesParser.create().parse_overrides([f"{k}={v}" for k, v in params.items()])
    jobs = [job for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]
    expected = itertools.product(["0.01", "0.05", "0.2"], ["0.1", "0.2", "0.3"])
    assert sorted(jobs) == sorted([f"ppo.kl_coef={b}", f"ppo.clip_eps={e}"] for b, e in expected)


def test_ppo_optuna_preset_instantiates_the_optuna_sweeper(tmp_path):
    cfg = _compose(["hparams_search=ppo_optuna", "objective=objective/score"], tmp_path)
    assert cfg.hydra.mode.name == "MULTIRUN" and cfg.objective == "objective/score"
    sweeper = instantiate(cfg.hydra.sweeper)
    assert type(sweeper).__name__ == "OptunaSweeper"
    assert set(cfg.hydra.sweeper.params) == {"ppo.kl_coef", "ppo.clip_eps"}
    assert cfg.hydra.sweeper.direction == "maximize"


def test_launcher_presets_instantiate(tmp_path):
    cfg = _compose(["hydra/launcher=parallel"], tmp_path)
    launcher = instantiate(cfg.hydra.launcher)
    assert type(launcher).__name__ == "JoblibLauncher" and launcher.joblib["n_jobs"] == 2

    cfg = _compose(["hydra/launcher=slurm", "trainer=ddp", "trainer.devices=4", "trainer.num_nodes=2"], tmp_path)
    launcher = instantiate(cfg.hydra.launcher)
    assert type(launcher).__name__ == "SlurmLauncher"
    assert (launcher.params["tasks_per_node"], launcher.params["gpus_per_node"], launcher.params["nodes"]) == (4, 4, 2)


def test_gpu_per_job_trainer_claims_one_device_per_worker(tmp_path, monkeypatch):
    monkeypatch.setattr(launch, "_CLAIMED", {})
    monkeypatch.setenv("RLHF_LIGHTNING_LOCKS", str(tmp_path / "locks"))
    cfg = _compose(["hydra/launcher=parallel", "hydra.launcher.n_jobs=3", "trainer=gpu_per_job"], tmp_path)
    assert OmegaConf.to_container(cfg.trainer, resolve=True)["devices"] == [0]
    launch._CLAIMED.pop(0).close()
    assert os.path.exists(tmp_path / "locks" / "device0.lock")
