"""stage=dpo on the tiny model: the collator's layout, the response log-probabilities, the reference cache,
the loss the module minimises, training, the configs, and the report's DPO groups."""

from __future__ import annotations

import csv
import itertools
import math
from pathlib import Path

import lightning as L
import pytest
import torch
from omegaconf import OmegaConf

from conftest import compose_run_config
from rlhf_lightning.algorithms.losses import dpo_loss
from rlhf_lightning.data import DPOCollator, DPODataModule, PromptDataModule, pair_key
from rlhf_lightning.evaluation.report import run_params, summarize_run
from rlhf_lightning.models import load_policy, load_reference
from rlhf_lightning.modules import DPOModule

ITEMS = [{"prompt_ids": [5, 6, 7], "chosen_ids": [8, 9, 2], "rejected_ids": [10, 2], "where": "f:1"},
         {"prompt_ids": [11], "chosen_ids": [12, 2], "rejected_ids": [13, 14, 15, 2], "where": "f:2"}]


def test_collator_left_pads_prompts_and_right_pads_responses():
    batch = DPOCollator(pad_token_id=0)(ITEMS)
    assert batch["response_start"] == 3
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9, 2, 0], [0, 0, 11, 12, 2, 0, 0],
                                           [5, 6, 7, 10, 2, 0, 0], [0, 0, 11, 13, 14, 15, 2]]
    assert batch["attention_mask"].sum(1).tolist() == [6, 3, 5, 5]
    assert batch["response_mask"].sum(1).tolist() == [3, 2, 2, 4]
    assert batch["keys"] == [pair_key(ITEMS[0]), pair_key(ITEMS[1])]
    changed = dict(ITEMS[0], chosen_ids=[8, 9, 9, 2])
    assert pair_key(changed) != pair_key(ITEMS[0]) and pair_key(changed).startswith("f:1#")


def test_sequence_logps_equal_unpadded_forwards(tiny_dir):
    """Each row's summed response log-probability equals a forward of that row alone, without padding."""
    model = load_reference(tiny_dir)
    batch = DPOCollator(pad_token_id=0)(ITEMS)
    logps, lengths = DPOModule.sequence_logps(model, batch)
    rows = [(it["prompt_ids"], it[side]) for side in ("chosen_ids", "rejected_ids") for it in ITEMS]
    for i, (prompt, response) in enumerate(rows):
        ids = torch.tensor([prompt + response])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, len(prompt) - 1: -1].float()
        want = torch.log_softmax(logits, -1).gather(1, torch.tensor(response)[:, None]).sum()
        assert logps[i].item() == pytest.approx(want.item(), abs=1e-4)
        assert lengths[i].item() == len(response)


def _datamodule(tokenizer, hh_file, **kwargs) -> DPODataModule:
    def prompts(tokenizer):
        return PromptDataModule(tokenizer, str(hh_file), val_size=2, batch_size=1, seed=0)

    settings = {"max_length": 64, "val_size": 4, "batch_size": 4, "eval_batch_size": 8, "seed": 0} | kwargs
    return DPODataModule(tokenizer, str(hh_file), eval_prompts=prompts, num_eval_prompts=2, **settings)


def test_datamodule_leaves_out_the_evaluation_prompts_pairs(tokenizer, hh_file):
    dm = _datamodule(tokenizer, hh_file, val_size=0)  # no validation pairs: the evaluation's are in training
    dm.setup("fit")
    held_out = [dm.eval_prompts.prompts[int(i)] for i in dm.sample_batch(2)["prompt_index"]]
    assert len(held_out) == 2 and dm.stats["eval_prompt_pairs_removed"] == 2 and len(dm.train_dataset) == 46
    assert not any(item["prompt"] in held_out for item in dm.train_dataset)
    assert len(list(dm.reference_dataloader().dataset)) == len(dm.train_dataset) + len(dm.val_dataset)


def _fit(module, dm, run_dir: Path, max_steps: int) -> L.Trainer:
    trainer = L.Trainer(accelerator="cpu", max_steps=max_steps, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        default_root_dir=run_dir)
    trainer.fit(module, datamodule=dm)
    return trainer


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_the_module_minimises_dpo_loss_of_the_cached_reference(tiny_dir, tokenizer, hh_file, tmp_path, loss_type):
    """The module's loss is dpo_loss of the policy's and the cached reference's sums (IPO: per-token means);
    at the start the policy is the reference, so the loss is log 2 (DPO) or (1/(2β))² (IPO)."""
    dm = _datamodule(tokenizer, hh_file)
    cache = tmp_path / "ref_logps.pt"
    module = DPOModule(load_policy(tiny_dir), load_reference(tiny_dir), None, tokenizer,
                       dpo={"beta": 0.5, "loss_type": loss_type, "num_sample_prompts": 0}, ref_logps_path=str(cache))
    _fit(module, dm, tmp_path, max_steps=1)
    assert cache.exists() and len(module.ref_cache) == len(dm.train_dataset) + len(dm.val_dataset)
    batch = next(iter(dm.reference_dataloader()))
    ref = module.cached_reference(batch["keys"])
    with torch.no_grad():
        logps, lengths = module.sequence_logps(module.ref_policy, batch)
    n = len(batch["keys"])
    assert ref[:, 0].tolist() == pytest.approx(logps[:n].tolist(), abs=1e-4)
    assert ref[:, 3].tolist() == lengths[n:].tolist()
    # a fresh policy (= the reference): the loss at h = 0
    fresh = DPOModule(load_policy(tiny_dir), module.ref_policy, None, tokenizer,
                      dpo={"beta": 0.5, "loss_type": loss_type}, ref_logps_path=str(cache))
    fresh.ref_cache = module.ref_cache
    fresh.log_dict = lambda *a, **k: None
    loss = fresh.training_step(batch, 0)
    assert loss.item() == pytest.approx(math.log(2) if loss_type == "sigmoid" else 1.0, abs=1e-4)
    # a trained policy: the loss is dpo_loss of its sums (means for IPO)
    module.log_dict = lambda *a, **k: None
    loss = module.training_step(batch, 0)
    with torch.no_grad():
        pol, pol_len = module.sequence_logps(module.policy, batch)
    if loss_type == "ipo":
        pol, ref = pol / pol_len, torch.stack([ref[:, 0] / ref[:, 2], ref[:, 1] / ref[:, 3]], 1)
    want = dpo_loss(pol[:n], pol[n:], ref[:, 0], ref[:, 1], 0.5, loss_type)[0].mean()
    assert loss.item() == pytest.approx(want.item(), abs=1e-5)


def test_reference_cache_is_reused(tiny_dir, tokenizer, hh_file, tmp_path):
    dm = _datamodule(tokenizer, hh_file)
    cache = tmp_path / "ref_logps.pt"
    first = DPOModule(load_policy(tiny_dir), load_reference(tiny_dir), None, tokenizer,
                      dpo={"num_sample_prompts": 0}, ref_logps_path=str(cache))
    _fit(first, dm, tmp_path, max_steps=1)
    second = DPOModule(load_policy(tiny_dir), load_reference(tiny_dir), None, tokenizer,
                       dpo={"num_sample_prompts": 0}, ref_logps_path=str(cache))
    calls = []
    original = second.reference_logps
    second.reference_logps = lambda batch: calls.append(1) or original(batch)
    _fit(second, dm, tmp_path, max_steps=1)
    assert calls == [] and second.ref_cache == first.ref_cache


def test_dpo_training_raises_the_margin(tiny_dir, tokenizer, hh_file, tmp_path):
    """Steps on one batch with a large learning rate: the implicit reward margin on it becomes positive."""
    dm = _datamodule(tokenizer, hh_file)
    module = DPOModule(load_policy(tiny_dir), load_reference(tiny_dir), None, tokenizer,
                       dpo={"beta": 0.1, "num_sample_prompts": 0, "optim": {"lr": 1e-3}})
    trainer = L.Trainer(accelerator="cpu", max_steps=8, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        overfit_batches=1)
    trainer.fit(module, datamodule=dm)
    assert trainer.callback_metrics["rewards/margins"] > 0
    assert trainer.callback_metrics["train/loss"] < math.log(2)


def test_dpo_with_lora_uses_the_policy_with_its_adapters_off_as_the_reference(tiny_dir, tokenizer, hh_file,
                                                                             tmp_path):
    """With a LoRA policy and no reference network, the cached reference log-probabilities are the base
    model's (the adapters switched off), even after the adapters moved; training raises the margin, and the
    checkpoint keeps the adapters only."""
    dm = _datamodule(tokenizer, hh_file)
    with pytest.raises(ValueError, match="LoRA policy"):
        DPOModule(load_policy(tiny_dir), None, None, tokenizer)
    module = DPOModule(load_policy(tiny_dir, lora={"r": 8}), None, None, tokenizer,
                       dpo={"beta": 0.1, "num_sample_prompts": 0, "optim": {"lr": 1e-2}})
    trainer = L.Trainer(accelerator="cpu", max_steps=8, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        overfit_batches=1, default_root_dir=tmp_path)
    trainer.fit(module, datamodule=dm)
    assert trainer.callback_metrics["rewards/margins"] > 0
    batch = next(iter(dm.reference_dataloader()))
    with torch.no_grad():
        base, _ = module.sequence_logps(load_reference(tiny_dir), batch)
        trained, _ = module.sequence_logps(module.policy, batch)
    n = len(batch["keys"])
    ref = module.cached_reference(batch["keys"])
    assert ref[:, 0].tolist() == pytest.approx(base[:n].tolist(), abs=1e-4)
    assert module.reference_logps(batch)[0].tolist() == pytest.approx(base.tolist(), abs=1e-4)
    assert not torch.allclose(trained, base, atol=1e-3)  # the adapters did move the policy
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    keys = torch.load(tmp_path / "last.ckpt", weights_only=False)["state_dict"].keys()
    assert keys and all("lora_" in key for key in keys), sorted(keys)[:5]


def test_stage_dpo_composes(tmp_path):
    cfg = compose_run_config(["stage=dpo", "model=tiny", "dpo.beta=0.3", "dpo.loss_type=ipo"], tmp_path)
    assert cfg.module._target_.endswith("DPOModule") and cfg.dpo.beta == 0.3
    assert cfg.module.ref_logps_path == f"{tmp_path}/ref_logps.pt"
    # the evaluation prompts are PPO's: the same prompt datamodule settings
    ppo = compose_run_config(["stage=ppo", "model=tiny", "reward_model_path=x"], tmp_path)
    dpo_prompts = OmegaConf.to_container(cfg.datamodule.eval_prompts, resolve=True)
    ppo_prompts = OmegaConf.to_container(ppo.datamodule, resolve=True)
    for key in ("_target_", "path", "split", "limit", "seed", "max_prompt_length", "val_size", "val_split"):
        assert dpo_prompts[key] == ppo_prompts[key], key
    with pytest.raises(Exception, match="beta"):
        compose_run_config(["stage=dpo", "model=tiny", "dpo.beta=big"], tmp_path)


def test_stage_dpo_datamodule_instantiates(tmp_path, hh_file, tokenizer):
    from hydra.utils import instantiate

    cfg = compose_run_config(["stage=dpo", "model=tiny", f"data.path={hh_file}", "data.val_size=4",
                              "dpo.batch_size=2"], tmp_path)
    dm = instantiate(OmegaConf.to_container(cfg.datamodule, resolve=True), tokenizer=tokenizer)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape[0] == 4 and len(batch["keys"]) == 2
    assert dm.sample_batch(3)["input_ids"].shape[0] == 3


def test_dpo_beta_sweep_preset(tmp_path):
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    cfg = compose_run_config(["sweep=dpo_beta", "model=tiny"], tmp_path)
    assert cfg.hydra.mode.name == "MULTIRUN" and cfg.module._target_.endswith("DPOModule")
    params = cfg.hydra.sweeper.params
    parsed = OverridesParser.create().parse_overrides([f"{k}={v}" for k, v in params.items()])
    jobs = [job for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]
    expected = itertools.product(["0.03", "0.1", "0.3"], ["sigmoid", "ipo"])
    assert sorted(jobs) == sorted([f"dpo.beta={b}", f"dpo.loss_type={t}"] for b, t in expected)


def test_validate_accepts_dpo_and_checks_its_settings(tmp_path):
    from rlhf_lightning.training.validate import ConfigError, validate_config

    validate_config(compose_run_config(["stage=dpo", "model=tiny"], tmp_path))
    with pytest.raises(ConfigError, match="dpo.label_smoothing=0.2 applies to loss_type=sigmoid only"):
        validate_config(compose_run_config(["stage=dpo", "model=tiny", "dpo.loss_type=hinge",
                                            "dpo.label_smoothing=0.2"], tmp_path))
    with pytest.raises(ConfigError, match="reward_model_path=/nonexistent/rm"):
        validate_config(compose_run_config(["stage=dpo", "model=tiny", "reward_model_path=/nonexistent/rm"],
                                           tmp_path))


def _dpo_job(root: Path, name: str, beta: float, loss_type: str, before: float, after: float, kl: float) -> Path:
    job = root / name
    (job / "csv").mkdir(parents=True)
    (job / ".hydra").mkdir()
    with (job / "csv" / "metrics.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["step", "eval/score_before", "eval/score_after", "eval/kl_after",
                                               "train/loss"])
        writer.writeheader()
        writer.writerow({"step": 0, "eval/score_before": before})
        writer.writerow({"step": 1, "train/loss": 0.6})
        writer.writerow({"step": 2, "eval/score_after": after, "eval/kl_after": kl})
    (job / ".hydra" / "config.yaml").write_text(f"dpo:\n  beta: {beta}\n  loss_type: {loss_type}\n")
    return job


def test_report_reads_dpo_runs_from_the_evaluation(tmp_path):
    job = _dpo_job(tmp_path, "0", 0.1, "ipo", before=0.2, after=0.5, kl=1.5)
    assert run_params(job) == {"kl_coef": 0.1, "clip_eps": None, "adv_estimator": "ipo"}
    result = summarize_run(job)
    assert (result.first_score, result.final_score, result.final_kl) == (0.2, 0.5, 1.5)
    assert result.gain_per_kl == pytest.approx(0.3 / 1.5)
    assert summarize_run(_dpo_job(tmp_path, "1", 0.3, "sigmoid", 0.2, 0.1, 0.5)).adv_estimator == "dpo"
