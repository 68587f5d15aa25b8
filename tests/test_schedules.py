"""Learning-rate schedules (rlhf_lightning/algorithms/schedules.py) and their wiring into AdamW: hand-computed
factors."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from rlhf_lightning.algorithms.schedules import SCHEDULERS, lr_multiplier
from rlhf_lightning.config.schema import OptimConfig, as_config
from rlhf_lightning.modules.common import (
    fused_adamw_allowed,
    make_grouped_optimizer,
    make_optimizer,
    scheduler_total_steps,
)

C = math.cos(math.pi / 4)  # 0.7071...


@pytest.mark.parametrize("scheduler, expected", [
    # warm-up 2 (1/3, 2/3), then over total 6: p = (step - 2) / 4
    ("constant", [1 / 3, 2 / 3, 1, 1, 1, 1, 1, 1]),
    ("linear", [1 / 3, 2 / 3, 1, 0.75, 0.5, 0.25, 0, 0]),  # 1 - p, 0 from step 6 on
    ("cosine", [1 / 3, 2 / 3, 1, (1 + C) / 2, 0.5, (1 - C) / 2, 0, 0]),  # (1 + cos(pi p)) / 2
])
def test_lr_multiplier_by_hand(scheduler, expected):
    got = [lr_multiplier(step, warmup_steps=2, total_steps=6, scheduler=scheduler) for step in range(8)]
    assert got == pytest.approx(expected, abs=1e-12)


def test_lr_multiplier_without_warmup_and_short_runs():
    assert [lr_multiplier(s, 0, 4, "linear") for s in range(4)] == pytest.approx([1, 0.75, 0.5, 0.25])
    assert [lr_multiplier(s, 0, 3, "cosine") for s in range(3)] == pytest.approx([1, 0.75, 0.25])  # cos(pi/3) = 0.5
    # A run no longer than its warm-up never decays (the last step used is total - 1 < warmup).
    assert [lr_multiplier(s, 4, 3, "linear") for s in range(3)] == pytest.approx([0.2, 0.4, 0.6])


def test_constant_is_the_schedule_before_decays_bit_for_bit():
    assert SCHEDULERS[0] == "constant" and OptimConfig().scheduler == "constant"
    for warmup in (0, 1, 3, 7):
        for step in range(12):
            assert lr_multiplier(step, warmup) == min(1.0, (step + 1) / (warmup + 1))  # exact, not approx


def test_lr_multiplier_errors():
    with pytest.raises(ValueError, match=r"scheduler='step' is not a learning-rate schedule \(expected one of "
                                         r"constant, linear, cosine\)"):
        lr_multiplier(0, 0, 10, "step")
    for total in (None, float("inf")):
        with pytest.raises(ValueError, match="scheduler=cosine decays .* set trainer.max_steps"):
            lr_multiplier(0, 0, total, "cosine")
    # A dataclass names its own field; as_config names the node it sits in, as the run config does.
    with pytest.raises(ValueError, match="^scheduler='exp' is not a learning-rate schedule"):
        OptimConfig(scheduler="exp")
    with pytest.raises(ValueError, match="^reward.optim.scheduler='exp' is not a learning-rate schedule"):
        as_config(OptimConfig, {"scheduler": "exp"}, "reward.optim")
    with pytest.raises(ValueError, match=r"^warmup_steps=-1 must be >= 0$"):
        OptimConfig(warmup_steps=-1)
    with pytest.raises(TypeError, match=r"^critic_optim.warmup_steps=1.5 must be an integer$"):
        as_config(OptimConfig, {"warmup_steps": 1.5}, "critic_optim")


def _lrs(optimizer) -> list[float]:
    return [group["lr"] for group in optimizer.param_groups]


def test_grouped_optimizer_moves_each_group_along_its_own_schedule():
    policy, critic = torch.nn.Linear(2, 2), torch.nn.Linear(2, 1)
    optimizer, scheduler = make_grouped_optimizer(
        [("policy", policy.parameters(), OptimConfig(lr=1e-3, warmup_steps=1, scheduler="linear")),
         ("critic", critic.parameters(), OptimConfig(lr=2e-3, scheduler="cosine"))], total_steps=3)
    seen = []
    for _ in range(3):
        seen.append(_lrs(optimizer))
        optimizer.step()
        scheduler.step()
    # policy: warm-up 1/2, then p = (step - 1) / 2: 1, 0.5; critic: p = step / 3: 1, 0.75, 0.25
    assert seen == [pytest.approx([1e-3 * f, 2e-3 * g]) for f, g in ((0.5, 1.0), (1.0, 0.75), (0.5, 0.25))]
    # The lambdas are plain functions: the scheduler's state holds no total (a resumed run uses its own).
    assert scheduler.state_dict()["lr_lambdas"] == [None, None]


def test_decaying_schedule_without_a_total_names_the_group():
    with pytest.raises(ValueError, match=r"scheduler=linear decays .* \(parameter group critic\)"):
        make_grouped_optimizer([("policy", torch.nn.Linear(2, 2).parameters(), OptimConfig()),
                                ("critic", torch.nn.Linear(2, 2).parameters(), OptimConfig(scheduler="linear"))])
    make_optimizer(torch.nn.Linear(2, 2).parameters(), OptimConfig())  # constant needs no total


def test_scheduler_total_steps_counts_optimizer_steps_or_ppo_iterations():
    trainer = SimpleNamespace(max_steps=24, estimated_stepping_batches=24)
    assert scheduler_total_steps(trainer) == 24  # automatic optimization: Lightning's estimate
    assert scheduler_total_steps(trainer, optimizer_steps_per_iteration=8) == 3  # PPO: iterations
    # Lightning ends after the batch that reaches max_steps: a partial last iteration still runs.
    assert scheduler_total_steps(SimpleNamespace(max_steps=20), optimizer_steps_per_iteration=8) == 3
    # No max_steps: one iteration per batch, all epochs (Lightning's estimate).
    assert scheduler_total_steps(SimpleNamespace(max_steps=-1, estimated_stepping_batches=7), 8) == 7


def test_fused_adamw_is_left_out_only_for_fp16_loss_scaling_with_clipping():
    def trainer(scaler, clip):
        return SimpleNamespace(precision_plugin=SimpleNamespace(scaler=scaler), gradient_clip_val=clip)

    assert fused_adamw_allowed(None) and fused_adamw_allowed(trainer(None, 1.0))
    assert fused_adamw_allowed(trainer(object(), None)) and fused_adamw_allowed(trainer(object(), 0.0))
    assert not fused_adamw_allowed(trainer(object(), 1.0))
    unfused, _ = make_optimizer(torch.nn.Linear(2, 2).parameters(), OptimConfig(), fused=False)
    fused, _ = make_optimizer(torch.nn.Linear(2, 2).parameters(), OptimConfig())
    assert not unfused.param_groups[0]["fused"] and fused.param_groups[0]["fused"]
