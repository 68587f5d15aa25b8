"""Is a reward model good enough? ``python -m rlhf_lightning.rm_eval <model dir> <preference data> [--max-length N]``.

Scores every preference pair of the data with the reward model exactly as the reward stage does (the
pairs tokenized and truncated by :class:`~rlhf_lightning.data.PreferenceDataModule`, batched by
:class:`~rlhf_lightning.data.PreferenceCollator`, scored at each sequence's last token by
:func:`~rlhf_lightning.models.forward.right_padded_scores`), then reports
:func:`~rlhf_lightning.evaluation.diagnostics.preference_diagnostics`: accuracy with a bootstrap 95% interval, the mean
margin, the Bradley–Terry calibration (bins and ECE), the length bias and the score distribution. Prints a
table (rich) and writes ``rm_eval.json`` and ``rm_eval.png`` (calibration diagram; score against response
length) into ``--out`` (default: the model directory's parent, the reward stage's run directory).

``--heldout`` evaluates only the pairs the reward stage held out: ``data.limit``, ``data.val_size``, ``seed``
and ``reward.max_length`` are read from the run's ``.hydra/config.yaml`` (``<model dir>/../.hydra``), so the
same subset and split come out. Without it every pair of the data is scored (``--limit``, ``--val-size``,
``--seed`` and ``--subset`` choose otherwise).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

from rlhf_lightning.config.schema import RewardConfig
from rlhf_lightning.evaluation.diagnostics import (
    BOOTSTRAP_RESAMPLES,
    BOOTSTRAP_SEED,
    CALIBRATION_BINS,
    preference_diagnostics,
)

SUBSETS = ("all", "train", "val")


def score_pairs(model, items: list[dict], pad_token_id: int, batch_size: int = 16) -> dict[str, torch.Tensor]:
    """Reward-model scores of preference pairs, as the reward stage computes them.

    Args:
        model: a scalar model (``AutoModelForSequenceClassification``, one label), in eval mode.
        items: dicts with ``prompt_ids``, ``chosen_ids``, ``rejected_ids`` (lists of int), as
            :class:`~rlhf_lightning.data.PreferenceDataModule` builds them.
        pad_token_id: the tokenizer's padding id. batch_size: pairs per forward batch.

    Returns:
        ``{"chosen", "rejected"}``: (n,) float32 scores; ``{"chosen_lengths", "rejected_lengths"}``: (n,) long
        response lengths in tokens.
    """
    from rlhf_lightning.data import PreferenceCollator
    from rlhf_lightning.models.forward import right_padded_scores

    collate = PreferenceCollator(pad_token_id)
    out: dict[str, list[torch.Tensor]] = {"chosen": [], "rejected": [], "chosen_lengths": [], "rejected_lengths": []}
    device = next(model.parameters()).device
    with torch.inference_mode():
        for start in range(0, len(items), batch_size):
            batch = collate(items[start:start + batch_size])
            scores = right_padded_scores(model, batch["input_ids"].to(device), batch["attention_mask"].to(device))
            n = scores.shape[0] // 2
            lengths = batch["response_lengths"]
            out["chosen"].append(scores[:n].float().cpu())
            out["rejected"].append(scores[n:].float().cpu())
            out["chosen_lengths"].append(lengths[:n])
            out["rejected_lengths"].append(lengths[n:])
    return {key: torch.cat(values) for key, values in out.items()}


def heldout_settings(model_dir: str | Path) -> dict:
    """The reward stage's data settings from ``<model dir>/../.hydra/config.yaml``: ``{"limit", "val_size",
    "seed", "max_length", "split", "path"}`` (``path`` as written in the config, relative to where it ran).

    Raises:
        FileNotFoundError: no such config (the model was not exported by ``train.py stage=reward``).
    """
    from omegaconf import OmegaConf

    path = Path(model_dir).resolve().parent / ".hydra" / "config.yaml"
    if not path.exists():
        raise FileNotFoundError(f"--heldout needs the reward run's config at {path} (not found)")
    cfg = OmegaConf.load(path)
    data = cfg.get("data") or {}
    return {"limit": data.get("limit"), "val_size": data.get("val_size", 200), "seed": int(cfg.get("seed", 0)),
            "max_length": int((cfg.get("reward") or {}).get("max_length", RewardConfig.max_length)),
            "split": data.get("split", "train"), "path": data.get("path")}


def render(result: dict) -> None:
    """Print the diagnostics as rich tables."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    bias, scores, cal = result["length_bias"], result["scores"], result["calibration"]
    table = Table(title=f"Reward model on {result['pairs']} preference pairs ({result.get('source', '')})")
    table.add_column("metric", no_wrap=True)
    table.add_column("value")
    low, high = result["accuracy_ci"]
    rows = [("accuracy (chosen scored higher)", f"{result['accuracy']:.3f}  [95% CI {low:.3f}, {high:.3f}]"),
            ("mean margin r_chosen − r_rejected", f"{result['margin_mean']:.3f}"),
            ("calibration error (ECE, Bradley–Terry)", f"{cal['ece']:.3f}"),
            ("accuracy, chosen is the shorter",
             f"{bias['acc_chosen_shorter']:.3f}  ({bias['n_chosen_shorter']} pairs)"),
            ("accuracy, chosen is the longer", f"{bias['acc_chosen_longer']:.3f}  ({bias['n_chosen_longer']} pairs)"),
            ("accuracy of 'the shorter one is preferred'", f"{bias['shorter_wins_accuracy']:.3f}"),
            ("accuracy − that rule's (paired)", "{:+.3f}  [95% CI {:+.3f}, {:+.3f}]".format(
                bias["gain_over_shorter_rule"], *bias["gain_over_shorter_rule_ci"])),
            ("score vs length: Pearson / Spearman", f"{bias['pearson']:.3f} / {bias['spearman']:.3f}"),
            ("score: mean ± std", f"{scores['mean']:.3f} ± {scores['std']:.3f}"),
            ("score: min / q05 / median / q95 / max", " / ".join(f"{scores[k]:.2f}" for k in
                                                               ("min", "q05", "median", "q95", "max"))),
            ("score: chosen mean / rejected mean", f"{scores['chosen_mean']:.3f} / {scores['rejected_mean']:.3f}")]
    for name, value in rows:
        table.add_row(name, value)
    console.print(table)
    bins = Table(title="Calibration: P(higher-scored response preferred) = σ(|margin|) against how often it is")
    for column in ("bin", "pairs", "predicted", "observed"):
        bins.add_column(column)
    edges = cal["edges"]
    for i, count in enumerate(cal["counts"]):
        if count:
            bins.add_row(f"[{edges[i]:.2f}, {edges[i + 1]:.2f})", str(count), f"{cal['confidence'][i]:.3f}",
                         f"{cal['observed'][i]:.3f}")
    console.print(bins)


def plot(result: dict, scored: dict[str, torch.Tensor], path: str | Path) -> Path:
    """Two panels: the calibration diagram (predicted against observed per bin, point size ∝ pairs) and
    the scores of chosen and rejected responses against their lengths. Writes a PNG (matplotlib, Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cal = result["calibration"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4.2))
    try:
        kept = [i for i, c in enumerate(cal["counts"]) if c]
        ax1.plot([0.5, 1.0], [0.5, 1.0], "--", color="grey", label="calibrated")
        ax1.scatter([cal["confidence"][i] for i in kept], [cal["observed"][i] for i in kept],
                    s=[12 + 4 * cal["counts"][i] for i in kept], alpha=0.7)
        ax1.plot([cal["confidence"][i] for i in kept], [cal["observed"][i] for i in kept], "-", alpha=0.6,
                 label=f"ECE {cal['ece']:.3f}")
        ax1.set_xlabel("predicted P(preferred) = σ(|r_chosen − r_rejected|)")
        ax1.set_ylabel("observed: fraction ranked right")
        ax1.set_xlim(0.48, 1.02)
        ax1.set_ylim(-0.02, 1.02)
        ax1.set_title(f"Calibration ({result['pairs']} pairs; accuracy {result['accuracy']:.3f})")
        ax1.legend()
        for key, colour in (("chosen", "tab:green"), ("rejected", "tab:red")):
            ax2.scatter(scored[f"{key}_lengths"].numpy(), scored[key].numpy(), s=8, alpha=0.5, color=colour,
                        label=key)
        bias = result["length_bias"]
        ax2.set_xlabel("response length (tokens)")
        ax2.set_ylabel("score")
        ax2.set_title(f"Score vs length (Pearson {bias['pearson']:.2f}, Spearman {bias['spearman']:.2f})")
        ax2.legend()
        fig.tight_layout()
        fig.savefig(path, dpi=110)
    finally:
        plt.close(fig)
    return Path(path)


def _json_safe(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


def main(argv: list[str] | None = None) -> dict:
    """The command line (``python -m rlhf_lightning.rm_eval --help``): score the pairs (:func:`score_pairs`), print
    the table (:func:`render`), write ``rm_eval.json`` and ``rm_eval.png`` into ``--out`` (default: the model
    directory's parent); returns the JSON's content. Bad data or settings raise as the data readers and
    :func:`heldout_settings` do."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", help="a reward model directory (the reward stage's <run dir>/model)")
    parser.add_argument("data", help="preference data: a JSON-lines/parquet/... file, directory or Hub dataset")
    parser.add_argument("--max-length", type=int, default=None,
                        help=f"tokens per sequence (default: the run's with --heldout, else {RewardConfig.max_length})")
    parser.add_argument("--heldout", action="store_true",
                        help="only the pairs the reward stage held out (its limit, val_size, seed from its config)")
    parser.add_argument("--subset", choices=SUBSETS, default=None, help="which split to score (default: all; "
                        "val with --heldout)")
    parser.add_argument("--split", default=None, help="the data source's split (default train)")
    parser.add_argument("--limit", type=int, default=None, help="a seeded random subset of this many pairs")
    parser.add_argument("--val-size", type=int, default=None, help="pairs held out (with --subset val/train)")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=16, help="pairs per forward batch")
    parser.add_argument("--bins", type=int, default=CALIBRATION_BINS, help="calibration bins over [0.5, 1]")
    parser.add_argument("--resamples", type=int, default=BOOTSTRAP_RESAMPLES, help="bootstrap resamples")
    parser.add_argument("--out", help="where to write rm_eval.json and rm_eval.png (default: the model dir's parent)")
    args = parser.parse_args(argv)

    settings = {"limit": None, "val_size": 0, "seed": 0, "max_length": RewardConfig.max_length, "split": "train"}
    if args.heldout:
        try:
            run = heldout_settings(args.model_dir)
        except FileNotFoundError as err:
            parser.exit(2, f"error: {err}\n")
        trained_on = run.pop("path")
        if trained_on and Path(trained_on).name != Path(args.data).name:
            print(f"warning: the reward stage read {trained_on}, not {args.data}: --heldout's split is of that data")
        settings.update(run)
    for key in ("limit", "val_size", "seed", "max_length", "split"):
        if getattr(args, key) is not None:
            settings[key] = getattr(args, key)
    subset = args.subset or ("val" if args.heldout else "all")
    if subset != "all" and not settings["val_size"]:
        parser.error(f"--subset {subset} needs --val-size (or --heldout)")

    from rlhf_lightning.data import PreferenceDataModule
    from rlhf_lightning.models import load_scalar_model, load_tokenizer

    try:
        tokenizer = load_tokenizer(args.model_dir)
        model = load_scalar_model(args.model_dir).eval()
    except (FileNotFoundError, OSError, ValueError) as err:
        parser.exit(2, f"error: cannot load the reward model {args.model_dir}: {err}\n")
    dm = PreferenceDataModule(tokenizer, args.data, split=settings["split"], max_length=settings["max_length"],
                              val_size=settings["val_size"], limit=settings["limit"], seed=settings["seed"],
                              on_error="skip")
    dm.setup("fit")
    items = {"all": list(dm.train_dataset.items) + list(dm.val_dataset.items), "train": dm.train_dataset.items,
             "val": dm.val_dataset.items}[subset]
    if not items:
        parser.exit(2, f"error: no pair in the {subset} subset of {args.data}\n")
    scored = score_pairs(model, items, tokenizer.pad_token_id, args.batch_size)
    result = preference_diagnostics(scored["chosen"], scored["rejected"], scored["chosen_lengths"],
                                    scored["rejected_lengths"], args.bins, args.resamples, BOOTSTRAP_SEED)
    result = {"model": str(args.model_dir), "data": str(args.data), "subset": subset,
              "source": f"{Path(args.data).name}, {subset}", **settings, **result}
    render(result)
    out = Path(args.out) if args.out else Path(args.model_dir).resolve().parent
    out.mkdir(parents=True, exist_ok=True)
    (out / "rm_eval.json").write_text(json.dumps(_json_safe(result), indent=2))
    plot(result, scored, out / "rm_eval.png")
    print(f"wrote {out / 'rm_eval.json'}, {out / 'rm_eval.png'}")
    return result


if __name__ == "__main__":
    main()
