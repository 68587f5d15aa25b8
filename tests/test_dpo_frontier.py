"""PPO and DPO from the same reward model, evaluated on the same held-out prompts, on one report frontier
(train.py and python -m rlhf_lightning.report, tiny model)."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _prompts(run_dir: Path, phase: str) -> list[str]:
    rows = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    return [r["prompt"] for r in rows if r["phase"] == phase]


@pytest.mark.slow
def test_ppo_and_dpo_share_one_frontier(tmp_path, hh_file):
    common = ["model=tiny", f"data.path={hh_file}", "trainer.enable_checkpointing=false",
              "trainer.enable_progress_bar=false"]
    reward_dir, sweep = tmp_path / "reward", tmp_path / "runs"
    _run("train.py", "stage=reward", *common, "data.val_size=8", "reward.max_length=64", "reward.batch_size=4",
         f"hydra.run.dir={reward_dir}")
    rm = f"reward_model_path={reward_dir}/model"
    _run("train.py", "stage=ppo", *common, rm, "iterations=2", "batch_size=4", "ppo.ppo_epochs=1",
         "ppo.generation.max_new_tokens=8", f"hydra.run.dir={sweep / 'ppo'}")
    dpo = ["stage=dpo", *common, rm, "data.val_size=4", "dpo.max_length=64", "dpo.batch_size=4", "dpo.optim.lr=1e-4",
           "trainer.max_steps=3", "dpo.generation.max_new_tokens=8"]
    _run("train.py", *dpo, f"hydra.run.dir={sweep / 'dpo'}")
    _run("train.py", *dpo, "dpo.loss_type=ipo", f"hydra.run.dir={sweep / 'ipo'}")
    dpo_dir = sweep / "dpo"
    assert (dpo_dir / "model" / "model.safetensors").exists() and (dpo_dir / "ref_logps.pt").exists()
    # the same held-out prompts, answered before training by the same (initial) policy with the same seed
    assert _prompts(dpo_dir, "before") == _prompts(sweep / "ppo", "before") and len(_prompts(dpo_dir, "after")) == 3
    before = [json.loads(line) for line in (dpo_dir / "samples.jsonl").read_text().splitlines()][:3]
    ppo_before = [json.loads(line) for line in (sweep / "ppo" / "samples.jsonl").read_text().splitlines()][:3]
    assert [r["score"] for r in before] == pytest.approx([r["score"] for r in ppo_before], abs=1e-4)
    header = (dpo_dir / "csv" / "metrics.csv").read_text().splitlines()[0].split(",")
    for key in ("train/loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
                "eval/score_before", "eval/score_after", "eval/kl_after"):
        assert key in header, key

    out = _run("-m", "rlhf_lightning.report", str(sweep), "--eval")
    assert "wrote" in out.stdout and (sweep / "report.png").stat().st_size > 0
    with (sweep / "report.csv").open() as f:
        rows = {Path(r["run_dir"]).name: r for r in csv.DictReader(f)}
    assert {name: rows[name]["adv_estimator"] for name in rows} == {"ppo": "gae", "dpo": "dpo", "ipo": "ipo"}
    assert rows["dpo"]["kl_coef"] == "0.1" and rows["dpo"]["clip_eps"] == ""
    assert rows["dpo"]["first_score"] == rows["ppo"]["first_score"]  # one starting point for both stages
