"""The Hydra configs compose, and train.py runs the three stages end to end on the tiny model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf

import rlhf_lightning.training.run  # noqa: F401  (registers ${mul:...})
from conftest import compose_run_config
from rlhf_lightning.data.preference import compare_splits
from rlhf_lightning.evaluation import rm_eval
from rlhf_lightning.evaluation.summary import summarize

ROOT = Path(__file__).resolve().parents[1]
CONF = str(ROOT / "conf")


def _compose(overrides: list[str], tmp_path: Path):
    return compose_run_config(overrides, tmp_path)


@pytest.mark.parametrize("stage", ["reward", "value", "ppo"])
def test_stage_configs_compose_and_instantiate(stage, tmp_path, hh_file, tokenizer):
    overrides = [f"stage={stage}", "model=tiny", f"data.path={hh_file}", "data.val_size=8",
                 "reward_model_path=/nonexistent/rm"]
    if stage == "reward":
        overrides = overrides[:-1]
    composed = _compose(overrides, tmp_path)
    cfg = OmegaConf.create({k: OmegaConf.to_container(v, resolve=True) if OmegaConf.is_config(v) else v
                            for k, v in composed.items() if k != "hydra"})
    assert cfg.module.export_dir == f"{tmp_path}/model"
    datamodule = instantiate(cfg.datamodule, tokenizer=tokenizer)
    datamodule.setup("fit")
    batch = next(iter(datamodule.train_dataloader()))
    assert batch["input_ids"].dtype.is_floating_point is False
    trainer = instantiate(cfg.trainer, logger=False, enable_checkpointing=False)
    if stage == "ppo":  # max_steps counts optimizer steps: 2 optimizers x epochs x minibatches x iterations
        assert trainer.max_steps == 2 * cfg.ppo.ppo_epochs * cfg.ppo.num_minibatches * cfg.iterations


def test_train_part_and_cache_trunk_reach_the_reward_stage(tmp_path):
    cfg = _compose(["stage=reward", "model=tiny", "data.train_part=[1,2]", "reward.cache_trunk=true"], tmp_path)
    assert OmegaConf.to_container(cfg.datamodule, resolve=True)["train_part"] == [1, 2]
    assert OmegaConf.to_container(cfg.module, resolve=True)["cache_trunk"] is True
    cfg = _compose(["stage=reward", "model=tiny", "data=hh_rlhf_hub"], tmp_path)
    assert OmegaConf.to_container(cfg.datamodule, resolve=True)["train_part"] is None


def test_demo_proxy_and_judge_presets_train_on_disjoint_pairs(tmp_path, hh_file, tokenizer):
    """experiment=demo_reward_proxy / demo_reward_judge: demo_reward's settings on parts 0 and 1 of 2 of all the
    pairs not held out; the same held-out pairs (checked on the tiny data, with its val_size)."""
    records = []
    for preset, part in (("demo_reward_proxy", [0, 2]), ("demo_reward_judge", [1, 2])):
        cfg = _compose(["stage=reward", f"experiment={preset}", "model=tiny", f"data.path={hh_file}",
                        "data.val_size=8"], tmp_path)
        assert (cfg.data.limit, list(cfg.data.train_part), cfg.model.trainable_layers) == (None, part, 4)
        datamodule = instantiate(OmegaConf.to_container(cfg.datamodule, resolve=True), tokenizer=tokenizer)
        datamodule.setup("fit")
        records.append(datamodule.split_record())
    assert compare_splits(*records) == {"shared_train": 0, "first_train_held_out_by_second": 0,
                                        "second_train_held_out_by_first": 0, "same_val": True, "same_source": True}
    assert [len(r["train"]) for r in records] == [20, 20] and len(records[0]["val"]) == 8


def test_ppo_overrides_reach_the_module_config(tmp_path):
    cfg = _compose(["stage=ppo", "model=tiny", "reward_model_path=x", "ppo.kl_coef=0.2", "ppo.clip_eps=0.1"], tmp_path)
    from rlhf_lightning.config.schema import as_config
    from rlhf_lightning.modules import PPOConfig

    ppo = as_config(PPOConfig, OmegaConf.to_container(cfg.module.ppo, resolve=True))
    assert (ppo.kl_coef, ppo.clip_eps) == (0.2, 0.1)


def test_ppo_without_reward_model_path_is_a_config_error(tmp_path):
    from omegaconf.errors import InterpolationToMissingValueError, MissingMandatoryValue

    cfg = _compose(["stage=ppo", "model=tiny"], tmp_path)
    with pytest.raises((MissingMandatoryValue, InterpolationToMissingValueError), match="reward_model_path"):
        OmegaConf.to_container(cfg.module, resolve=True, throw_on_missing=True)


def _train(*overrides: str, run_dir: Path, status: int = 0) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), *sys.path])}
    # The default callbacks (progress bar, checkpoints) with the trainer switching both off: the
    # trainer settings win (without_disabled_callbacks), Lightning would otherwise refuse the run.
    cmd = [sys.executable, str(ROOT / "train.py"), *overrides, f"hydra.run.dir={run_dir}",
           "trainer.enable_progress_bar=false"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == status, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


#: What a newcomer's first run must not show (issue 25): transformers' table of the reward model's missing head
#: (expected: this project initialises it), Lightning's tip for its hosted logger, a deprecation warning torch
#: raises inside Lightning, the model-summary table (each module logs its networks' sizes in one line).
NOISE = ("LOAD REPORT", "litlogger", "LeafSpec", "┏━━", "Loading weights")


@pytest.mark.slow
def test_train_py_runs_reward_value_ppo_on_tiny(tmp_path, hh_file):
    common = ["model=tiny", f"data.path={hh_file}", "trainer.enable_checkpointing=false"]
    reward_dir, value_dir, ppo_dir = tmp_path / "reward", tmp_path / "value", tmp_path / "ppo"
    first = _train("stage=reward", *common, "data.val_size=8", "reward.max_length=64", "reward.batch_size=4",
                   "trainer.max_epochs=1", run_dir=reward_dir)
    assert (reward_dir / "model" / "model.safetensors").exists()
    assert not [noise for noise in NOISE if noise in first.stdout + first.stderr]
    reward_header = (reward_dir / "csv" / "metrics.csv").read_text().splitlines()[0]
    assert all(key in reward_header for key in ("val/accuracy_ci_low", "val/ece", "val/acc_chosen_shorter"))
    evaluation = rm_eval.main([str(reward_dir / "model"), str(hh_file), "--heldout", "--resamples", "200"])
    assert evaluation["subset"] == "val" and evaluation["pairs"] == 8 and evaluation["max_length"] == 64
    assert json.loads((reward_dir / "rm_eval.json").read_text())["accuracy"] == evaluation["accuracy"]
    assert (reward_dir / "rm_eval.png").read_bytes()[:4] == b"\x89PNG"
    _train("stage=value", *common, f"reward_model_path={reward_dir}/model", "iterations=2", "batch_size=4",
           "value.generation.max_new_tokens=8", run_dir=value_dir)
    assert (value_dir / "model" / "model.safetensors").exists()
    _train("stage=ppo", *common, f"reward_model_path={reward_dir}/model", f"critic_path={value_dir}/model",
           "iterations=2", "batch_size=4", "ppo.ppo_epochs=1", "ppo.generation.max_new_tokens=8", run_dir=ppo_dir)
    assert (ppo_dir / "model" / "model.safetensors").exists()

    summary = summarize(reward_dir, ppo_dir)
    assert 0.0 <= summary["reward_val_accuracy"] <= 1.0
    assert summary["ppo"]["objective/score"]["iterations"] == 2
    assert len(summary["samples"]) == 3 and all(s["after"] is not None for s in summary["samples"])
    assert summary["eval"]["before"]["prompts"] == summary["eval"]["after"]["prompts"] == 3
    assert summary["reward_diagnostics"]["source"] == "rm_eval" and len(summary["eval_change"]["ci"]) == 2
    assert set(summary["diagnostics"]) >= {"repeated_ngram_frac", "kl_per_token"}
    header = (ppo_dir / "csv" / "metrics.csv").read_text().splitlines()[0]
    assert "eval/score_before" in header and "eval/score_after" in header  # logged after on_train_end too
    out = subprocess.run([sys.executable, "-m", "rlhf_lightning.summary", str(reward_dir), str(ppo_dir), "--json",
                          str(tmp_path / "s.json")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "Reward model validation accuracy" in out.stdout
    assert json.loads((tmp_path / "s.json").read_text())["ppo"]["objective/kl"]["iterations"] == 2


def test_a_reward_function_failing_mid_training_ends_in_one_line(tmp_path, hh_file):
    """A reward function that returns NaN: train.py stops with one line naming the function and the row (status 1),
    not a traceback."""
    proc = _train("stage=ppo", "model=tiny", f"data.path={hh_file}", "algorithm=grpo", "reward_model_path=null",
                  "reward.functions=[{fn: test_critic_free.broken}]", "iterations=1", "batch_size=2",
                  "ppo.generation.max_new_tokens=4", "trainer.enable_checkpointing=false", run_dir=tmp_path / "ppo",
                  status=1)
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "broken" in last and "row" in last
