"""rlhf_lightning.evaluation.diagnostics against hand-computed numbers, naive loops and torchmetrics."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from rlhf_lightning.evaluation.diagnostics import (
    bootstrap_ci,
    calibration_bins,
    check_alarms,
    pearson,
    preference_diagnostics,
    ranks,
    repeated_ngram_frac,
    repeats_ngram,
    rollout_diagnostics,
    spearman,
)

# ----------------------------------------------------------------------------- bootstrap


def test_bootstrap_ci_equals_a_naive_loop_over_the_same_draws():
    values = torch.tensor([0.0, 1.0, 1.0, 3.0, 5.0, 8.0])
    low, high = bootstrap_ci(values, n_resamples=50, confidence=0.9, seed=3)
    index = torch.randint(6, (50, 6), generator=torch.Generator().manual_seed(3))
    means = sorted(sum(float(values[j]) for j in row) / 6 for row in index)

    def quantile(q):  # linear interpolation between order statistics, as numpy's default
        pos = q * (len(means) - 1)
        lo = math.floor(pos)
        return means[lo] + (pos - lo) * (means[min(lo + 1, len(means) - 1)] - means[lo])

    assert (low, high) == pytest.approx((quantile(0.05), quantile(0.95)))


def test_bootstrap_ci_constant_single_and_seeded():
    assert bootstrap_ci([2.5] * 7) == (2.5, 2.5)
    assert bootstrap_ci([4.0]) == (4.0, 4.0)
    x = torch.randn(40, generator=torch.Generator().manual_seed(0))
    assert bootstrap_ci(x) == bootstrap_ci(x)  # fixed seed
    assert bootstrap_ci(x, seed=1) != bootstrap_ci(x)


def test_bootstrap_ci_width_matches_the_normal_approximation():
    """For the mean of n normal values the 95% interval is about ±1.96·s/√n around the sample mean."""
    x = torch.randn(400, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    low, high = bootstrap_ci(x, n_resamples=2000)
    half = 1.96 * float(x.std(unbiased=False)) / math.sqrt(400)
    assert (high - low) / 2 == pytest.approx(half, rel=0.1)
    assert low < float(x.mean()) < high


def test_bootstrap_ci_refuses_bad_input():
    with pytest.raises(ValueError, match="no values"):
        bootstrap_ci([])
    with pytest.raises(ValueError, match="confidence"):
        bootstrap_ci([1.0, 2.0], confidence=1.0)


# ----------------------------------------------------------------------------- calibration


def test_calibration_bins_by_hand():
    # 4 bins over [0.5, 1]: [.5,.625) [.625,.75) [.75,.875) [.875,1]
    probs = [0.55, 0.6, 0.7, 0.9, 1.0]
    outcomes = [1, 0, 1, 1, 1]
    cal = calibration_bins(probs, outcomes, n_bins=4, low=0.5, high=1.0)
    assert cal["counts"] == [2, 1, 0, 2]
    assert cal["confidence"][0] == pytest.approx(0.575) and cal["observed"][0] == pytest.approx(0.5)
    assert math.isnan(cal["confidence"][2]) and math.isnan(cal["observed"][2])
    # ECE = (2·|0.5 − 0.575| + 1·|1 − 0.7| + 2·|1 − 0.95|) / 5
    assert cal["ece"] == pytest.approx((2 * 0.075 + 0.3 + 2 * 0.05) / 5)


def test_calibration_error_matches_torchmetrics():
    from torchmetrics.functional.classification import binary_calibration_error

    gen = torch.Generator().manual_seed(0)
    probs = torch.rand(500, generator=gen)
    outcomes = (torch.rand(500, generator=gen) < probs ** 2).long()
    ours = calibration_bins(probs, outcomes, n_bins=15)["ece"]
    theirs = float(binary_calibration_error(probs, outcomes, n_bins=15, norm="l1"))
    assert ours == pytest.approx(theirs, abs=1e-6)


def test_a_calibrated_predictor_has_a_small_ece():
    gen = torch.Generator().manual_seed(2)
    probs = torch.rand(20000, generator=gen)
    outcomes = (torch.rand(20000, generator=gen) < probs).double()
    assert calibration_bins(probs, outcomes)["ece"] < 0.02
    assert calibration_bins(probs, 1 - outcomes)["ece"] > 0.4


# ----------------------------------------------------------------------------- correlation


def test_pearson_by_hand_and_undefined_cases():
    # x = 1,2,3; y = 1,3,2: centred (−1,0,1), (−1,1,0): cov 1, norms √2 √2 → 0.5
    assert pearson([1, 2, 3], [1, 3, 2]) == pytest.approx(0.5)
    assert pearson([1, 2, 3], [6, 4, 2]) == pytest.approx(-1.0)
    assert math.isnan(pearson([1, 1, 1], [1, 2, 3]))
    assert math.isnan(pearson([1.0], [2.0]))
    with pytest.raises(ValueError):
        pearson([1, 2], [1, 2, 3])


def test_ranks_and_spearman_against_a_naive_loop():
    x = [3.0, 1.0, 4.0, 1.0, 5.0, 9.0, 2.0, 6.0, 5.0]
    naive = []
    for v in x:  # rank = 1 + (values below) + (ties − 1)/2
        below, ties = sum(u < v for u in x), sum(u == v for u in x)
        naive.append(1 + below + (ties - 1) / 2)
    assert ranks(x).tolist() == naive
    y = [2.0, 7.0, 1.0, 8.0, 2.0, 8.0, 1.0, 8.0, 2.0]
    assert spearman(x, y) == pytest.approx(pearson(naive, ranks(y)))
    assert spearman([1, 2, 3, 4], [1, 4, 9, 100]) == pytest.approx(1.0)  # monotone, not linear


# ----------------------------------------------------------------------------- repetition


def test_repeats_ngram():
    assert repeats_ngram([1, 2, 3, 1, 2, 3], 3)
    assert not repeats_ngram([1, 2, 3, 1, 2, 4], 3)
    assert repeats_ngram([7, 7, 7], 2)  # overlapping
    assert not repeats_ngram([1, 2], 3)
    with pytest.raises(ValueError):
        repeats_ngram([1], 0)


def test_repeated_ngram_frac_reads_only_valid_tokens():
    ids = torch.tensor([[5, 6, 5, 6, 0, 0], [1, 2, 3, 4, 1, 2], [9, 9, 9, 9, 9, 9]])
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1], [1, 1, 0, 0, 0, 0]], dtype=torch.bool)
    # row 0 repeats (5, 6); row 1 repeats (1, 2); row 2's valid tokens (9, 9) hold one 2-gram
    assert repeated_ngram_frac(ids, mask, 2) == pytest.approx(2 / 3)
    assert repeated_ngram_frac(ids, mask, 3) == 0.0


# ----------------------------------------------------------------------------- reward model on pairs


def test_preference_diagnostics_by_hand():
    chosen = torch.tensor([2.0, 0.0, 1.0, 3.0])
    rejected = torch.tensor([1.0, 1.0, 1.0, 0.0])
    chosen_len = torch.tensor([5, 10, 4, 20])
    rejected_len = torch.tensor([10, 5, 4, 2])
    d = preference_diagnostics(chosen, rejected, chosen_len, rejected_len, n_bins=5, n_resamples=200)
    assert d["pairs"] == 4
    assert d["accuracy"] == pytest.approx((1 + 0 + 0.5 + 1) / 4)  # a tie counts half
    assert d["margin_mean"] == pytest.approx((1 - 1 + 0 + 3) / 4)
    bias = d["length_bias"]
    assert (bias["n_chosen_shorter"], bias["n_chosen_longer"], bias["n_same_length"]) == (1, 2, 1)
    assert bias["acc_chosen_shorter"] == 1.0 and bias["acc_chosen_longer"] == 0.5
    assert bias["shorter_wins_accuracy"] == pytest.approx((1 + 0 + 0.5 + 0) / 4)
    # per pair, model − rule: 1 − 1, 0 − 0, 0.5 − 0.5, 1 − 0: only the last pair gains
    assert bias["gain_over_shorter_rule"] == pytest.approx(1 / 4)
    assert bias["gain_over_shorter_rule_ci"] == list(bootstrap_ci([0.0, 0.0, 0.0, 1.0], 200))
    assert bias["pearson"] == pytest.approx(pearson(torch.cat([chosen, rejected]), torch.cat([chosen_len,
                                                                                               rejected_len])))
    # calibration: σ(|margin|) = σ(1), σ(1), σ(0)=0.5, σ(3) against 1, 0, 0.5, 1
    s1, s3 = 1 / (1 + math.exp(-1)), 1 / (1 + math.exp(-3))
    cal = d["calibration"]
    assert sum(cal["counts"]) == 4
    expected = (abs(0.5 - 0.5) + 2 * abs(0.5 - s1) + abs(1 - s3)) / 4  # bins: [.5,.6) [.7,.8) [.9,1]
    assert cal["ece"] == pytest.approx(expected)
    assert d["scores"]["mean"] == pytest.approx(9 / 8) and d["scores"]["max"] == 3.0
    low, high = d["accuracy_ci"]
    assert 0.0 <= low <= d["accuracy"] <= high <= 1.0


def test_gain_over_the_shorter_rule_is_paired():
    """A 'reward model' that prefers the shorter response agrees with the rule on every pair: its gain is 0 and
    so is every resample's (an unpaired interval of two accuracies near 0.5 would be some ±0.1 wide)."""
    gen = torch.Generator().manual_seed(0)
    chosen_len, rejected_len = torch.randint(1, 50, (300,), generator=gen), torch.randint(1, 50, (300,), generator=gen)
    d = preference_diagnostics(-chosen_len.float(), -rejected_len.float(), chosen_len, rejected_len)
    assert d["accuracy"] == d["length_bias"]["shorter_wins_accuracy"]
    assert d["length_bias"]["gain_over_shorter_rule"] == 0.0
    assert d["length_bias"]["gain_over_shorter_rule_ci"] == [0.0, 0.0]


def test_preference_diagnostics_sees_a_length_loving_reward():
    """A 'reward model' whose score is the length: right when the chosen is the longer, wrong otherwise."""
    gen = torch.Generator().manual_seed(0)
    chosen_len, rejected_len = torch.randint(1, 50, (300,), generator=gen), torch.randint(1, 50, (300,), generator=gen)
    d = preference_diagnostics(chosen_len.float(), rejected_len.float(), chosen_len, rejected_len)
    assert d["length_bias"]["acc_chosen_longer"] == 1.0 and d["length_bias"]["acc_chosen_shorter"] == 0.0
    assert d["length_bias"]["pearson"] == pytest.approx(1.0)


# ----------------------------------------------------------------------------- PPO signals and alarms


def test_rollout_diagnostics_by_hand():
    ids = torch.tensor([[1, 2, 1, 2], [3, 4, 5, 0], [6, 7, 0, 0]])
    mask = ids > 0
    kl = torch.tensor([[0.1, 0.1, 0.1, 0.1], [0.2, 0.2, 0.2, 0.0], [0.3, 0.3, 0.0, 0.0]])
    scores = torch.tensor([4.0, 3.0, 2.0])  # = length
    d = rollout_diagnostics(scores, ids, mask, kl, ngram=2)
    assert d["length_score_corr"] == pytest.approx(1.0)
    assert d["repeated_ngram_frac"] == pytest.approx(1 / 3)
    assert d["kl_per_token"] == pytest.approx((0.4 + 0.6 + 0.6) / 9)


def test_check_alarms_fires_once_per_kind_and_skips_nan_and_off():
    thresholds = SimpleNamespace(length_score_corr=0.5, repeated_ngram_frac=None, kl_per_token=0.1)
    fired: set[str] = set()
    lines = check_alarms({"length_score_corr": 0.9, "repeated_ngram_frac": 1.0, "kl_per_token": math.nan},
                         thresholds, fired)
    assert len(lines) == 1 and lines[0].startswith("|length_score_corr| = 0.9 > 0.5 (ppo.alarms.length_score_corr)")
    assert "length" in lines[0].split(":", 1)[1]
    assert check_alarms({"length_score_corr": 0.95, "kl_per_token": 0.05}, thresholds, fired) == []
    lines = check_alarms({"length_score_corr": 0.95, "kl_per_token": 0.2}, thresholds, fired)
    assert [line.split(" ")[0] for line in lines] == ["kl_per_token"] and "ppo.kl_coef" in lines[0]
    assert fired == {"length_score_corr", "kl_per_token"}
    assert len(check_alarms({"length_score_corr": -0.7}, thresholds, set())) == 1  # pays for brevity
    assert check_alarms({"length_score_corr": -0.3}, thresholds, set()) == []


def test_alarms_config_checks_its_ranges():
    from rlhf_lightning.config.schema import AlarmsConfig, PPOConfig

    assert PPOConfig(alarms={"kl_per_token": None}).alarms.kl_per_token is None
    with pytest.raises(ValueError, match="alarms.repeated_ngram_frac=1.5 must be in"):
        PPOConfig(alarms={"repeated_ngram_frac": 1.5})
    with pytest.raises(ValueError, match="ngram=0"):
        AlarmsConfig(ngram=0)


def test_rm_eval_prints_the_gain_over_the_shorter_rule(capsys, monkeypatch):
    """rm_eval's table has the paired gain over the rule 'the shorter response wins' with its interval."""
    from rlhf_lightning.evaluation import rm_eval

    monkeypatch.setenv("COLUMNS", "200")  # rich's table: one line per row

    gen = torch.Generator().manual_seed(1)
    chosen_len, rejected_len = torch.randint(1, 50, (60,), generator=gen), torch.randint(1, 50, (60,), generator=gen)
    d = preference_diagnostics(torch.randn(60, generator=gen), torch.randn(60, generator=gen), chosen_len,
                               rejected_len, n_resamples=100)
    rm_eval.render({**d, "pairs": 60, "source": "test"})
    out = capsys.readouterr().out
    bias = d["length_bias"]
    assert "that rule's (paired)" in out
    assert "{:+.3f}  [95% CI {:+.3f}, {:+.3f}]".format(bias["gain_over_shorter_rule"],
                                                      *bias["gain_over_shorter_rule_ci"]) in out
