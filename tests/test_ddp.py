"""Two-process CPU DDP (the ``trainer=ddp_cpu`` preset: DDPStrategy, gloo, spawn) of the three modules.

``tests/test_equivalence.py`` checks that every stage trains on 2 processes as on 1 (one torchrun launch); these
tests check the preset itself (Hydra config, spawn) and what only a multi-process run shows: lock-step decoding
when ranks sample responses of different lengths, a non-finite step on one rank skipped on all. Each spawns its own
two workers (~25 s); those a default equivalence case covers are marked slow.

Each test trains on the tiny model with the Trainer the preset builds, and every rank writes what
the test compares across ranks (``RankRecorder``): its trainable parameters before and after
training, the data rows it trained on, the metric values it computed locally and the values
Lightning logged (reduced over ranks with ``sync_dist``), and its number of backward calls.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

import rlhf_lightning.training.run  # noqa: F401  (registers the resolvers)
from rlhf_lightning.algorithms.ops import masked_whiten
from rlhf_lightning.data import PreferenceDataModule, PromptDataModule
from rlhf_lightning.models import load_policy, load_reference, load_scalar_model
from rlhf_lightning.modules import PPOModule, RewardModule, ValueModule
from rlhf_lightning.training.callbacks import NonFiniteGuard

CONF = str(Path(__file__).resolve().parents[1] / "conf")
WORLD_SIZE = 2


def _trainable(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: p.detach().clone() for k, p in module.named_parameters() if p.requires_grad}


class RankRecorder(L.Callback):
    """Saves ``<out_dir>/rank<r>.pt`` on every rank at the end of training (see the module docstring).

    Module-level so that it pickles into the spawned workers.
    """

    def __init__(self, out_dir: str, logged_keys: list[str], hook: str = "on_train_batch_end"):
        self.out_dir, self.logged_keys, self.hook = out_dir, logged_keys, hook
        self.rows, self.logged, self.backward_calls, self.initial = [], [], 0, {}

    def on_train_start(self, trainer, pl_module):
        self.initial = _trainable(pl_module)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if "prompt_index" in batch:
            self.rows.extend(batch["prompt_index"].tolist())
        else:  # preference pairs: the token rows themselves
            self.rows.extend(tuple(row.tolist()) for row in batch["input_ids"])

    def on_after_backward(self, trainer, pl_module):
        self.backward_calls += 1

    def _record(self, trainer):
        self.logged.append({k: float(trainer.callback_metrics[k]) for k in self.logged_keys})

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.hook == "on_train_batch_end":
            self._record(trainer)

    def on_validation_end(self, trainer, pl_module):
        if self.hook == "on_validation_end":
            self._record(trainer)

    def on_train_end(self, trainer, pl_module):
        torch.save({"initial": self.initial, "final": _trainable(pl_module), "rows": self.rows,
                    "logged": self.logged, "local": pl_module.local_metrics, "backward_calls": self.backward_calls,
                    "kl_updates": getattr(pl_module, "kl_updates", []),
                    "whitening": getattr(pl_module, "whitening", []),
                    "groups": getattr(pl_module, "groups", [])},
                   Path(self.out_dir) / f"rank{trainer.global_rank}.pt")


class LocalMetrics:
    """Mixin recording every ``log_dict`` call's values as this rank computed them (before any reduction)."""

    local_metrics: list[dict[str, float]]

    def log_dict(self, dictionary, *args, **kwargs):
        self.__dict__.setdefault("local_metrics", []).append({k: float(v) for k, v in dictionary.items()})
        return super().log_dict(dictionary, *args, **kwargs)


class LocalRewardModule(LocalMetrics, RewardModule):
    pass


class LocalValueModule(LocalMetrics, ValueModule):
    pass


class UnevenPPOModule(LocalMetrics, PPOModule):
    """PPO whose ranks sample responses of different lengths (rank r: up to 3 + 2r tokens)."""

    def on_train_start(self):
        self.ppo.generation.max_new_tokens = 3 + 2 * self.global_rank
        self.kl_updates, update = [], self.kl_ctl.update

        def recording_update(current_kl: float, n_steps: int) -> float:  # the KL the controller is given
            self.kl_updates.append(current_kl)
            return update(current_kl, n_steps)

        self.kl_ctl.update = recording_update
        self.whitening = []
        super().on_train_start()

    def whiten_advantages(self, advantages, mask):
        whitened = super().whiten_advantages(advantages, mask)
        self.whitening.append((advantages.clone(), mask.clone(), whitened.clone()))
        return whitened


class GroupPPOModule(LocalMetrics, PPOModule):
    """Critic-free PPO recording, per iteration, the prompt of each response and the batch's prompt indices."""

    def training_step(self, batch, batch_idx):
        self.__dict__.setdefault("groups", [])
        self._prompt_index = batch["prompt_index"].tolist()
        return super().training_step(batch, batch_idx)

    def compute_advantages(self, exp):
        exp = super().compute_advantages(exp)
        prompts = exp.rollout.input_ids[:, : exp.rollout.response_start]
        self.groups.append((self._prompt_index, prompts.clone(), exp.advantages[:, 0].clone()))
        return exp


def _ddp_trainer(tmp_path: Path, callbacks: list, **overrides) -> L.Trainer:
    """The Trainer of ``conf/trainer/ddp_cpu.yaml`` (composed and instantiated as train.py does)."""
    with initialize_config_dir(CONF, version_base="1.3"):
        cfg = compose("config", overrides=["trainer=ddp_cpu", f"output_dir={tmp_path}"])
    assert cfg.trainer.devices == WORLD_SIZE
    return instantiate(cfg.trainer, logger=False, callbacks=callbacks, enable_checkpointing=False,
                       enable_progress_bar=False, enable_model_summary=False, **overrides)


def _ranks(out_dir: Path) -> list[dict]:
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in range(WORLD_SIZE)]


def _last_local(rank: dict, key: str) -> float:
    """The rank's own value of ``key`` at its last ``log_dict`` call that logged it."""
    return next(d[key] for d in reversed(rank["local"]) if key in d)


def _assert_same_trained_parameters(ranks: list[dict]) -> None:
    """Every rank ends with the same trainable parameters, and training changed them."""
    first = ranks[0]
    assert first["final"], "no trainable parameters recorded"
    assert any(not torch.equal(first["initial"][k], v) for k, v in first["final"].items()), "training changed nothing"
    for other in ranks[1:]:
        assert other["final"].keys() == first["final"].keys()
        for key, value in first["final"].items():
            torch.testing.assert_close(other["final"][key], value, rtol=0, atol=0, msg=key)


def _assert_reduced(ranks: list[dict], key: str, local: list[float]) -> None:
    """The logged value of ``key`` is the mean over ranks of their local values, on every rank, and the
    local values differ (so that a rank's own value would not pass for the reduced one)."""
    assert abs(local[0] - local[1]) > 1e-6, f"{key}: the ranks computed the same value {local}"
    expected = sum(local) / len(local)
    for rank in ranks:
        assert rank["logged"][-1][key] == pytest.approx(expected, rel=1e-5, abs=1e-6), key


def _assert_disjoint_rows(ranks: list[dict], expected_per_rank: int) -> None:
    """DistributedSampler: each rank trained on its own rows."""
    assert [len(r["rows"]) for r in ranks] == [expected_per_rank] * WORLD_SIZE
    assert not set(ranks[0]["rows"]) & set(ranks[1]["rows"])


@pytest.mark.slow  # its stage is in tests/test_equivalence.py's default cases or slow ones
def test_ddp_cpu_reward_model(tmp_path, tiny_dir, tokenizer, hh_file):
    L.seed_everything(0)
    module = LocalRewardModule(load_scalar_model(tiny_dir, trainable_layers=1), tokenizer, optim={"lr": 1e-3})
    dm = PreferenceDataModule(tokenizer, str(hh_file), val_size=8, batch_size=2, eval_batch_size=4, max_length=48)
    recorder = RankRecorder(str(tmp_path), ["val/loss", "val/margin"], hook="on_validation_end")
    trainer = _ddp_trainer(tmp_path, [recorder], max_steps=2, max_epochs=-1, limit_val_batches=1, val_check_interval=2)
    trainer.fit(module, datamodule=dm)

    ranks = _ranks(tmp_path)
    _assert_same_trained_parameters(ranks)
    _assert_disjoint_rows(ranks, expected_per_rank=2 * 2 * 2)  # 2 steps x 2 pairs x (chosen, rejected)
    assert [r["backward_calls"] for r in ranks] == [2, 2]
    for key in ("val/loss", "val/margin"):  # one validation batch per rank: the epoch value is the batch value
        _assert_reduced(ranks, key, [_last_local(r, key) for r in ranks])


@pytest.mark.slow  # its stage is in tests/test_equivalence.py's default cases or slow ones
def test_ddp_cpu_value_model(tmp_path, tiny_dir, tokenizer, hh_file):
    L.seed_everything(0)
    module = LocalValueModule(load_reference(tiny_dir), load_scalar_model(tiny_dir, trainable_layers=1),
                              load_scalar_model(tiny_dir, frozen=True, seed=1), tokenizer,
                              value={"generation": {"max_new_tokens": 4}}, critic_optim={"lr": 1e-3})
    dm = PromptDataModule(tokenizer, str(hh_file), batch_size=2, max_prompt_length=32)
    recorder = RankRecorder(str(tmp_path), ["value/loss", "objective/score"])
    trainer = _ddp_trainer(tmp_path, [recorder], max_steps=2, max_epochs=-1, limit_val_batches=0)
    trainer.fit(module, datamodule=dm)

    ranks = _ranks(tmp_path)
    _assert_same_trained_parameters(ranks)
    _assert_disjoint_rows(ranks, expected_per_rank=2 * 2)
    assert [r["backward_calls"] for r in ranks] == [2, 2]
    for key in ("value/loss", "objective/score"):
        _assert_reduced(ranks, key, [_last_local(r, key) for r in ranks])


@pytest.mark.slow
def test_ddp_cpu_ppo_with_uneven_response_lengths(tmp_path, tiny_dir, tokenizer, hh_file):
    L.seed_everything(0)
    iterations, epochs, minibatches = 2, 2, 2
    module = UnevenPPOModule(
        load_policy(tiny_dir, trainable_layers=1), load_reference(tiny_dir),
        load_scalar_model(tiny_dir, trainable_layers=1), load_scalar_model(tiny_dir, frozen=True, seed=1), tokenizer,
        ppo={"ppo_epochs": epochs, "num_minibatches": minibatches, "num_sample_prompts": 1,
             "log_samples_every_n_steps": 0, "adaptive_kl": True, "kl_horizon": 10.0},
        policy_optim={"lr": 1e-3}, critic_optim={"lr": 1e-3})
    dm = PromptDataModule(tokenizer, str(hh_file), batch_size=2, max_prompt_length=32)
    recorder = RankRecorder(str(tmp_path), ["objective/score", "objective/kl", "response/length"])
    trainer = _ddp_trainer(tmp_path, [recorder], max_steps=iterations * module.optimizer_steps_per_iteration,
                           max_epochs=-1, limit_val_batches=0)
    trainer.fit(module, datamodule=dm)

    ranks = _ranks(tmp_path)
    _assert_same_trained_parameters(ranks)
    _assert_disjoint_rows(ranks, expected_per_rank=iterations * 2)
    # Responses of different lengths, the same number of backward calls on every rank (no hang).
    lengths = [_last_local(r, "response/length") for r in ranks]
    assert lengths[0] <= 3 < lengths[1] <= 5
    assert [r["backward_calls"] for r in ranks] == [iterations * epochs * minibatches] * WORLD_SIZE
    for key in ("objective/score", "objective/kl", "response/length"):
        _assert_reduced(ranks, key, [_last_local(r, key) for r in ranks])
    # The adaptive KL controller is given the KL averaged over ranks (one beta on every rank).
    local_kl = [_last_local(r, "objective/kl") for r in ranks]
    assert abs(local_kl[0] - local_kl[1]) > 1e-6
    for rank in ranks:
        assert len(rank["kl_updates"]) == iterations
        assert rank["kl_updates"][-1] == pytest.approx(sum(local_kl) / WORLD_SIZE, rel=1e-5)
    betas = [[d["ppo/kl_coef"] for d in r["local"] if "ppo/kl_coef" in d] for r in ranks]
    assert betas[0] == betas[1] and len(betas[0]) == iterations
    # ppo.whiten_across_ranks (default): each rank's advantages are whitened with the statistics of both
    # ranks' valid tokens, as one process holding the union of the batches would whiten them.
    for i in range(iterations):
        (adv0, mask0, out0), (adv1, mask1, out1) = (r["whitening"][i] for r in ranks)
        assert adv0.shape[1] != adv1.shape[1]  # responses of different lengths
        width = max(adv0.shape[1], adv1.shape[1])
        union = masked_whiten(torch.cat([_pad(adv0, width), _pad(adv1, width)]),
                              torch.cat([_pad(mask0, width), _pad(mask1, width)]))
        torch.testing.assert_close(torch.cat([_pad(out0, width), _pad(out1, width)]), union, rtol=1e-4, atol=1e-5)
        assert not torch.allclose(out0, masked_whiten(adv0, mask0), atol=1e-3)  # per rank would differ


def _pad(t: torch.Tensor, width: int) -> torch.Tensor:
    """Right-pad the last dimension of ``t`` with zeros (False) to ``width``."""
    return torch.nn.functional.pad(t, (0, width - t.shape[-1]))


class NaNLossOnRank1(LocalRewardModule):
    """Rank 1's loss at batch 1 is NaN while its gradients stay finite (a NaN constant added to the loss):
    only rank 1 sees anything non-finite, since DDP averages the (finite) gradients."""

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        if self.global_rank == 1 and batch_idx == 1:
            loss = loss + torch.tensor(float("nan"))
        return loss


class ChangeRecorder(L.Callback):
    """Per batch: whether the rank's trainable weights changed; at the end ``<out_dir>/guard<r>.pt`` with those
    flags, the final weights, the guard's skip count and Adam's step count."""

    def __init__(self, out_dir: str):
        self.out_dir, self.changed, self._before = out_dir, [], {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._before = _trainable(pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.changed.append(any(not torch.equal(self._before[k], v) for k, v in _trainable(pl_module).items()))

    def on_train_end(self, trainer, pl_module):
        guard = next(c for c in trainer.callbacks if isinstance(c, NonFiniteGuard))
        param = next(p for p in pl_module.parameters() if p.requires_grad)
        torch.save({"changed": self.changed, "final": _trainable(pl_module), "skipped": guard.skipped,
                    "adam_steps": int(trainer.optimizers[0].state[param]["step"])},
                   Path(self.out_dir) / f"guard{trainer.global_rank}.pt")


@pytest.mark.slow
def test_ddp_cpu_nonfinite_step_on_one_rank_is_skipped_on_every_rank(tmp_path, tiny_dir, tokenizer, hh_file):
    L.seed_everything(0)
    module = NaNLossOnRank1(load_scalar_model(tiny_dir, trainable_layers=1), tokenizer, optim={"lr": 1e-3})
    dm = PreferenceDataModule(tokenizer, str(hh_file), val_size=0, batch_size=2, max_length=48)
    trainer = _ddp_trainer(tmp_path, [ChangeRecorder(str(tmp_path)), NonFiniteGuard(max_consecutive_bad_steps=3)],
                           max_steps=3, max_epochs=-1, limit_val_batches=0)
    trainer.fit(module, datamodule=dm)

    ranks = [torch.load(tmp_path / f"guard{r}.pt", weights_only=False) for r in range(WORLD_SIZE)]
    for rank in ranks:  # both skipped batch 1: weights and Adam state untouched there, on rank 0 too
        assert rank["changed"] == [True, False, True] and rank["skipped"] == 1 and rank["adam_steps"] == 2
    for key, value in ranks[0]["final"].items():
        torch.testing.assert_close(ranks[1]["final"][key], value, rtol=0, atol=0, msg=key)


@pytest.mark.slow  # its stage is in tests/test_equivalence.py's default cases or slow ones
def test_ddp_cpu_grpo_keeps_each_prompts_group_on_its_rank(tmp_path, tiny_dir, tokenizer, hh_file):
    """GRPO under 2-process DDP: each rank answers its own prompts num_generations times, each group of
    responses is contiguous and on one rank (its advantages sum to 0), one optimizer, equal weights."""
    L.seed_everything(0)
    group = 3
    module = GroupPPOModule(load_policy(tiny_dir, trainable_layers=1), load_reference(tiny_dir), None,
                            load_scalar_model(tiny_dir, frozen=True, seed=1), tokenizer,
                            ppo={"adv_estimator": "grpo", "num_generations": group, "ppo_epochs": 1,
                                 "num_sample_prompts": 1, "log_samples_every_n_steps": 0,
                                 "generation": {"max_new_tokens": 4}},
                            policy_optim={"lr": 1e-3})
    dm = PromptDataModule(tokenizer, str(hh_file), batch_size=2, max_prompt_length=32)
    recorder = RankRecorder(str(tmp_path), ["objective/score"])
    trainer = _ddp_trainer(tmp_path, [recorder], max_steps=2 * module.optimizer_steps_per_iteration, max_epochs=-1,
                           limit_val_batches=0)
    trainer.fit(module, datamodule=dm)

    ranks = _ranks(tmp_path)
    _assert_same_trained_parameters(ranks)
    _assert_disjoint_rows(ranks, expected_per_rank=2 * 2)
    assert [r["backward_calls"] for r in ranks] == [2, 2]  # one optimizer: one backward per iteration
    for rank in ranks:
        assert len(rank["groups"]) == 2
        for prompt_index, prompts, advantages in rank["groups"]:
            assert prompts.shape[0] == len(prompt_index) * group
            for g in range(len(prompt_index)):
                rows = prompts[g * group:(g + 1) * group]
                assert all(torch.equal(rows[0], row) for row in rows)
                assert abs(float(advantages[g * group:(g + 1) * group].sum())) < 1e-4

