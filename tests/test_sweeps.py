"""A β×ε PPO multirun of train.py on the tiny model, tracked with offline W&B, then the sweep report.

Marked slow (``pytest -m slow tests/test_sweeps.py``): four PPO jobs with W&B take over a minute.
"""

from __future__ import annotations

import csv
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from rlhf_lightning.evaluation.summary import read_metrics, series

ROOT = Path(__file__).resolve().parents[1]


def read_wandb_records(path: Path) -> list:
    """The records of an offline W&B run file (``run-<id>.wandb``: a LevelDB-style log of
    ``wandb_internal_pb2.Record`` messages: 7-byte file header, 32 KiB blocks, 7-byte chunk headers)."""
    from wandb.proto import wandb_internal_pb2

    data, block, pos, pending, records = path.read_bytes(), 32768, 7, b"", []
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # block trailer
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last chunk of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def offline_run(job_dir: Path) -> dict:
    """The one offline W&B run of a job: name, group, final config (key -> value), files, and whether it exited."""
    runs = list((job_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, f"{job_dir}: expected one W&B run, found {runs}"
    (log,) = runs[0].glob("run-*.wandb")
    out = {"config": {}, "exited": False, "files": runs[0] / "files"}
    for record in read_wandb_records(log):
        kind = record.WhichOneof("record_type")
        if kind in ("run", "config"):
            updates = record.run.config.update if kind == "run" else record.config.update
            out["config"].update({u.key: json.loads(u.value_json) for u in updates})
        if kind == "run":
            out["name"], out["group"] = record.run.display_name, record.run.run_group
        out["exited"] |= kind == "exit"
    return out


def _multirun(sweep_dir: Path, hh_file: Path, tiny_dir: str, *overrides: str) -> subprocess.CompletedProcess:
    """``python train.py -m`` of short PPO runs on the tiny model (the tiny model also serves as reward model)."""
    cmd = [sys.executable, "train.py", "-m", "stage=ppo", "model=tiny", f"data.path={hh_file}",
           f"reward_model_path={tiny_dir}", "iterations=2", "batch_size=2", "ppo.ppo_epochs=1",
           "ppo.generation.max_new_tokens=4", "max_prompt_length=32", "ppo.num_sample_prompts=1", "callbacks=none",
           "trainer.enable_checkpointing=false", "trainer.enable_progress_bar=false", f"hydra.sweep.dir={sweep_dir}",
           *overrides]
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    proc = subprocess.run(cmd, cwd=ROOT, env={**env, "PYTHONUNBUFFERED": "1"}, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _job_dirs(sweep_dir: Path) -> list[Path]:
    return sorted((p for p in sweep_dir.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name))


@pytest.mark.slow  # about 60 s alone on 2 cores
def test_multirun_with_ddp_cpu_trains_each_point_once_without_relaunching_the_sweep(tmp_path, hh_file, tiny_dir):
    sweep_dir = tmp_path / "multirun"
    proc = _multirun(sweep_dir, hh_file, tiny_dir, "trainer=ddp_cpu", "ppo.kl_coef=0.01,0.2")
    output = proc.stdout + proc.stderr
    # A popen worker would re-run `train.py -m ...`: the sweep would be launched again and jobs repeated.
    assert output.count("Launching 2 jobs") == 1
    assert output.count("Initializing distributed: GLOBAL_RANK: 1, MEMBER: 2/2") == 2
    jobs = _job_dirs(sweep_dir)
    assert [p.name for p in jobs] == ["0", "1"]
    for job in jobs:
        with open(job / "csv" / "metrics.csv", newline="") as f:
            rows = list(csv.DictReader(f))
        assert sum(bool(r.get("objective/score")) for r in rows) == 2  # 2 iterations, each trained once
        evaluated = [sum(bool(r.get(f"eval/score_{when}")) for r in rows) for when in ("before", "after")]
        assert evaluated == [1, 1]
        assert (job / "model" / "model.safetensors").exists()


@pytest.mark.slow  # about 70 s alone on 2 cores (4 PPO jobs with W&B): pytest -m slow tests/test_sweeps.py
def test_ppo_beta_eps_multirun_with_offline_wandb_and_report(tmp_path, hh_file, tiny_dir):
    sweep_dir = tmp_path / "multirun"
    betas, epsilons = ["0.01", "0.2"], ["0.1", "0.3"]
    _multirun(sweep_dir, hh_file, tiny_dir, f"ppo.kl_coef={','.join(betas)}", f"ppo.clip_eps={','.join(epsilons)}",
              "logger=[csv,wandb]", "logger.wandb.mode=offline", "ppo.log_samples_every_n_steps=1")
    jobs = _job_dirs(sweep_dir)
    assert [p.name for p in jobs] == ["0", "1", "2", "3"]  # every combination once
    seen = set()
    for job in jobs:
        overrides = {o.split("=")[0]: o.split("=")[1] for o in OmegaConf.load(job / ".hydra" / "overrides.yaml")}
        beta, eps = overrides["ppo.kl_coef"], overrides["ppo.clip_eps"]
        seen.add((beta, eps))
        assert (job / "csv" / "metrics.csv").exists() and (job / "model" / "model.safetensors").exists()
        run = offline_run(job)  # its own run, finished before the next job started
        assert run["exited"]
        assert run["name"] == f"ppo-kl{beta}-clip{eps}" and run["group"] == str(sweep_dir)
        assert run["config"]["ppo"]["kl_coef"] == float(beta) and run["config"]["ppo"]["clip_eps"] == float(eps)
        # The samples table reached W&B although the CSV logger comes first in trainer.loggers.
        tables = {p.name.split("_")[0] for p in (run["files"] / "media" / "table" / "samples").glob("*.table.json")}
        assert tables == {"before", "train", "after"}
        columns = json.loads(next((run["files"] / "media" / "table" / "samples").glob("train_*.table.json"))
                             .read_text())["columns"]
        assert columns == ["phase", "step", "prompt", "response", "score", "rm_score", "ends_with_eos", "kl"]
    assert seen == {(b, e) for b in betas for e in epsilons}

    report = subprocess.run([sys.executable, "-m", "rlhf_lightning.report", str(sweep_dir)], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert report.returncode == 0, report.stderr
    rows = list(csv.DictReader((sweep_dir / "report.csv").open()))
    assert {(r["kl_coef"], r["clip_eps"]) for r in rows} == {(str(float(b)), str(float(e))) for b, e in seen}
    assert all(r["iterations"] == "2" for r in rows) and any(r["pareto"] == "True" for r in rows)
    assert (sweep_dir / "report.png").read_bytes()[:4] == b"\x89PNG"
    assert (sweep_dir / "report.md").read_text().count("\n") == 2 + 4


@pytest.mark.slow  # about 40 s alone on 2 cores
def test_ppo_optuna_preset_runs_trials_and_reports_the_best_point(tmp_path, hh_file, tiny_dir):
    sweep_dir = tmp_path / "optuna"
    _multirun(sweep_dir, hh_file, tiny_dir, "hparams_search=ppo_optuna", "hydra.sweeper.n_trials=2")
    assert [p.name for p in _job_dirs(sweep_dir)] == ["0", "1"]
    results = OmegaConf.load(sweep_dir / "optimization_results.yaml")
    assert set(results.best_params) == {"ppo.kl_coef", "ppo.clip_eps"}
    assert 0.005 <= results.best_params["ppo.kl_coef"] <= 0.5 and 0.05 <= results.best_params["ppo.clip_eps"] <= 0.4
    # The best value is the objective (objective/rlhf_reward) of one of the trials.
    finals = [series(read_metrics(job), "objective/rlhf_reward")[-1] for job in _job_dirs(sweep_dir)]
    assert max(finals) == pytest.approx(results.best_value, rel=1e-5)


@pytest.mark.slow  # about 50 s alone on 2 cores (4 PPO jobs)
def test_estimator_by_beta_multirun_and_report_by_estimator(tmp_path, hh_file, tiny_dir):
    """ppo.adv_estimator=gae,grpo x ppo.kl_coef: GAE jobs load and export a critic, GRPO jobs do not; the
    report gives each run its estimator and each estimator its own Pareto frontier."""
    sweep = tmp_path / "sweep"
    _multirun(sweep, hh_file, tiny_dir, "ppo.adv_estimator=gae,grpo", "ppo.kl_coef=0.01,0.2", "ppo.num_generations=2")
    jobs = _job_dirs(sweep)
    assert len(jobs) == 4
    estimators = [OmegaConf.load(job / ".hydra" / "config.yaml").ppo.adv_estimator for job in jobs]
    assert sorted(estimators) == ["gae", "gae", "grpo", "grpo"]
    for job, estimator in zip(jobs, estimators, strict=True):
        assert (job / "model" / "config.json").exists()
        assert (job / "model_critic").exists() == (estimator == "gae")
        assert len(series(read_metrics(job), "objective/score")) == 2
    proc = subprocess.run([sys.executable, "-m", "rlhf_lightning.report", str(sweep)], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    rows = list(csv.DictReader((sweep / "report.csv").open()))
    assert sorted(r["adv_estimator"] for r in rows) == ["gae", "gae", "grpo", "grpo"]
    assert {r["adv_estimator"] for r in rows if r["pareto"] == "True"} == {"gae", "grpo"}


@pytest.mark.slow  # about 60 s alone on 2 cores (3 PPO jobs, 3 evaluations each)
def test_overoptimization_sweep_draws_proxy_and_judge_against_sqrt_kl(tmp_path, hh_file, tiny_dir):
    """``sweep=overoptimization``: PPO at several β with a judge reward model beside the proxy, evaluated along
    training; the report writes the overoptimization table (one row per β: where the judge peaked) and figure."""
    from rlhf_lightning.models import load_scalar_model, load_tokenizer

    judge_dir = tmp_path / "judge" / "model"
    load_scalar_model(tiny_dir, seed=7).save_pretrained(judge_dir)
    load_tokenizer(tiny_dir).save_pretrained(judge_dir)
    sweep_dir = tmp_path / "multirun"
    _multirun(sweep_dir, hh_file, tiny_dir, "sweep=overoptimization", f"judge_path={judge_dir}",
              "ppo.kl_coef=0.0,0.05,0.2", "iterations=4", "ppo.num_sample_prompts=2", "policy_optim.lr=1e-2")
    jobs = _job_dirs(sweep_dir)
    assert len(jobs) == 3
    for job in jobs:
        rows = [r for r in read_metrics(job) if "eval/kl" in r and "eval/judge/judge" in r]
        assert len(rows) == 3  # before, after iteration 2, after the last (4)
    report = subprocess.run([sys.executable, "-m", "rlhf_lightning.report", str(sweep_dir)], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert report.returncode == 0, report.stderr
    table = (sweep_dir / "overoptimization.md").read_text().splitlines()
    assert len(table) == 2 + 3 and all("| judge |" in line for line in table[2:])
    assert (sweep_dir / "overoptimization.png").read_bytes()[:4] == b"\x89PNG"
    assert "overoptimization.md" in report.stdout
