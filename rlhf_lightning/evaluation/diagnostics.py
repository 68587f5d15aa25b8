"""Statistics that say whether a reward model and a PPO run can be trusted: plain functions of tensors.

- :func:`bootstrap_ci`: percentile bootstrap interval of a mean (Efron & Tibshirani 1993, ch. 13);
- :func:`calibration_bins`, with the expected calibration error (ECE; Naeini et al. 2015, Guo et al.
  2017 eq. 3);
- :func:`pearson`, :func:`spearman`: correlation (Spearman: Pearson of the ranks, ties given their mean rank);
- :func:`repeats_ngram`, :func:`ngram_repeats`, :func:`repeated_ngram_frac`: responses that repeat an n-gram of tokens;
- :func:`preference_diagnostics`: a reward model on preference pairs (accuracy with its interval, margin,
  Bradley–Terry calibration, length bias, score distribution), used by :mod:`rlhf_lightning.evaluation.rm_eval` and by
  the reward stage's validation (``val/*``);
- :func:`rollout_diagnostics` and :func:`check_alarms`: PPO's reward-hacking signals each iteration
  (``ppo.alarms``, :class:`~rlhf_lightning.config.schema.AlarmsConfig`).

Inputs are 1-D tensors (or sequences of numbers) unless said otherwise; results are Python floats.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

#: Bootstrap resamples used by default (the interval's end points move by ~0.002 of a standard deviation
#: between seeds at this count).
BOOTSTRAP_RESAMPLES = 1000
#: Seed of the bootstrap's generator by default: the same data give the same interval.
BOOTSTRAP_SEED = 0
#: Calibration bins by default (equal width).
CALIBRATION_BINS = 10


def _vector(values, name: str) -> torch.Tensor:
    x = torch.as_tensor(values, dtype=torch.float64).flatten()
    if x.numel() == 0:
        raise ValueError(f"{name}: no values")
    return x


def bootstrap_ci(values, n_resamples: int = BOOTSTRAP_RESAMPLES, confidence: float = 0.95,
                 seed: int = BOOTSTRAP_SEED) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values`` (Efron & Tibshirani 1993, §13.3).

    Draws ``n_resamples`` resamples of n values with replacement (``torch.randint`` with a generator seeded
    by ``seed``: one (n_resamples, n) draw), takes each one's mean, and returns the (1 − c)/2 and (1 + c)/2
    quantiles of those means (``torch.quantile``, linear interpolation).

    Args:
        values: (n,) numbers, e.g. per-prompt scores or 0/1 correctness of preference pairs.
        n_resamples: resamples (>= 1). confidence: c, in (0, 1).
        seed: the generator's seed (fixed: the same data give the same interval).

    Returns:
        ``(low, high)`` floats; ``(v, v)`` for a single value v.

    Raises:
        ValueError: no values, ``n_resamples`` < 1 or ``confidence`` outside (0, 1).
    """
    x = _vector(values, "bootstrap_ci")
    if n_resamples < 1 or not 0.0 < confidence < 1.0:
        raise ValueError(f"bootstrap_ci: n_resamples={n_resamples} must be >= 1 and confidence={confidence} "
                         "in (0, 1)")
    generator = torch.Generator().manual_seed(seed)
    index = torch.randint(x.numel(), (n_resamples, x.numel()), generator=generator)
    means = x[index].mean(1)
    alpha = (1.0 - confidence) / 2
    low, high = torch.quantile(means, torch.tensor([alpha, 1.0 - alpha], dtype=torch.float64))
    return float(low), float(high)


def calibration_bins(probs, outcomes, n_bins: int = CALIBRATION_BINS, low: float = 0.0,
                     high: float = 1.0) -> dict:
    """Reliability diagram and expected calibration error of predicted probabilities.

    The interval [low, high] is cut into ``n_bins`` equal bins [e_i, e_{i+1}) (the last one closed);
    in each, the mean predicted probability ("confidence") and the mean outcome ("observed") are compared:
    ECE = Σ_b (n_b / n) · |observed_b − confidence_b| (Guo et al. 2017 eq. 3; Naeini et al. 2015). With
    ``low`` 0 and ``high`` 1 this is torchmetrics' ``binary_calibration_error(preds, target, n_bins,
    norm="l1")`` (the calibration of P(outcome = 1)). Probabilities outside [low, high] go to the end bins.

    Args:
        probs: (n,) predicted probabilities of the outcome. outcomes: (n,) observed outcomes in [0, 1]
            (1/0, or 0.5 for a tie).
        n_bins: bins (>= 1). low, high: the binned range (low < high).

    Returns:
        ``{"edges": [n_bins + 1], "counts": [n_bins] ints, "confidence": [n_bins], "observed": [n_bins],
        "ece": float}``; an empty bin's confidence and observed are NaN (and weigh 0 in the ECE).

    Raises:
        ValueError: no values, different lengths, ``n_bins`` < 1 or ``low`` >= ``high``.
    """
    p, y = _vector(probs, "calibration_bins"), _vector(outcomes, "calibration_bins")
    if p.shape != y.shape:
        raise ValueError(f"calibration_bins: {p.numel()} probabilities but {y.numel()} outcomes")
    if n_bins < 1 or not low < high:
        raise ValueError(f"calibration_bins: n_bins={n_bins} must be >= 1 and low={low} < high={high}")
    edges = torch.linspace(low, high, n_bins + 1, dtype=torch.float64)
    index = (torch.bucketize(p, edges, right=True) - 1).clamp(0, n_bins - 1)
    counts = torch.zeros(n_bins, dtype=torch.float64).scatter_add_(0, index, torch.ones_like(p))
    conf = torch.zeros(n_bins, dtype=torch.float64).scatter_add_(0, index, p) / counts
    observed = torch.zeros(n_bins, dtype=torch.float64).scatter_add_(0, index, y) / counts
    gap = torch.nan_to_num((observed - conf).abs())
    ece = float((gap * counts).sum() / counts.sum())
    return {"edges": edges.tolist(), "counts": [int(c) for c in counts], "confidence": conf.tolist(),
            "observed": observed.tolist(), "ece": ece}


def pearson(x, y) -> float:
    """Pearson correlation of two (n,) samples: cov(x, y) / (σ_x σ_y), population moments.

    Returns:
        A float in [−1, 1]; NaN when n < 2 or either sample is constant (undefined).

    Raises:
        ValueError: no values or different lengths.
    """
    a, b = _vector(x, "pearson"), _vector(y, "pearson")
    if a.shape != b.shape:
        raise ValueError(f"pearson: {a.numel()} and {b.numel()} values")
    a, b = a - a.mean(), b - b.mean()
    denom = math.sqrt(float((a * a).sum()) * float((b * b).sum()))
    if a.numel() < 2 or denom == 0.0:
        return math.nan
    return max(-1.0, min(1.0, float((a * b).sum()) / denom))


def ranks(x) -> torch.Tensor:
    """Ranks 1..n of a (n,) sample, float64, tied values given the mean of their ranks."""
    v = _vector(x, "ranks")
    order = torch.argsort(v, stable=True)
    sorted_v = v[order]
    out = torch.empty_like(v)
    i, n = 0, v.numel()
    while i < n:
        j = i
        while j + 1 < n and sorted_v[j + 1] == sorted_v[i]:
            j += 1
        out[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return out


def spearman(x, y) -> float:
    """Spearman's rank correlation: :func:`pearson` of :func:`ranks` (ties: mean ranks). NaN as pearson's."""
    return pearson(ranks(x), ranks(y))


def repeats_ngram(tokens: Sequence[int], n: int) -> bool:
    """Whether some n-gram (n consecutive tokens) occurs at least twice in ``tokens`` (overlaps count:
    ``[7, 7, 7]`` repeats the 2-gram (7, 7)).

    Raises:
        ValueError: ``n`` < 1.
    """
    if n < 1:
        raise ValueError(f"repeats_ngram: n={n} must be >= 1")
    seen = set()
    for i in range(len(tokens) - n + 1):
        gram = tuple(tokens[i:i + n])
        if gram in seen:
            return True
        seen.add(gram)
    return False


def ngram_repeats(response_ids: torch.Tensor, response_mask: torch.Tensor, n: int) -> torch.Tensor:
    """Which responses repeat an n-gram of tokens (:func:`repeats_ngram` on each row's valid tokens).

    Args:
        response_ids: (B, R) int64. response_mask: (B, R) bool, the valid tokens (a prefix of each row).
        n: n-gram length in tokens.

    Returns:
        (B,) bool, on ``response_ids``' device.
    """
    rows = [ids[mask].tolist() for ids, mask in zip(response_ids.cpu(), response_mask.bool().cpu(), strict=True)]
    return torch.tensor([repeats_ngram(r, n) for r in rows], dtype=torch.bool, device=response_ids.device)


def repeated_ngram_frac(response_ids: torch.Tensor, response_mask: torch.Tensor, n: int) -> float:
    """Share of responses that repeat an n-gram of tokens (:func:`ngram_repeats`).

    Returns:
        A float in [0, 1] (0 for B = 0).
    """
    repeats = ngram_repeats(response_ids, response_mask, n)
    return float(repeats.float().mean()) if repeats.numel() else 0.0


def preference_diagnostics(chosen, rejected, chosen_lengths, rejected_lengths,
                           n_bins: int = CALIBRATION_BINS, n_resamples: int = BOOTSTRAP_RESAMPLES,
                           seed: int = BOOTSTRAP_SEED) -> dict:
    """How good a reward model is on n preference pairs, from its scores and the responses' lengths.

    - ``accuracy``: mean of c_i = 1 if r_w > r_l, 0.5 on a tie, else 0; ``accuracy_ci``: its
      :func:`bootstrap_ci` (95%) over the pairs;
    - ``margin_mean``: mean r_w − r_l, reward units;
    - ``calibration``: the Bradley–Terry probability that the higher-scored response is the preferred one,
      σ(|r_w − r_l|) in [0.5, 1], against how often it is (c_i), in ``n_bins`` bins over [0.5, 1]
      (:func:`calibration_bins`; its ``ece``). A calibrated model that says 0.8 is right 80% of the time.
    - ``length_bias``: ``acc_chosen_shorter``/``acc_chosen_longer`` = accuracy on the pairs whose chosen
      response has fewer / more tokens than the rejected one (``n_*`` pairs each; NaN when none; pairs of
      equal length in neither). A model that rewards length does well on the second and badly on the first.
      ``shorter_wins_accuracy``: the accuracy of the rule "the shorter response is preferred" (a tie in length
      counts half; 1 − it is the rule "the longer"): the baseline a length-only model reaches.
      ``gain_over_shorter_rule``: accuracy − that rule's accuracy on the same pairs (accuracy points / 100),
      ``gain_over_shorter_rule_ci``: its paired :func:`bootstrap_ci` (95%), the mean over the pairs of
      c_i − s_i with s_i the rule's 1/0.5/0 (both resampled together, so the interval is of the difference).
      ``pearson``/``spearman``: correlation of score with response length over all 2n responses;
      ``pearson_margin_vs_length_diff``: of r_w − r_l with len_w − len_l.
    - ``scores``: mean, std (population), min, quantiles 0.05/0.25/0.5/0.75/0.95, max of all 2n scores, and
      the chosen and rejected means.

    Args:
        chosen, rejected: (n,) scores r_w, r_l (reward units).
        chosen_lengths, rejected_lengths: (n,) response lengths in tokens.
        n_bins, n_resamples, seed: as :func:`calibration_bins` and :func:`bootstrap_ci`.

    Returns:
        A JSON-ready dict (floats, ints and lists) with those keys and ``pairs`` (n).

    Raises:
        ValueError: no pairs, or inputs of different lengths.
    """
    w, l_ = _vector(chosen, "chosen"), _vector(rejected, "rejected")
    lw, ll = _vector(chosen_lengths, "chosen_lengths"), _vector(rejected_lengths, "rejected_lengths")
    if not w.shape == l_.shape == lw.shape == ll.shape:
        raise ValueError(f"preference_diagnostics: {w.numel()} chosen, {l_.numel()} rejected scores, "
                         f"{lw.numel()} and {ll.numel()} lengths")
    margin = w - l_
    correct = (margin > 0).double() + 0.5 * (margin == 0).double()
    shorter, longer = lw < ll, lw > ll
    rule = shorter.double() + 0.5 * (lw == ll).double()  # the rule "the shorter response is preferred"

    def acc(select: torch.Tensor) -> float:
        return float(correct[select].mean()) if bool(select.any()) else math.nan

    scores, lengths = torch.cat([w, l_]), torch.cat([lw, ll])
    q = torch.quantile(scores, torch.tensor([0.05, 0.25, 0.5, 0.75, 0.95], dtype=torch.float64)).tolist()
    low, high = bootstrap_ci(correct, n_resamples, 0.95, seed)
    return {
        "pairs": int(w.numel()),
        "accuracy": float(correct.mean()), "accuracy_ci": [low, high],
        "bootstrap": {"resamples": n_resamples, "seed": seed, "confidence": 0.95},
        "margin_mean": float(margin.mean()),
        "calibration": calibration_bins(torch.sigmoid(margin.abs()), correct, n_bins, 0.5, 1.0),
        "length_bias": {"acc_chosen_shorter": acc(shorter), "n_chosen_shorter": int(shorter.sum()),
                        "acc_chosen_longer": acc(longer), "n_chosen_longer": int(longer.sum()),
                        "n_same_length": int((lw == ll).sum()),
                        "shorter_wins_accuracy": float(rule.mean()),
                        "gain_over_shorter_rule": float((correct - rule).mean()),
                        "gain_over_shorter_rule_ci": list(bootstrap_ci(correct - rule, n_resamples, 0.95, seed)),
                        "pearson": pearson(scores, lengths), "spearman": spearman(scores, lengths),
                        "pearson_margin_vs_length_diff": pearson(margin, lw - ll)},
        "scores": {"mean": float(scores.mean()), "std": float(scores.std(unbiased=False)),
                   "min": float(scores.min()), "q05": q[0], "q25": q[1], "median": q[2], "q75": q[3], "q95": q[4],
                   "max": float(scores.max()), "chosen_mean": float(w.mean()), "rejected_mean": float(l_.mean())},
    }


def rollout_diagnostics(scores: torch.Tensor, response_ids: torch.Tensor, response_mask: torch.Tensor,
                        kl: torch.Tensor | None, ngram: int,
                        gather: Callable[[torch.Tensor], torch.Tensor] | None = None) -> dict[str, float]:
    """PPO's reward-hacking signals on one batch of responses.

    - ``length_score_corr``: :func:`pearson` of the scores with the response lengths (tokens; NaN when all
      responses have the same length or the same score): near 1, the reward pays for length;
    - ``repeated_ngram_frac``: the share of responses that repeat an n-gram of ``ngram`` tokens
      (:func:`ngram_repeats`): degenerate repetition;
    - ``kl_per_token``: Σ KL_t / Σ valid tokens over the batch, nats per token.

    Each is computed from per-response values (score, length, whether it repeats, its summed KL), which
    ``gather`` collects from every data-parallel process first: the signals are those of the whole batch,
    the same on every process and the same as one process holding every row would find.

    Args:
        scores: (B,) float, the reward of each response. response_ids: (B, R) int64.
        response_mask: (B, R) bool. kl: (B, R) float, per-token KL to the reference (0 on padding); ``None``:
            not measured (no reference pass), and no ``kl_per_token``.
        ngram: n-gram length for the repetition check.
        gather: a function returning a (B,) tensor's values from every process, concatenated (a collective,
            e.g. Lightning's ``all_gather`` flattened; every process holds B rows); ``None``: this batch.

    Returns:
        ``{"length_score_corr", "repeated_ngram_frac", "kl_per_token"}`` as floats (without ``kl_per_token``
        when ``kl`` is ``None``).
    """
    mask = response_mask.bool()
    kl_rows = (kl.detach() * mask).sum(1).float() if kl is not None else torch.zeros_like(scores, dtype=torch.float32)
    rows = torch.stack([scores.detach().float(), mask.sum(1).float(), kl_rows,
                        ngram_repeats(response_ids, mask, ngram).float().to(scores.device)], 1)  # (B, 4)
    if gather is not None:
        rows = torch.cat([gather(column).reshape(-1, 1) for column in rows.unbind(1)], 1)
    score, length, kl_sum, repeats = rows.double().cpu().unbind(1)
    out = {"length_score_corr": pearson(score, length) if score.numel() else math.nan,
           "repeated_ngram_frac": float(repeats.mean()) if repeats.numel() else 0.0}
    if kl is not None:
        out["kl_per_token"] = float(kl_sum.sum() / length.sum().clamp(min=1))
    return out


#: For each signal of :func:`rollout_diagnostics`: its ``AlarmsConfig`` threshold field, and what to change.
ALARMS = {
    "length_score_corr": ("length_score_corr", "the reward pays for response length (or for brevity, when "
                          "negative): check the reward model's length bias (python -m rlhf_lightning.rm_eval), "
                          "or add a length penalty or ppo.generation.missing_eos_penalty"),
    "repeated_ngram_frac": ("repeated_ngram_frac", "responses repeat themselves: raise ppo.kl_coef, lower "
                            "policy_optim.lr, or check what the reward model pays for repeated text"),
    "kl_per_token": ("kl_per_token", "the policy is moving far from the reference: raise ppo.kl_coef (or set "
                     "ppo.adaptive_kl=true with ppo.kl_target), or lower policy_optim.lr"),
}


def check_alarms(values: dict[str, float], thresholds, fired: set[str]) -> list[str]:
    """Warning lines for the signals above their threshold that have not fired yet (each kind once).
    ``length_score_corr`` is compared in absolute value: a reward that pays for brevity is hacked as easily.

    Args:
        values: :func:`rollout_diagnostics`'s result (a NaN never fires).
        thresholds: an :class:`~rlhf_lightning.config.schema.AlarmsConfig` (attributes named as in
            :data:`ALARMS`; ``None``: that alarm is off).
        fired: kinds that already fired; updated in place.

    Returns:
        One line per new alarm: ``"<kind> = <value> > <threshold> (ppo.alarms.<field>): <what to change>"``
        (``|<kind>| = <value>`` for the correlation).
    """
    lines = []
    for kind, (field_name, advice) in ALARMS.items():
        limit, value = getattr(thresholds, field_name), values.get(kind, math.nan)
        size = abs(value) if kind == "length_score_corr" else value
        if kind in fired or limit is None or not math.isfinite(value) or size <= limit:
            continue
        fired.add(kind)
        shown = f"|{kind}| = {size:.3g}" if kind == "length_score_corr" else f"{kind} = {value:.3g}"
        lines.append(f"{shown} > {limit:g} (ppo.alarms.{field_name}): {advice}")
    return lines
