"""Summary of a reward → PPO run: ``python -m rlhf_lightning.summary [<reward run dir>] <ppo run dir>``.

Reads the CSV metrics each stage wrote (``<run dir>/csv/metrics.csv``) and the PPO sample file
(``<run dir>/samples.jsonl``) and prints: the reward model's validation accuracy, the mean
score and KL at the first and last PPO iterations (training batches, and the fixed held-out
evaluation prompts before the first and after the last iteration), and sample prompts with the
policy's responses before and after PPO. Without a reward run (PPO with reward functions alone, e.g.
the RLVR demo) the reward model's line is left out; each reward function's mean on the held-out prompts
before and after (``eval/reward/<name>``: a verifier's is the held-out accuracy) is shown when logged.

With judges (``eval.judges``): each judge's held-out score before and after, with intervals and the paired change;
with evaluations along training (``eval.every_n_iterations``): the proxy and the judges against √KL at each
evaluation, each judge's peak marked (:class:`EvalCurve`).

Diagnostics (:mod:`rlhf_lightning.evaluation.diagnostics`): the reward model's held-out accuracy interval, calibration
error and length bias (from ``<reward run dir>/rm_eval.json`` when ``python -m rlhf_lightning.rm_eval`` wrote
it, else the reward stage's ``val/*`` metrics); bootstrap 95% intervals of the held-out score before, after,
and of its change (paired by prompt); and PPO's reward-hacking signals (``diagnostics/*``) at the first and
last iterations, against the run's ``ppo.alarms`` thresholds.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

from rlhf_lightning.evaluation.diagnostics import ALARMS, bootstrap_ci

#: The reward stage's validation diagnostics (``RewardModule``), shown when there is no rm_eval.json.
REWARD_VAL_KEYS = ("val/accuracy_ci_low", "val/accuracy_ci_high", "val/ece", "val/acc_chosen_shorter",
                   "val/acc_chosen_longer", "val/length_score_corr")


def read_metrics(run_dir: str | Path) -> list[dict[str, float]]:
    """Rows of ``<run_dir>/csv/metrics.csv`` with numeric cells as floats and empty cells dropped.

    Raises:
        FileNotFoundError: no metrics file in that run directory.
    """
    path = Path(run_dir) / "csv" / "metrics.csv"
    if not path.exists():
        raise FileNotFoundError(f"no metrics file at {path}: is {run_dir} a run directory of train.py?")
    with path.open(newline="") as f:
        rows = []
        for row in csv.DictReader(f):
            parsed = {}
            for key, value in row.items():
                try:
                    parsed[key] = float(value)
                except (TypeError, ValueError):
                    continue
            rows.append(parsed)
    return rows


def series(rows: list[dict[str, float]], key: str) -> list[float]:
    """Finite values of one metric in logging order."""
    return [r[key] for r in rows if key in r and math.isfinite(r[key])]


def judge_label(name: str) -> str:
    """A judge's label in printed tables, logs and figure legends: ``"judge <name>"``, or ``"judge"`` alone for a
    judge named ``judge`` (the demo's), so that it never reads "judge judge".

    Args:
        name: the judge's name (``eval.judges[i].name``; its metrics are ``eval/judge/<name>``).
    """
    return "judge" if name == "judge" else f"judge {name}"

@dataclass
class EvalCurve:
    """A run's held-out evaluations along training (``eval/*`` logged without a suffix at each evaluation: before,
    every ``eval.every_n_iterations``, after; :class:`~rlhf_lightning.evaluation.heldout.HeldOutEvaluation`).

    Attributes:
        steps: the optimizer step of each evaluation.
        kl: the mean KL to the reference of the held-out responses (nats per response).
        score: the proxy's mean score (``eval/score``).
        judges: judge name → its mean score at each evaluation (``eval/judge/<name>``).
    """

    steps: list[float]
    kl: list[float]
    score: list[float]
    judges: dict[str, list[float]]

    @property
    def sqrt_kl(self) -> list[float]:
        """√KL of each evaluation (Gao et al. 2022's axis; a negative k1 estimate counts as 0)."""
        return [math.sqrt(max(k, 0.0)) for k in self.kl]

    def peak(self, judge: str) -> int:
        """The index of the evaluation where ``judge``'s score was highest (the first of equal ones)."""
        values = self.judges[judge]
        return max(range(len(values)), key=lambda i: (values[i], -i))


def eval_curve(run_dir: str | Path) -> EvalCurve | None:
    """The :class:`EvalCurve` of a run from its ``csv/metrics.csv`` (rows with ``eval/kl`` and ``eval/score``),
    ``None`` when it logged no evaluation series."""
    rows = [r for r in read_metrics(run_dir) if "eval/kl" in r and "eval/score" in r]
    if not rows:
        return None
    names = sorted({key.removeprefix("eval/judge/") for r in rows for key in r
                    if key.startswith("eval/judge/") and not key.endswith(("_ci_low", "_ci_high", "_change"))
                    and "_before" not in key and "_after" not in key})
    return EvalCurve(steps=[r.get("step", math.nan) for r in rows], kl=[r["eval/kl"] for r in rows],
                     score=[r["eval/score"] for r in rows],
                     judges={name: [r.get(f"eval/judge/{name}", math.nan) for r in rows] for name in names})


def plot_overoptimization(runs: list[tuple[str, EvalCurve]], path: str | Path) -> Path:
    """Proxy and judges against √KL along training (Gao et al. 2022, Fig. 1's axes), one colour per run: the
    change of each score from the run's first evaluation (the proxy solid, each judge dashed), the judge's peak
    marked with a star. Writes a PNG (matplotlib, Agg backend).

    Args:
        runs: ``(label, curve)`` per run.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = plt.get_cmap("tab10").colors
    styles = ["--", ":", "-."]
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    try:
        for k, (label, curve) in enumerate(runs):
            colour = colours[k % len(colours)]
            x = curve.sqrt_kl
            ax.plot(x, [v - curve.score[0] for v in curve.score], "o-", color=colour, label=f"{label}: proxy")
            for j, (name, values) in enumerate(curve.judges.items()):
                ax.plot(x, [v - values[0] for v in values], styles[j % len(styles)], marker=".", color=colour,
                        label=f"{label}: {judge_label(name)}")
                i = curve.peak(name)
                ax.plot([x[i]], [values[i] - values[0]], "*", color=colour, markersize=12)
        ax.axhline(0.0, color="grey", linewidth=0.5)
        ax.set_xlabel("√KL to the reference (√nats per response), held-out prompts")
        ax.set_ylabel("score change from the start (each scorer's units)")
        ax.set_title("Overoptimization: the proxy against judges it never trained on")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
    finally:
        plt.close(fig)
    return Path(path)


def summarize(reward_dir: str | Path | None, ppo_dir: str | Path, window: int = 5, samples_shown: int = 3) -> dict:
    """Collect the demo's figures as a dict (see module docstring).

    ``ppo[metric]``: ``first``/``last`` are single training iterations, each on a different random
    batch of prompts; ``first_mean``/``last_mean`` average the first and last ``window`` iterations.
    ``eval``: mean score (reward-model units, missing-EOS penalty included), mean reward-model
    score without the penalty (``rm_score``), the fraction of responses that ended with EOS
    (``eos_frac``; NaN for sample files written before it was recorded) and mean KL (nats per response)
    on the fixed held-out evaluation prompts, answered before the first iteration and after the last
    one with the same sampling seed (``PPOModule.evaluate_samples``): the like-for-like before/after comparison.
    ``samples``: the first ``samples_shown`` evaluation prompts with both responses.
    ``eval_rewards``: reward function name → ``{"before", "after"}`` held-out means (empty without functions).
    ``reward_dir`` ``None``: no reward-model stage (``reward_val_accuracy`` None).

    Raises:
        FileNotFoundError: a run directory without ``csv/metrics.csv``.
    """
    reward_rows = read_metrics(reward_dir) if reward_dir is not None else []
    val_acc = series(reward_rows, "val/accuracy")
    ppo_rows = read_metrics(ppo_dir)
    out: dict = {"reward_val_accuracy": val_acc[-1] if val_acc else None,
                 "reward_val_accuracy_history": val_acc, "ppo": {}}
    names = sorted({key.removeprefix("eval/reward/").rsplit("_", 1)[0] for row in ppo_rows for key in row
                    if key.startswith("eval/reward/")})
    out["eval_rewards"] = {name: {phase: (series(ppo_rows, f"eval/reward/{name}_{phase}") or [math.nan])[-1]
                                  for phase in ("before", "after")} for name in names}
    for key in ("objective/score", "objective/rm_score", "objective/kl"):
        values = series(ppo_rows, key)
        if values:
            out["ppo"][key] = {"first": values[0], "last": values[-1], "iterations": len(values),
                               "first_mean": sum(values[:window]) / len(values[:window]),
                               "last_mean": sum(values[-window:]) / len(values[-window:])}
    samples_path = Path(ppo_dir) / "samples.jsonl"
    samples = [json.loads(line) for line in samples_path.read_text().splitlines()] if samples_path.exists() else []
    before = [s for s in samples if s["phase"] == "before"]
    after_rows = [s for s in samples if s["phase"] == "after"]
    after = {s["prompt"]: s for s in after_rows}
    out["eval"] = {phase: {"prompts": len(rows), "score": _mean(r["score"] for r in rows),
                           "rm_score": _mean(r.get("rm_score", r["score"]) for r in rows),
                           "eos_frac": _mean(float(r.get("ends_with_eos", math.nan)) for r in rows),
                           "kl": _mean(r["kl"] for r in rows)}
                   for phase, rows in (("before", before), ("after", after_rows)) if rows}
    for phase, rows in (("before", before), ("after", after_rows)):
        if rows:
            out["eval"][phase]["score_ci"] = list(bootstrap_ci([r["score"] for r in rows]))
    paired = [after[b["prompt"]]["score"] - b["score"] for b in before if b["prompt"] in after]
    if paired:
        out["eval_change"] = {"prompts": len(paired), "mean": _mean(paired), "ci": list(bootstrap_ci(paired))}
    out["judges"] = _judges(before, after)
    curve = eval_curve(ppo_dir)
    out["eval_curve"] = None if curve is None else {**asdict(curve), "sqrt_kl": curve.sqrt_kl,
                                                    "peaks": {name: curve.peak(name) for name in curve.judges}}
    out["reward_diagnostics"] = _reward_diagnostics(reward_dir, reward_rows)
    out["diagnostics"] = _ppo_diagnostics(ppo_dir, ppo_rows)
    out["samples"] = [{"prompt": b["prompt"], "before": b["response"], "before_score": b["score"],
                       "after": after.get(b["prompt"], {}).get("response"),
                       "after_score": after.get(b["prompt"], {}).get("score")} for b in before[:samples_shown]]
    return out


def _judges(before: list[dict], after: dict[str, dict]) -> dict:
    """Each judge's held-out mean before and after training with bootstrap 95% intervals, and its change paired by
    prompt with its interval: ``{name: {"before", "before_ci", "after", "after_ci", "change", "change_ci",
    "prompts"}}`` from the samples' ``judge/<name>`` values (``{}`` without judges)."""
    names = sorted({key.removeprefix("judge/") for row in before for key in row if key.startswith("judge/")})
    out = {}
    for name in names:
        key = f"judge/{name}"
        pairs = [(b[key], after[b["prompt"]][key]) for b in before if key in b and key in after.get(b["prompt"], {})]
        if not pairs:
            continue
        first, last = [p[0] for p in pairs], [p[1] for p in pairs]
        change = [b - a for a, b in pairs]
        out[name] = {"prompts": len(pairs), "before": _mean(first), "before_ci": list(bootstrap_ci(first)),
                     "after": _mean(last), "after_ci": list(bootstrap_ci(last)), "change": _mean(change),
                     "change_ci": list(bootstrap_ci(change))}
    return out


def _reward_diagnostics(reward_dir, reward_rows: list[dict[str, float]]) -> dict:
    """The reward model's diagnostics: ``rm_eval.json`` of the reward run (``source`` ``rm_eval``), else its last
    ``val/*`` diagnostics (``source`` ``val``), else ``{}``."""
    if reward_dir is None:
        return {}
    path = Path(reward_dir) / "rm_eval.json"
    if path.exists():
        d = json.loads(path.read_text())
        bias = d["length_bias"]
        return {"source": "rm_eval", "subset": d.get("subset"), "pairs": d["pairs"], "accuracy": d["accuracy"],
                "accuracy_ci": d["accuracy_ci"], "ece": d["calibration"]["ece"], "margin_mean": d["margin_mean"],
                "acc_chosen_shorter": bias["acc_chosen_shorter"], "acc_chosen_longer": bias["acc_chosen_longer"],
                "n_chosen_shorter": bias["n_chosen_shorter"], "n_chosen_longer": bias["n_chosen_longer"],
                "length_score_corr": bias["pearson"]}
    values = {key: series(reward_rows, key) for key in REWARD_VAL_KEYS}
    if not all(values.values()):
        return {}
    last = {key.removeprefix("val/"): v[-1] for key, v in values.items()}
    acc = series(reward_rows, "val/accuracy")
    return {"source": "val", "accuracy": acc[-1] if acc else math.nan,
            "accuracy_ci": [last.pop("accuracy_ci_low"), last.pop("accuracy_ci_high")], **last}


def _ppo_diagnostics(ppo_dir, ppo_rows: list[dict[str, float]]) -> dict:
    """``diagnostics/<kind>`` → ``{"first", "last", "max", "threshold", "crossed_at"}`` (the first iteration, from
    1, above the run's ``ppo.alarms`` threshold, read from ``.hydra/config.yaml``; None when never or no threshold).
    NaN iterations (an undefined correlation) are left out."""
    thresholds = {}
    config = Path(ppo_dir) / ".hydra" / "config.yaml"
    if config.exists():
        from omegaconf import OmegaConf

        thresholds = dict((OmegaConf.load(config).get("ppo") or {}).get("alarms") or {})
    out = {}
    for kind, (field_name, _) in ALARMS.items():
        values = series(ppo_rows, f"diagnostics/{kind}")
        if not values:
            continue
        limit = thresholds.get(field_name)
        size = [abs(v) for v in values] if kind == "length_score_corr" else values  # as check_alarms compares
        crossed = next((i + 1 for i, v in enumerate(size) if limit is not None and v > limit), None)
        out[kind] = {"first": values[0], "last": values[-1], "max": max(values), "threshold": limit,
                     "crossed_at": crossed}
    return out


def _f(value) -> str:
    """A figure with 3 decimals; ``n/a`` for None or NaN (undefined: e.g. no pair with a shorter chosen)."""
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.3f}"


def _with_ci(value: float, ci, signed: bool = False) -> str:
    """``"0.123 [0.100, 0.150]"`` (``signed``: with a sign, for changes)."""
    form = "+.3f" if signed else ".3f"
    return f"{value:{form}} [{ci[0]:{form}}, {ci[1]:{form}}]"


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


def render(summary: dict) -> None:
    """Print the summary with rich."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    acc = summary["reward_val_accuracy"]
    console.rule("[bold]Run summary")
    if acc is not None:
        console.print(f"Reward model validation accuracy: [bold]{acc:.3f}[/bold]")
    rd = summary.get("reward_diagnostics") or {}
    if rd:
        where = f"rm_eval, {rd.get('subset')} pairs" if rd["source"] == "rm_eval" else "reward stage, val/*"
        console.print(f"Reward model ({where}): accuracy {_f(rd['accuracy'])} [95% CI {_f(rd['accuracy_ci'][0])}, "
                      f"{_f(rd['accuracy_ci'][1])}], calibration error (ECE) {_f(rd['ece'])}, accuracy when the "
                      f"chosen response is the shorter / longer {_f(rd['acc_chosen_shorter'])} / "
                      f"{_f(rd['acc_chosen_longer'])}, score–length correlation {_f(rd['length_score_corr'])}",
                      highlight=False)
    if summary.get("eval_rewards"):
        table = Table(title="Reward functions on the held-out prompts (a verifier's mean is the accuracy)")
        for column in ("function", "before", "after", "change"):
            table.add_column(column)
        for name, v in summary["eval_rewards"].items():
            table.add_row(name, f"{v['before']:.3f}", f"{v['after']:.3f}", f"{v['after'] - v['before']:+.3f}")
        console.print(table)
    table = Table(title="Training batches (score: the reward, i.e. reward model − missing-EOS penalty + reward "
                        "functions; KL to the reference, nats per response)")
    table.add_column("metric", no_wrap=True, min_width=18)
    for column in ("first iteration", "last iteration", "mean of first 5", "mean of last 5"):
        table.add_column(column)
    for key, v in summary["ppo"].items():
        table.add_row(key, f"{v['first']:.3f}", f"{v['last']:.3f}", f"{v['first_mean']:.3f}", f"{v['last_mean']:.3f}")
    console.print(table)
    evaluation = summary.get("eval", {})
    if evaluation:
        with_rm = acc is not None  # a reward-model stage ran: its score alone is a column
        table = Table(title="Evaluation: the same held-out prompts and sampling seed before and after training")
        for column in ("", "prompts", "mean score", *(["reward model alone"] if with_rm else []), "ended with EOS",
                       "mean KL (nats)"):
            table.add_column(column)
        for phase, v in evaluation.items():
            ci = v.get("score_ci")
            table.add_row(f"{phase} training", str(v["prompts"]),
                          f"{v['score']:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else ""),
                          *([f"{v['rm_score']:.3f}"] if with_rm else []), f"{v['eos_frac']:.0%}", f"{v['kl']:.3f}")
        console.print(table)
    change = summary.get("eval_change")
    if change:
        console.print(f"Held-out score change, paired by prompt: {change['mean']:+.3f} "
                      f"[95% bootstrap CI {change['ci'][0]:+.3f}, {change['ci'][1]:+.3f}] over {change['prompts']} "
                      "prompts", highlight=False)
    if summary.get("judges"):
        table = Table(title="Judges (eval.judges: scorers the policy never trained on), the same held-out responses")
        for column in ("judge", "prompts", "before [95% CI]", "after [95% CI]", "change, paired [95% CI]"):
            table.add_column(column)
        for name, v in summary["judges"].items():
            table.add_row(name, str(v["prompts"]), _with_ci(v["before"], v["before_ci"]),
                          _with_ci(v["after"], v["after_ci"]), _with_ci(v["change"], v["change_ci"], signed=True))
        console.print(table)
    curve = summary.get("eval_curve")
    if curve and len(curve["kl"]) > 2:
        table = Table(title="Held-out evaluation along training (Gao et al. 2022's axes: scores against √KL)")
        for column in ("step", "KL (nats)", "√KL", "proxy score", *(judge_label(n) for n in curve["judges"])):
            table.add_column(column)
        for i, step in enumerate(curve["steps"]):
            marks = {n: " (peak)" if curve["peaks"][n] == i else "" for n in curve["judges"]}
            table.add_row(f"{step:.0f}", f"{curve['kl'][i]:.3f}", f"{curve['sqrt_kl'][i]:.3f}",
                          f"{curve['score'][i]:.3f}", *(f"{v[i]:.3f}{marks[n]}" for n, v in curve["judges"].items()))
        console.print(table)
    if summary.get("diagnostics"):
        table = Table(title="Reward hacking? Training batches (ppo.alarms: a warning when one exceeds its threshold)")
        table.add_column("diagnostic", no_wrap=True)
        for column in ("first iteration", "last iteration", "max", "threshold", "first exceeded at"):
            table.add_column(column)
        for kind, v in summary["diagnostics"].items():
            crossed = "never" if v["crossed_at"] is None else f"iteration {v['crossed_at']}"
            table.add_row(kind, f"{v['first']:.3f}", f"{v['last']:.3f}", f"{v['max']:.3f}",
                          "off" if v["threshold"] is None else f"{v['threshold']:g}",
                          crossed if v["threshold"] is not None else "")
        console.print(table)
    for i, s in enumerate(summary["samples"], 1):
        console.rule(f"sample {i}")
        console.print("[bold]prompt[/bold]", s["prompt"][-400:], markup=True, highlight=False)
        console.print(f"[bold]before[/bold] (score {s['before_score']:.2f})", s["before"], highlight=False)
        if s["after"] is not None:
            console.print(f"[bold]after[/bold]  (score {s['after_score']:.2f})", s["after"], highlight=False)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dirs", nargs="+", metavar="run_dir",
                        help="<reward run dir> <ppo run dir>, or <ppo run dir> alone (no reward-model stage)")
    parser.add_argument("--json", help="also write the summary to this JSON file")
    parser.add_argument("--figure", help="also draw the proxy and the judges against √KL along training to this PNG "
                                         "(with eval.judges and eval.every_n_iterations)")
    args = parser.parse_args(argv)
    if len(args.run_dirs) > 2:
        parser.error("expected [<reward run dir>] <ppo run dir>")
    reward_dir, ppo_dir = ([None] + args.run_dirs)[-2:]
    summary = summarize(reward_dir, ppo_dir)
    render(summary)
    curve = eval_curve(ppo_dir)
    if args.figure and curve is not None:
        plot_overoptimization([("this run", curve)], args.figure)
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
