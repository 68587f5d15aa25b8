"""N ranks ≡ 1 rank: every stage and estimator trains the same weights, and logs the same metrics, on 2 processes
with B / 2 rows each as on 1 process with B rows (issue 21).

Each case of :data:`equivalence_runs.CASES` runs twice for two steps (PPO: iterations) from the same seed: in this
process with the whole batch, and in 2 processes (``torchrun``, DDP over gloo, one launch for all cases) with half of
it each. The runs are in float64 (``precision=64-true``), so what differs between them is the order of summation
(~1e-15 relative), not rounding to float32 (where Adam's first step, ``lr · g / |g|``, turns a last-bit difference of a
near-zero gradient into a full step of the learning rate): the tolerance can then be tight, 1e-6 of each trained
tensor's change, and any algorithmic difference — a per-rank decision, a mean of per-rank means, per-rank random
numbers, a prompt answered on one rank and not the other — shows far above it. The logged metrics are compared to
1e-6 relative.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import equivalence_runs
from equivalence_runs import CASES, TWO_PROCESS_CASES

#: Relative tolerance of the trained weights (of each tensor's change) and of the logged metrics.
RTOL = 1e-6
#: Cases in the default suite; the others are marked slow (CI runs both).
DEFAULT = ("reward", "reward_part_cache", "ppo_gae", "grpo", "dapo", "dpo", "lora_share_base_warmup")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(out: Path, tiny_dir: str, data: Path, cases: list[str]) -> None:
    """Train ``cases`` in 2 processes with torchrun (one launch); fails with the workers' output."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), *sys.path])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), str(Path(equivalence_runs.__file__)), str(out), tiny_dir, str(data),
           *cases]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, f"2-process runs failed:\n{done.stdout[-4000:]}\n{done.stderr[-8000:]}"


@pytest.fixture(scope="module")
def two_process_runs(tmp_path_factory, tiny_dir, hh_file, request):
    """``case -> result`` of the 2-process runs of every case this session selects (one torchrun launch)."""
    selected = sorted({item.callspec.params["case"] for item in request.session.items
                       if item.module is request.module and hasattr(item, "callspec")})
    out = tmp_path_factory.mktemp("two_processes")
    _launch(out, tiny_dir, hh_file, selected)
    return {case: torch.load(out / f"{case}.pt", weights_only=False) for case in selected}


def _params():
    return [pytest.param(case, marks=() if case in DEFAULT else pytest.mark.slow) for case in CASES]


@pytest.mark.parametrize("case", _params())
def test_two_processes_train_as_one(case, two_process_runs, tmp_path, tiny_dir, hh_file):
    one = equivalence_runs.run(case, str(tmp_path), tiny_dir, str(hh_file), world_size=1)
    two = two_process_runs[case]
    assert one["initial"].keys() == two["final"].keys() and one["final"], "no trainable parameters"
    # The same weights: each trained tensor's difference between the runs is tiny next to how far it moved.
    moved = 0
    for name, start in one["initial"].items():
        step = (one["final"][name] - start).norm()
        diff = (two["final"][name] - one["final"][name]).norm()
        assert diff <= RTOL * step + 1e-12, f"{name}: |w2 - w1| = {diff:.3g}, |w1 - w0| = {step:.3g}"
        moved += bool(step > 0)
    assert moved, "training changed nothing"
    # The same logged metrics after every step (and validation), reduced over the ranks as Lightning logs them.
    assert len(one["metrics"]) == len(two["metrics"])
    for step, (a, b) in enumerate(zip(one["metrics"], two["metrics"], strict=True)):
        assert a.keys() == b.keys(), step
        for key in a:
            assert b[key] == pytest.approx(a[key], rel=RTOL, abs=1e-9, nan_ok=True), (step, key)
    # The before/after evaluation: the same held-out responses, split over the ranks and gathered.
    assert one["evaluations"].keys() == two["evaluations"].keys()
    for phase, result in one["evaluations"].items():
        assert two["evaluations"][phase] == pytest.approx(result, rel=RTOL, abs=1e-9), phase
    if CASES[case][1].get("cache_trunk"):  # the cache was used: 20 training and 8 validation pairs in all, each
        # rank keeps its own (10 and 4 in the first epoch, more if the second epoch's shuffle hands it others)
        (kept1, computed1, read1), (kept2, computed2, read2) = one["trunk_cache"], two["trunk_cache"]
        assert kept1 == computed1 == 2 * (20 + 8) and read1 > 0
        assert kept2 == computed2 and 2 * (10 + 4) <= kept2 < kept1 and read2 > 0
    if CASES[case][1].get("dynamic_sampling"):  # the runs drew further prompts (the ranks exchanged groups)
        assert any(m.get("rollout/resample_rounds", 0) > 0 for m in one["metrics"])


@pytest.mark.parametrize("case", list(TWO_PROCESS_CASES))
def test_dynamic_sampling_with_a_reward_flat_on_one_rank_finishes(case, two_process_runs):
    """DAPO on 2 processes where only rank 0's groups are flat: the ranks decide the rounds together (before issue
    21 rank 0 resampled alone and its generation's collectives met rank 1's gradient all-reduce: gloo aborted,
    NCCL would hang). Rank 0's groups are flat in every round drawn, so there is at least one further round."""
    run = two_process_runs[case]
    assert len(run["metrics"]) == 2  # both iterations ran
    for metrics in run["metrics"]:
        assert metrics["rollout/resample_rounds"] >= 1
        assert metrics["rollout/flat_groups"] >= 2 * (1 + metrics["rollout/resample_rounds"])
    assert any(not torch.equal(run["initial"][k], v) for k, v in run["final"].items())
