"""rlhf_lightning.evaluation.report on hand-made sweep directories (no training)."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from rlhf_lightning.evaluation.diagnostics import bootstrap_ci
from rlhf_lightning.evaluation.report import find_runs, pareto_front, report, run_params, summarize_run, uses_eval

ROOT = Path(__file__).resolve().parents[1]


def _job(root: Path, name: str, kl_coef: float, clip_eps: float, scores: list[float], kls: list[float],
         in_config: bool = True, adv_estimator: str | None = None) -> Path:
    """A job directory as train.py writes it: csv/metrics.csv (score and KL rows interleaved with other
    metrics' rows, as Lightning's CSVLogger does) and .hydra/{config,overrides}.yaml."""
    job = root / name
    (job / "csv").mkdir(parents=True)
    (job / ".hydra").mkdir()
    with (job / "csv" / "metrics.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["step", "objective/score", "objective/kl", "value/loss"])
        writer.writeheader()
        for step, (score, kl) in enumerate(zip(scores, kls, strict=True)):
            writer.writerow({"step": step, "objective/score": score, "objective/kl": kl, "value/loss": ""})
            writer.writerow({"step": step, "objective/score": "", "objective/kl": "", "value/loss": 0.5})
    ppo = f"ppo:\n  kl_coef: {kl_coef}\n  clip_eps: {clip_eps}\n" if in_config else "seed: 0\n"
    (job / ".hydra" / "config.yaml").write_text(ppo)
    estimator = f"- ppo.adv_estimator={adv_estimator}\n" if adv_estimator else ""
    (job / ".hydra" / "overrides.yaml").write_text(f"- ppo.kl_coef={kl_coef}\n- ppo.clip_eps={clip_eps}\n- stage=ppo\n"
                                                   + estimator)
    return job


@pytest.fixture
def sweep(tmp_path) -> Path:
    root = tmp_path / "multirun"
    _job(root, "0", 0.01, 0.1, scores=[1.0, 1.5, 3.0], kls=[0.0, 0.5, 4.0])   # gain 2/4 = 0.5, frontier
    _job(root, "1", 0.01, 0.3, scores=[1.0, 2.0], kls=[0.0, 5.0])              # dominated by 0
    _job(root, "2", 0.2, 0.1, scores=[0.5, 1.6], kls=[0.0, 1.0])               # frontier
    _job(root, "10", 0.2, 0.3, scores=[1.0, 1.2], kls=[0.0, 0.0], in_config=False)  # KL 0: no gain, frontier
    return root


def test_summarize_run_reads_beta_eps_and_gain_per_nat(sweep):
    result = summarize_run(sweep / "0")
    assert (result.kl_coef, result.clip_eps) == (0.01, 0.1)
    assert (result.first_score, result.final_score, result.final_kl, result.iterations) == (1.0, 3.0, 4.0, 3)
    assert result.gain_per_kl == pytest.approx((3.0 - 1.0) / 4.0)


def test_gain_per_nat_is_none_when_the_kl_is_about_zero(sweep):
    result = summarize_run(sweep / "10")
    assert result.final_kl == 0.0 and result.gain_per_kl is None


def test_beta_eps_fall_back_to_the_overrides(sweep):
    assert run_params(sweep / "10") == {"kl_coef": 0.2, "clip_eps": 0.3, "adv_estimator": "gae"}


def test_the_pareto_frontier_is_per_estimator(sweep, tmp_path):
    """A GRPO run dominated by a GAE run is still on GRPO's frontier; the plot and table group by estimator."""
    _job(sweep, "11", 0.05, 0.2, scores=[1.0, 1.1], kls=[0.0, 6.0], adv_estimator="grpo")
    results = report(sweep, tmp_path / "out")
    assert [r.adv_estimator for r in results] == ["gae", "gae", "gae", "gae", "grpo"]
    rows = {r["run_dir"].rsplit("/", 1)[-1]: r for r in csv.DictReader((tmp_path / "out" / "report.csv").open())}
    assert rows["11"]["pareto"] == "True" and rows["1"]["pareto"] == "False"
    assert "| 11 | grpo | 0.05 | 0.2 |" in (tmp_path / "out" / "report.md").read_text()


def test_pareto_front_keeps_the_undominated_runs_sorted_by_kl(sweep):
    results = [summarize_run(d) for d in find_runs(sweep)]
    assert [Path(r.run_dir).name for r in results] == ["0", "1", "2", "10"]  # job order, not string order
    assert [Path(r.run_dir).name for r in pareto_front(results)] == ["10", "2", "0"]


def test_report_writes_table_csv_and_png(sweep, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "rlhf_lightning.report", str(sweep), "--out", str(tmp_path / "out")],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    rows = list(csv.DictReader((tmp_path / "out" / "report.csv").open()))
    assert [(r["kl_coef"], r["clip_eps"], r["pareto"]) for r in rows] == [
        ("0.01", "0.1", "True"), ("0.01", "0.3", "False"), ("0.2", "0.1", "True"), ("0.2", "0.3", "True")]
    markdown = (tmp_path / "out" / "report.md").read_text()
    assert markdown.count("\n") == 2 + 4 and "| 0 | gae | 0.01 | 0.1 | 1 | 3 | 4 | 0.5 | ✓ |" in markdown
    assert "| n/a |" in markdown  # the KL-0 run's gain
    assert (tmp_path / "out" / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_no_run_is_an_error_naming_the_directory(tmp_path):
    (tmp_path / "empty" / "0").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=f"no run found in {tmp_path / 'empty'}"):
        report(tmp_path / "empty")
    proc = subprocess.run([sys.executable, "-m", "rlhf_lightning.report", str(tmp_path / "empty")], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and str(tmp_path / "empty") in proc.stderr


def _with_eval(job: Path, score_before: float, scores_after: list[float], kls_after: list[float],
               length_corr: float = 0.3, repeated: float = 0.1) -> Path:
    """Add what a PPO run with the fixed-prompt evaluation writes: eval/* and diagnostics/* metrics, and the
    evaluation rows of samples.jsonl (an older 'after' at step 1 first, as a resumed run could leave)."""
    metrics = job / "csv" / "metrics.csv"
    rows = list(csv.DictReader(metrics.open()))
    keys = ["eval/score_before", "eval/score_after", "eval/kl_after", "diagnostics/length_score_corr",
            "diagnostics/repeated_ngram_frac"]
    for row in rows:
        row.update(dict.fromkeys(keys, ""))
        if row["objective/score"]:
            row.update({"diagnostics/length_score_corr": 0.0, "diagnostics/repeated_ngram_frac": 0.0})
    rows[-2].update({"diagnostics/length_score_corr": length_corr, "diagnostics/repeated_ngram_frac": repeated})
    rows.append({"step": 99, "eval/score_before": score_before,
                 "eval/score_after": sum(scores_after) / len(scores_after),
                 "eval/kl_after": sum(kls_after) / len(kls_after)})
    with metrics.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    samples = [{"phase": "after", "step": 1, "score": -50.0, "kl": 50.0}]
    samples += [{"phase": "before", "step": 0, "score": score_before, "kl": 0.0}]
    samples += [{"phase": "after", "step": 2, "score": s, "kl": k}
                for s, k in zip(scores_after, kls_after, strict=True)]
    (job / "samples.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples))
    return job


def test_the_fixed_prompt_evaluation_with_bootstrap_intervals_replaces_the_training_batch(tmp_path):
    root = tmp_path / "multirun"
    # job 0: the better last training batch, the worse held-out evaluation (at the same KL as job 1's)
    _with_eval(_job(root, "0", 0.05, 0.2, scores=[0.0, 5.0], kls=[0.0, 1.0]), 0.1, [0.0, 0.2, 0.1, 0.3], [1.0] * 4,
               length_corr=0.8)
    _with_eval(_job(root, "1", 0.1, 0.2, scores=[0.0, 1.0], kls=[0.0, 1.0]), 0.1, [0.4, 0.9, 0.5, 0.6],
               [0.5, 1.5, 1.0, 1.0])
    results = report(root, tmp_path / "out")
    first = results[0]
    assert first.eval_score_after == pytest.approx(0.15) and first.eval_kl_after == pytest.approx(1.0)
    assert (first.eval_score_low, first.eval_score_high) == pytest.approx(bootstrap_ci([0.0, 0.2, 0.1, 0.3]))
    assert first.eval_score_low < 0.15 < first.eval_score_high and first.eval_kl_low == first.eval_kl_high == 1.0
    assert (first.length_score_corr, first.repeated_ngram_frac) == (0.8, 0.1)  # the last iteration's
    assert uses_eval(results)
    assert [Path(r.run_dir).name for r in pareto_front(results, use_eval=True)] == ["1"]
    assert [Path(r.run_dir).name for r in pareto_front(results)] == ["0"]  # by the training batch
    rows = {r["run_dir"].rsplit("/", 1)[-1]: r for r in csv.DictReader((tmp_path / "out" / "report.csv").open())}
    assert rows["1"]["pareto"] == "True" and rows["0"]["pareto"] == "False"
    markdown = (tmp_path / "out" / "report.md").read_text()
    low, high = bootstrap_ci([0.0, 0.2, 0.1, 0.3])
    assert f"| 0.1 → 0.15 [{low:.4g}, {high:.4g}] | 1 [1, 1] | 0.8 | 0.1 |" in markdown
    assert (tmp_path / "out" / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_runs_without_the_evaluation_are_compared_on_the_training_batch(sweep, tmp_path):
    _with_eval(sweep / "0", 0.0, [1.0, 2.0], [0.5, 0.5])  # one run of four has it: not comparable
    results = report(sweep, tmp_path / "out")
    assert not uses_eval(results) and results[0].eval_score_after == 1.5 and results[1].eval_score_after is None
    assert "| n/a | n/a | n/a | n/a |" in (tmp_path / "out" / "report.md").read_text()
