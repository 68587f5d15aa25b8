"""Report of a PPO sweep: ``python -m rlhf_lightning.report <multirun dir> [--out DIR]``.

For every run of a Hydra multirun (each job directory with ``csv/metrics.csv``, i.e. run with the
``csv`` logger) it reads β = ``ppo.kl_coef``, ε = ``ppo.clip_eps`` and the advantage estimator
``ppo.adv_estimator`` from the job's ``.hydra/config.yaml`` (or its ``.hydra/overrides.yaml``) and the
logged score and KL
to the reference (``objective/score``, ``objective/kl``: nats per response), and writes into the
multirun directory (or ``--out``):

- ``report.md`` and ``report.csv``: one row per run with β, ε, first and final score, final KL, and
  the score gain per nat of KL, (final score − first score) / final KL; then, when the run has them, the
  fixed-prompt evaluation after training (``eval/score_after``, ``eval/kl_after``: the held-out prompts
  answered with the same sampling seed before and after) with bootstrap 95% intervals over its prompts
  (:func:`eval_after`), and the reward-hacking diagnostics at the last iteration
  (``diagnostics/length_score_corr``, ``diagnostics/repeated_ngram_frac``;
  :mod:`rlhf_lightning.evaluation.diagnostics`);
- ``report.png``: score against KL, one point per run and one colour per estimator, with each estimator's
  Pareto frontier (highest score for its KL) — the reward–KL trade-off of Gao et al. 2022, "Scaling Laws
  for Reward Model Overoptimization". When every run has the fixed-prompt evaluation its score and KL
  after training are plotted, with their intervals as error bars (the same prompts for every run: a fair
  comparison); otherwise the last training batch's (``objective/score``, ``objective/kl``).

With judges (``eval.judges``) and evaluations along training (``eval.every_n_iterations``), also
``overoptimization.md`` and ``overoptimization.png``: each run's proxy score and judge scores on the held-out prompts
against √KL along training (the axes of Gao et al. 2022), the KL at which each judge's score peaked, tabulated with
the run's β, ε and estimator (:func:`write_overoptimization`).

DPO runs (``stage=dpo``) are their own groups, ``dpo``, ``ipo`` or ``hinge`` (``dpo.loss_type``), with β =
``dpo.beta``; they log no training score, so they are read from the before/after evaluation on the held-out
prompts (``eval/score_before``, ``eval/score_after``, ``eval/kl_after``), which PPO runs log too: with
``--eval`` every run is read from it, and PPO and DPO runs from the same reward model and prompts share
one frontier.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from omegaconf import OmegaConf

from rlhf_lightning.evaluation.diagnostics import BOOTSTRAP_RESAMPLES, bootstrap_ci
from rlhf_lightning.evaluation.summary import EvalCurve, eval_curve, plot_overoptimization, read_metrics, series

SCORE_KEY = "objective/score"
KL_KEY = "objective/kl"
#: Below this final KL (nats), the gain per nat is not reported (division by ~0, or a negative k1 estimate).
MIN_KL = 1e-6
#: The before/after evaluation's metrics (held-out prompts, fixed seed), logged by PPO and DPO alike
#: (:func:`rlhf_lightning.evaluation.heldout.evaluate_policy`): ``--eval`` reads every run from them.
EVAL_SCORE_KEY, EVAL_KL_KEY, EVAL_FIRST_SCORE_KEY = "eval/score_after", "eval/kl_after", "eval/score_before"
#: ``dpo.loss_type`` -> the run's group in the report.
DPO_GROUPS = {"sigmoid": "dpo", "ipo": "ipo", "hinge": "hinge"}


@dataclass
class RunResult:
    """One run of the sweep.

    Attributes:
        run_dir: the job directory.
        kl_coef: β (None when the job's config has no ``ppo.kl_coef``). clip_eps: ε (likewise).
        adv_estimator: ``ppo.adv_estimator`` (``gae`` when the config predates it).
        first_score, final_score: reward-model score (reward units) at the first and last logged iteration.
        final_kl: KL to the reference at the last logged iteration, nats per response.
        gain_per_kl: (final_score − first_score) / final_kl, reward units per nat; None when
            final_kl < :data:`MIN_KL`.
        iterations: logged iterations.
        eval_score_before, eval_score_after: mean score of the fixed evaluation prompts before and after
            training (``eval/score_before``/``_after``); eval_kl_after: their KL (nats per response).
        eval_score_low, eval_score_high, eval_kl_low, eval_kl_high: bootstrap 95% intervals of those means
            over the prompts (from ``samples.jsonl``).
        length_score_corr, repeated_ngram_frac: ``diagnostics/*`` at the last logged iteration.
        Each None when the run did not record it.
    """

    run_dir: str
    kl_coef: float | None
    clip_eps: float | None
    adv_estimator: str
    first_score: float
    final_score: float
    final_kl: float
    gain_per_kl: float | None
    iterations: int
    eval_score_before: float | None = None
    eval_score_after: float | None = None
    eval_score_low: float | None = None
    eval_score_high: float | None = None
    eval_kl_after: float | None = None
    eval_kl_low: float | None = None
    eval_kl_high: float | None = None
    length_score_corr: float | None = None
    repeated_ngram_frac: float | None = None

    def point(self, use_eval: bool) -> tuple[float, float]:
        """(KL, score) plotted and compared for the Pareto frontier: the fixed-prompt evaluation after
        training with ``use_eval``, else the last training batch's."""
        if use_eval:
            return self.eval_kl_after, self.eval_score_after
        return self.final_kl, self.final_score


def find_runs(multirun_dir: str | Path) -> list[Path]:
    """Job directories under ``multirun_dir`` (any depth) that hold ``csv/metrics.csv``, sorted.

    Raises:
        FileNotFoundError: ``multirun_dir`` does not exist, or no run with a metrics file is in it.
    """
    root = Path(multirun_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"no such sweep directory: {root}")
    runs = sorted({p.parent.parent for p in root.rglob("csv/metrics.csv")},  # job 10 after job 9
                  key=lambda p: [(0, int(s), "") if s.isdigit() else (1, 0, s) for s in p.relative_to(root).parts])
    if not runs:
        raise FileNotFoundError(f"no run found in {root}: no <job dir>/csv/metrics.csv below it "
                                "(was the sweep run with logger=csv or logger=[csv,wandb]?)")
    return runs


def run_params(run_dir: str | Path) -> dict[str, float | str | None]:
    """β, ε and the estimator of a job: ``{"kl_coef", "clip_eps", "adv_estimator"}`` from
    ``.hydra/config.yaml``, else from the ``ppo.<key>=`` entries of ``.hydra/overrides.yaml``; β and
    ε None where absent, the estimator ``gae``."""
    hydra_dir = Path(run_dir) / ".hydra"
    kinds = {"kl_coef": float, "clip_eps": float, "adv_estimator": str}
    params: dict[str, float | str | None] = dict.fromkeys(kinds)
    config = hydra_dir / "config.yaml"
    if config.exists():
        ppo = OmegaConf.load(config).get("ppo") or {}
        for key, kind in kinds.items():
            if ppo.get(key) is not None:
                params[key] = kind(ppo[key])
    overrides = hydra_dir / "overrides.yaml"
    if overrides.exists():
        for item in OmegaConf.load(overrides):
            key, _, value = str(item).lstrip("+~").partition("=")
            name = key.removeprefix("ppo.")
            if key.startswith("ppo.") and name in params and params[name] is None:
                params[name] = kinds[name](value)
    params["adv_estimator"] = params["adv_estimator"] or "gae"
    params.update(_dpo_params(hydra_dir))
    return params


def eval_after(run_dir: str | Path, n_resamples: int = BOOTSTRAP_RESAMPLES) -> dict[str, float] | None:
    """The fixed-prompt evaluation after training from ``<run_dir>/samples.jsonl`` (the rows of phase
    ``after`` with the highest ``step``, one per prompt, written by ``PPOModule.evaluate_samples``): mean
    score and KL with their :func:`~rlhf_lightning.evaluation.diagnostics.bootstrap_ci` (95%, fixed seed) over the
    prompts, as ``{"score", "score_low", "score_high", "kl", "kl_low", "kl_high", "prompts"}``; None when the
    file or the rows are missing."""
    path = Path(run_dir) / "samples.jsonl"
    if not path.exists():
        return None
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if r.get("phase") == "after"]
    if not rows:
        return None
    last = max(r.get("step", 0) for r in rows)
    rows = [r for r in rows if r.get("step", 0) == last]
    out: dict[str, float] = {"prompts": len(rows)}
    for key in ("score", "kl"):
        values = [float(r[key]) for r in rows]
        out[key] = sum(values) / len(values)
        out[f"{key}_low"], out[f"{key}_high"] = bootstrap_ci(values, n_resamples)
    return out


def _dpo_params(hydra_dir: Path) -> dict[str, float | str | None]:
    """A DPO run's group and β (``{"adv_estimator": "dpo"|"ipo"|"hinge", "kl_coef": β, "clip_eps": None}``) from
    the ``dpo`` node of ``.hydra/config.yaml``; ``{}`` for other runs."""
    config = hydra_dir / "config.yaml"
    dpo = OmegaConf.load(config).get("dpo") if config.exists() else None
    if not dpo:
        return {}
    loss_type = str(dpo.get("loss_type") or "sigmoid")
    return {"adv_estimator": DPO_GROUPS.get(loss_type, loss_type), "kl_coef": float(dpo.get("beta")),
            "clip_eps": None}


def summarize_run(run_dir: str | Path, score_key: str = SCORE_KEY, kl_key: str = KL_KEY) -> RunResult:
    """Read one job's metrics and parameters into a :class:`RunResult` (with the fixed-prompt evaluation
    and the diagnostics when the run logged them).

    Raises:
        FileNotFoundError: no ``csv/metrics.csv`` in ``run_dir``.
        ValueError: the metrics file has no ``score_key`` or ``kl_key`` values (not a PPO run?).
    """
    rows = read_metrics(run_dir)
    params = run_params(run_dir)
    if params["adv_estimator"] in DPO_GROUPS.values():  # no training score: the evaluation's
        score_key, kl_key = EVAL_SCORE_KEY, EVAL_KL_KEY
    scores, kls = series(rows, score_key), series(rows, kl_key)
    if score_key == EVAL_SCORE_KEY:  # one value after training; the first score is the one before it
        scores = series(rows, EVAL_FIRST_SCORE_KEY)[:1] + scores
    if not scores or not kls:
        raise ValueError(f"{Path(run_dir) / 'csv' / 'metrics.csv'} has no {score_key!r} or {kl_key!r} values "
                         "(is it a PPO or DPO run?)")
    final_kl = kls[-1]
    gain = (scores[-1] - scores[0]) / final_kl if final_kl >= MIN_KL else None

    def last(key: str) -> float | None:
        values = series(rows, key)
        return values[-1] if values else None

    extra = {"eval_score_before": last("eval/score_before"), "eval_score_after": last("eval/score_after"),
             "eval_kl_after": last("eval/kl_after"), "length_score_corr": last("diagnostics/length_score_corr"),
             "repeated_ngram_frac": last("diagnostics/repeated_ngram_frac")}
    evaluation = eval_after(run_dir) if extra["eval_score_after"] is not None else None
    if evaluation is not None:
        extra.update(eval_score_low=evaluation["score_low"], eval_score_high=evaluation["score_high"],
                     eval_kl_low=evaluation["kl_low"], eval_kl_high=evaluation["kl_high"])
    return RunResult(str(run_dir), **params, first_score=scores[0], final_score=scores[-1],
                     final_kl=final_kl, gain_per_kl=gain, iterations=len(scores), **extra)


def uses_eval(results: list[RunResult]) -> bool:
    """Whether every run has the fixed-prompt evaluation after training (then it is what is compared)."""
    return bool(results) and all(r.eval_score_after is not None and r.eval_kl_after is not None for r in results)


def pareto_front(results: list[RunResult], use_eval: bool = False) -> list[RunResult]:
    """The runs no other run dominates (a run dominates another with a KL no higher and a score no
    lower, one of them strictly), sorted by KL: the best score reached for each KL budget. KL and score
    are :meth:`RunResult.point`'s (the fixed-prompt evaluation with ``use_eval``)."""
    def dominates(a: RunResult, b: RunResult) -> bool:
        (ka, sa), (kb, sb) = a.point(use_eval), b.point(use_eval)
        return ka <= kb and sa >= sb and (ka < kb or sa > sb)

    front = [r for r in results if not any(dominates(o, r) for o in results)]
    return sorted(front, key=lambda r: r.point(use_eval))


def _cell(value) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    return str(value)


def _interval(value: float | None, low: float | None, high: float | None, before: float | None = None) -> str:
    """``"before → value [low, high]"`` with the parts that exist; ``n/a`` without a value."""
    if value is None:
        return "n/a"
    text = (f"{_cell(before)} → " if before is not None else "") + _cell(value)
    return text + (f" [{_cell(low)}, {_cell(high)}]" if low is not None and high is not None else "")


def write_tables(results: list[RunResult], out_dir: str | Path) -> tuple[Path, Path]:
    """Write ``report.md`` (markdown table, the runs on their estimator's Pareto frontier marked) and
    ``report.csv`` (every field of :class:`RunResult` plus ``pareto``) into ``out_dir``. Returns the two paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    use_eval = uses_eval(results)
    front = {r.run_dir for estimator in {r.adv_estimator for r in results}
             for r in pareto_front([r for r in results if r.adv_estimator == estimator], use_eval)}
    names = [f.name for f in fields(RunResult)]
    csv_path = out_dir / "report.csv"
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[*names, "pareto"])
        writer.writeheader()
        for r in results:
            writer.writerow({**asdict(r), "pareto": r.run_dir in front})
    header = ["run", "estimator", "β (kl_coef)", "ε (clip_eps)", "first score", "final score", "final KL (nats)",
              "score gain / nat KL", "Pareto", "held-out score before → after [95% CI]", "held-out KL after [95% CI]",
              "length–score corr.", "repeated n-gram"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in results:
        cells = [Path(r.run_dir).name, r.adv_estimator, r.kl_coef, r.clip_eps, r.first_score, r.final_score, r.final_kl,
                 r.gain_per_kl, "✓" if r.run_dir in front else "",
                 _interval(r.eval_score_after, r.eval_score_low, r.eval_score_high, r.eval_score_before),
                 _interval(r.eval_kl_after, r.eval_kl_low, r.eval_kl_high), r.length_score_corr, r.repeated_ngram_frac]
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    md_path = out_dir / "report.md"
    md_path.write_text("\n".join(lines) + "\n")
    return md_path, csv_path


def plot(results: list[RunResult], path: str | Path) -> Path:
    """Scatter score against KL (nats per response), one labelled point (β, ε) per run and one colour per
    estimator, each estimator's Pareto frontier drawn as a line in its colour (Gao et al. 2022): the
    fixed-prompt evaluation after training, with bootstrap 95% error bars, when every run has it
    (:func:`uses_eval`), else the last training batch. Writes a PNG (matplotlib, Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    estimators = sorted({r.adv_estimator for r in results})
    colours = dict(zip(estimators, plt.get_cmap("tab10").colors, strict=False))
    use_eval = uses_eval(results)
    fig, ax = plt.subplots(figsize=(6, 4.5))
    try:
        for estimator in estimators:
            runs = [r for r in results if r.adv_estimator == estimator]
            front = pareto_front(runs, use_eval)
            kls, scores = zip(*(r.point(use_eval) for r in runs), strict=True)
            ax.scatter(kls, scores, color=colours[estimator], alpha=0.5)
            if use_eval:
                for r in runs:
                    if r.eval_score_low is not None:
                        score, kl = r.eval_score_after, r.eval_kl_after
                        ax.errorbar(kl, score, color=colours[estimator], alpha=0.5,
                                    yerr=[[score - r.eval_score_low], [r.eval_score_high - score]],
                                    xerr=[[kl - r.eval_kl_low], [r.eval_kl_high - kl]])
            ax.plot(*zip(*(r.point(use_eval) for r in front), strict=True), "o-", color=colours[estimator],
                    label=f"{estimator}: Pareto frontier")
        for r in results:
            label = f"β={_cell(r.kl_coef)}" + (f", ε={_cell(r.clip_eps)}" if r.clip_eps is not None else "")
            ax.annotate(label, r.point(use_eval), fontsize=7, textcoords="offset points", xytext=(4, 4))
        ax.set_xlabel("KL to the reference (nats per response)")
        ax.set_ylabel("held-out score after training (95% CI)" if use_eval else "score, last training batch")
        ax.set_title("Sweep: score against KL, by estimator")
        ax.legend()
        fig.tight_layout()
        fig.savefig(path, dpi=120)
    finally:
        plt.close(fig)
    return Path(path)


def overoptimization_table(runs: list[tuple[RunResult, EvalCurve]]) -> list[dict]:
    """One row per run and judge: where the judge's score peaked along training (its KL and √KL, the judge's and
    the proxy's score there) and where training ended (KL, proxy, judge), with the run's β, ε and estimator: the
    KL budget beyond which the proxy's gains stopped being the judge's (Gao et al. 2022)."""
    table = []
    for result, curve in runs:
        for name in curve.judges:
            i = curve.peak(name)
            judge = curve.judges[name]
            table.append({"run": Path(result.run_dir).name, "estimator": result.adv_estimator,
                          "kl_coef": result.kl_coef, "clip_eps": result.clip_eps, "judge": name,
                          "evaluations": len(curve.kl), "peak_kl": curve.kl[i], "peak_sqrt_kl": curve.sqrt_kl[i],
                          "peak_judge": judge[i], "proxy_at_peak": curve.score[i], "final_kl": curve.kl[-1],
                          "final_proxy": curve.score[-1], "final_judge": judge[-1], "judge_before": judge[0],
                          "proxy_before": curve.score[0]})
    return table


def write_overoptimization(runs: list[tuple[RunResult, EvalCurve]], out_dir: str | Path) -> tuple[Path, Path] | None:
    """``overoptimization.md`` (:func:`overoptimization_table`) and ``overoptimization.png``
    (:func:`plot_overoptimization`) in ``out_dir`` for the runs whose evaluations have judges; ``None`` when none
    has."""
    runs = [(r, c) for r, c in runs if c.judges]
    if not runs:
        return None
    out_dir = Path(out_dir)
    table = overoptimization_table(runs)
    header = ["run", "estimator", "β", "ε", "judge", "evaluations", "judge peak at KL (nats)", "√KL",
              "judge: before → peak → final", "proxy: before → at peak → final", "final KL"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for t in table:
        judge = f"{_cell(t['judge_before'])} → {_cell(t['peak_judge'])} → {_cell(t['final_judge'])}"
        proxy = f"{_cell(t['proxy_before'])} → {_cell(t['proxy_at_peak'])} → {_cell(t['final_proxy'])}"
        cells = [t["run"], t["estimator"], t["kl_coef"], t["clip_eps"], t["judge"], t["evaluations"], t["peak_kl"],
                 t["peak_sqrt_kl"], judge, proxy, t["final_kl"]]
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    md = out_dir / "overoptimization.md"
    md.write_text("\n".join(lines) + "\n")
    labels = [f"β={_cell(r.kl_coef)}" + (f" ε={_cell(r.clip_eps)}" if r.clip_eps is not None else "")
              + (f" {r.adv_estimator}" if len({x.adv_estimator for x, _ in runs}) > 1 else "") for r, _ in runs]
    png = plot_overoptimization(list(zip(labels, [c for _, c in runs], strict=True)), out_dir / "overoptimization.png")
    return md, png


def report(multirun_dir: str | Path, out_dir: str | Path | None = None, score_key: str = SCORE_KEY,
           kl_key: str = KL_KEY) -> list[RunResult]:
    """Summarize every run of ``multirun_dir`` and write ``report.md``, ``report.csv`` and ``report.png``
    into ``out_dir`` (default: ``multirun_dir``), and, when the runs' held-out evaluations have judges,
    ``overoptimization.md`` and ``overoptimization.png`` (:func:`write_overoptimization`). Returns the runs' results in
    job order.

    Raises:
        FileNotFoundError: no run in ``multirun_dir`` (see :func:`find_runs`).
        ValueError: a run without the score or KL metric.
    """
    runs = find_runs(multirun_dir)
    results = [summarize_run(d, score_key, kl_key) for d in runs]
    out_dir = Path(out_dir or multirun_dir)
    write_tables(results, out_dir)
    plot(results, out_dir / "report.png")
    curves = [(r, c) for r, c in zip(results, map(eval_curve, runs), strict=True) if c is not None]
    write_overoptimization(curves, out_dir)
    return results


def main(argv: list[str] | None = None) -> list[RunResult]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("multirun_dir", help="a Hydra multirun directory, e.g. multirun/ppo/<date>")
    parser.add_argument("--out", help="where to write report.{md,csv,png} (default: the multirun directory)")
    parser.add_argument("--score-key", default=SCORE_KEY)
    parser.add_argument("--kl-key", default=KL_KEY)
    parser.add_argument("--eval", action="store_true",
                        help=f"read every run from the held-out evaluation ({EVAL_SCORE_KEY}, {EVAL_KL_KEY}): "
                             "PPO and DPO runs on one frontier")
    args = parser.parse_args(argv)
    if args.eval:
        args.score_key, args.kl_key = EVAL_SCORE_KEY, EVAL_KL_KEY
    try:
        results = report(args.multirun_dir, args.out, args.score_key, args.kl_key)
    except (FileNotFoundError, ValueError) as err:
        parser.exit(2, f"error: {err}\n")
    out = Path(args.out or args.multirun_dir)
    print((out / "report.md").read_text(), end="")
    written = [out / "report.md", out / "report.csv", out / "report.png"]
    if (out / "overoptimization.md").exists():
        print((out / "overoptimization.md").read_text(), end="")
        written += [out / "overoptimization.md", out / "overoptimization.png"]
    print("wrote " + ", ".join(map(str, written)))
    return results


if __name__ == "__main__":
    main()
