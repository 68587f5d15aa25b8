"""Judges of the held-out evaluation (``eval.judges``, issue 23): scorers that see the fixed held-out responses and
never a training batch, logged with intervals and paired changes before, along and after training, and the
overoptimization picture drawn from them (``report``, ``summary``)."""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger

from rlhf_lightning.config.schema import EvalConfig, as_config
from rlhf_lightning.data import PromptDataModule
from rlhf_lightning.evaluation.heldout import HeldOutEvaluation, heldout_metrics
from rlhf_lightning.evaluation.judges import judge_name, load_judges
from rlhf_lightning.evaluation.report import eval_curve, summarize_run, write_overoptimization
from rlhf_lightning.evaluation.summary import judge_label, summarize
from rlhf_lightning.models import load_policy, load_reference, load_scalar_model
from rlhf_lightning.modules import DPOModule, PPOModule

SEEN: list[list[str]] = []


def response_chars(completions, prompts=None, **kwargs):
    """A judge with TRL's signature: each response's length in characters; records the prompts it was shown."""
    SEEN.append(list(prompts))
    return [float(len(c)) for c in completions]


def test_heldout_metrics_by_hand():
    rows = [{"prompt": "a", "score": 1.0, "rm_score": 1.0, "kl": 0.5, "ends_with_eos": True, "judge/j": 0.0},
            {"prompt": "b", "score": 3.0, "rm_score": 2.0, "kl": 1.5, "ends_with_eos": False, "judge/j": 2.0}]
    baseline = [{**r, "score": 0.0, "judge/j": 2.0} for r in rows]
    m = heldout_metrics(rows, baseline)
    assert (m["eval/score"], m["eval/rm_score"], m["eval/kl"], m["eval/eos_frac"], m["eval/judge/j"]) == \
        (2.0, 1.5, 1.0, 0.5, 1.0)
    assert m["eval/score_change"] == 2.0 and m["eval/judge/j_change"] == -1.0  # (1 + 3) / 2 ; (-2 + 0) / 2
    assert 1.0 <= m["eval/score_ci_low"] <= 2.0 <= m["eval/score_ci_high"] <= 3.0
    assert m["eval/judge/j_change_ci_low"] == pytest.approx(-2.0) and m["eval/judge/j_change_ci_high"] == 0.0
    assert "eval/score_change" not in heldout_metrics(rows)  # no baseline: no change
    with pytest.raises(ValueError, match="prompts"):
        heldout_metrics(rows, baseline[::-1])


def test_judge_label_never_repeats_judge():
    assert judge_label("judge") == "judge"  # the demo's judge is named judge: not "judge judge"
    assert judge_label("gold_rm") == "judge gold_rm"


def test_judge_settings_and_loading_errors(tmp_path, tiny_dir):
    assert judge_name({"path": "outputs/judge_rm/model"}) == "judge_rm"
    assert judge_name({"fn": "pkg.mod.my_judge"}) == "my_judge" and judge_name({"name": "x", "fn": "a.b"}) == "x"
    for bad, kind, match in (([{"path": "a", "fn": "b.c"}], ValueError, "exactly one of path"),
                             ([{"name": "x"}], ValueError, "exactly one of path"),
                             ([{"path": "a", "weight": 2}], TypeError, "judges\\[0\\].weight"),
                             (["a/model"], TypeError, "mapping")):
        with pytest.raises(kind, match=match):
            as_config(EvalConfig, {"judges": bad}, "eval")
    with pytest.raises(ValueError, match="every_n_iterations"):
        as_config(EvalConfig, {"every_n_iterations": 0}, "eval")
    with pytest.raises(FileNotFoundError, match="eval.judges\\[0\\].path"):
        load_judges({"judges": [{"path": str(tmp_path / "missing")}]})
    with pytest.raises(ValueError, match="second judge named 'response_chars'"):
        load_judges({"judges": [{"fn": "test_judges.response_chars"}, {"fn": "test_judges.response_chars"}]})
    judges = load_judges({"judges": [{"path": tiny_dir, "name": "rm"}, {"fn": "test_judges.response_chars"}]})
    assert [j.name for j in judges] == ["rm", "response_chars"]
    assert judges[0].model is not None and not any(p.requires_grad for p in judges[0].model.parameters())


def test_judges_score_the_heldout_responses_only_before_along_and_after_ppo(tmp_path, tiny_dir, tokenizer, hh_file):
    """A reward-model judge and a function judge, evaluated before, every iteration and after 3 PPO iterations: the
    function sees the held-out prompts only (never a training batch); eval/judge/<name> is logged at each of the 4
    evaluations with intervals, and the change paired with the prompts' before rows; the report draws the curve."""
    judge_dir = tmp_path / "judge_rm" / "model"
    load_scalar_model(tiny_dir, seed=7).save_pretrained(judge_dir)
    tokenizer.save_pretrained(judge_dir)
    L.seed_everything(0)
    dm = PromptDataModule(tokenizer, str(hh_file), batch_size=4, max_prompt_length=48, val_size=3)
    rm = load_scalar_model(tiny_dir, frozen=True, seed=1)
    module = PPOModule(load_policy(tiny_dir, trainable_layers=1), load_reference(tiny_dir),
                       load_scalar_model(tiny_dir, trainable_layers=1), rm, tokenizer,
                       ppo={"ppo_epochs": 1, "num_sample_prompts": 3, "log_samples_every_n_steps": 0,
                            "generation": {"max_new_tokens": 5}},
                       policy_optim={"lr": 1e-2}, samples_path=str(tmp_path / "run" / "samples.jsonl"),
                       eval={"every_n_iterations": 1,
                             "judges": [{"path": str(judge_dir)}, {"fn": "test_judges.response_chars"}]})
    SEEN.clear()
    trainer = L.Trainer(accelerator="cpu", max_steps=3 * module.optimizer_steps_per_iteration, max_epochs=-1,
                        logger=CSVLogger(tmp_path / "run", name="csv", version=""), enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        log_every_n_steps=1, default_root_dir=tmp_path)
    trainer.fit(module, datamodule=dm)
    trainer.loggers[0].save()

    held_out = [dm.prompts[item["prompt_index"]] for item in dm.val_dataset]  # chat messages, as TRL passes them
    assert len(SEEN) == 4  # before, after iterations 1 and 2, after the last
    assert all(len(prompts) == 3 and all(p in held_out for p in prompts) for prompts in SEEN)
    curve = eval_curve(tmp_path / "run")
    assert curve is not None and len(curve.kl) == 4 and set(curve.judges) == {"judge_rm", "response_chars"}
    assert curve.kl[0] == 0.0 and curve.kl[-1] > 0  # the policy moved (lr 1e-2)
    rows = [json.loads(line) for line in (tmp_path / "run" / "samples.jsonl").read_text().splitlines()]
    before = [r for r in rows if r["phase"] == "before"]
    after = [r for r in rows if r["phase"] == "after"]
    assert [r["phase"] for r in rows].count("during") == 6 and len(before) == len(after) == 3
    assert curve.judges["response_chars"][-1] == pytest.approx(sum(len(r["response"]) for r in after) / 3)
    summary = summarize(None, tmp_path / "run")
    judge = summary["judges"]["response_chars"]
    change = [len(a["response"]) - len(b["response"]) for a, b in zip(after, before, strict=True)]
    assert judge["change"] == pytest.approx(sum(change) / 3) and judge["prompts"] == 3
    assert judge["change_ci"][0] <= judge["change"] <= judge["change_ci"][1]
    assert summary["eval_curve"]["peaks"]["judge_rm"] in range(4)
    written = write_overoptimization([(summarize_run(tmp_path / "run"), curve)], tmp_path)
    assert written is not None and all(p.exists() for p in written)
    table = written[0].read_text()
    assert "judge_rm" in table and "response_chars" in table
    state = module.heldout.state_dict()  # the before rows travel with checkpoints: a resumed run keeps its baseline
    fresh = HeldOutEvaluation(module.heldout.collect, 3, "k1", 0, False, None)
    fresh.load_state_dict(state)
    assert [r["prompt"] for r in fresh.baseline] == [r["prompt"] for r in before]


def test_dpo_logs_its_judges_too(tmp_path, tiny_dir, tokenizer, hh_file):
    from rlhf_lightning.data import DPODataModule

    L.seed_everything(0)
    eval_prompts = PromptDataModule(tokenizer, str(hh_file), max_prompt_length=32, val_size=2)
    dm = DPODataModule(tokenizer, str(hh_file), eval_prompts=eval_prompts, num_eval_prompts=2, val_size=0,
                       batch_size=2, max_length=48)
    module = DPOModule(load_policy(tiny_dir, trainable_layers=1), load_reference(tiny_dir), None, tokenizer,
                       dpo={"optim": {"lr": 1e-2}, "num_sample_prompts": 2, "generation": {"max_new_tokens": 4}},
                       eval={"judges": [{"fn": "test_judges.response_chars", "name": "chars"}]})
    results = {}
    evaluate = module.evaluate_samples
    module.evaluate_samples = lambda phase: results.setdefault(phase, evaluate(phase))
    L.Trainer(accelerator="cpu", max_steps=2, max_epochs=-1, logger=False, enable_checkpointing=False,
              enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
              default_root_dir=tmp_path).fit(module, datamodule=dm)
    assert set(results) == {"before", "after"}
    assert "eval/judge/chars" in results["after"] and "eval/judge/chars_change" in results["after"]
    assert torch.isfinite(torch.tensor(results["after"]["eval/judge/chars_change_ci_high"]))
