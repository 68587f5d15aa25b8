"""The held-out evaluation that PPO and DPO share (:class:`HeldOutEvaluation`): the same held-out prompts, answered
with the same seed before the first training step, along training (``eval.every_n_iterations``) and after the last,
scored by the proxy (the reward model the policy is trained on, and its reward functions) and by judges it never sees
(``eval.judges``, :mod:`rlhf_lightning.evaluation.judges`), with the KL to the reference.

The points of a run (``eval/score`` and ``eval/judge/<name>`` against ``eval/kl``) draw its overoptimization curve, and
its last one places it on the score-vs-KL frontier (``eval/score_after`` against ``eval/kl_after``) that
:mod:`rlhf_lightning.evaluation.report` draws, whichever stage trained the policy.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

import lightning as L
import torch

from rlhf_lightning.algorithms.kl import compute_rewards
from rlhf_lightning.evaluation.diagnostics import bootstrap_ci
from rlhf_lightning.evaluation.judges import Judge, judge_scores
from rlhf_lightning.evaluation.summary import judge_label
from rlhf_lightning.rollout.experience import Experience
from rlhf_lightning.rollout.sampler import decode_responses

log = logging.getLogger(__name__)

#: Columns of the rows :func:`write_samples` writes.
SAMPLE_COLUMNS = ("phase", "step", "prompt", "response", "score", "rm_score", "ends_with_eos", "kl")


def sample_rows(tokenizer, exp: Experience, phase: str, step: int, limit: int) -> list[dict]:
    """The first ``limit`` rows of ``exp`` (its ``kl`` (N, R) set; ``None``: no reference ran, ``kl`` NaN) decoded
    into dicts of :data:`SAMPLE_COLUMNS`, with each reward function's unweighted reward as ``reward/<name>``
    (when there are any) and, for multi-turn rollouts, each episode's counts as ``agent/<name>`` (turns, tool
    calls, errors and cuts by kind: :func:`~rlhf_lightning.rollout.agent.run_episodes`); a multi-turn response is
    the whole trajectory, the chat template's role markers kept
    (:func:`~rlhf_lightning.rollout.sampler.decode_responses`)."""
    ro = exp.rollout
    stats = ro.episode_stats or {}
    n = min(limit, exp.batch_size)
    prompts = tokenizer.batch_decode(ro.input_ids[:n, : ro.response_start], skip_special_tokens=True)
    responses = decode_responses(tokenizer, ro)[:n]
    kl_seq = ((exp.kl * exp.loss_mask).sum(1) if exp.kl is not None  # None: no reference pass ran
              else torch.full((exp.batch_size,), float("nan")))
    return [{"phase": phase, "step": step, "prompt": p, "response": r,
             "score": float(exp.scores[i]), "rm_score": float(exp.rm_scores[i]),
             "ends_with_eos": bool(ro.ends_with_eos[i]), "kl": float(kl_seq[i]),
             **{f"reward/{name}": float(values[i]) for name, values in exp.reward_components.items()},
             **{f"agent/{name}": float(values[i]) for name, values in stats.items()}}
            for i, (p, r) in enumerate(zip(prompts, responses, strict=True))]


def write_rows(module, rows: list[dict], phase: str, samples_path: str | None) -> None:
    """Append ``rows`` (:func:`sample_rows`) to ``samples_path`` (JSON lines; ``None``: no file) and give them to every
    logger of ``module.loggers`` with tables (W&B, columns :data:`SAMPLE_COLUMNS`), on the global-zero rank only."""
    if not module.trainer.is_global_zero:
        return
    if samples_path:
        Path(samples_path).parent.mkdir(parents=True, exist_ok=True)
        with open(samples_path, "a", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
    for logger in module.loggers:  # every logger with tables (W&B), wherever it is in the list
        if hasattr(logger, "log_table"):
            logger.log_table(key=f"samples/{phase}", columns=list(SAMPLE_COLUMNS),
                             data=[[r[c] for c in SAMPLE_COLUMNS] for r in rows])


def write_samples(module, tokenizer, exp: Experience, phase: str, step: int, limit: int,
                  samples_path: str | None) -> list[dict]:
    """Decode the first ``limit`` rows of ``exp`` (:func:`sample_rows`) and write them (:func:`write_rows`: the
    global-zero rank's). Returns the rows."""
    rows = sample_rows(tokenizer, exp, phase, step, limit)
    write_rows(module, rows, phase, samples_path)
    return rows


def evaluate_policy(module, phase: str, num_prompts: int, collect: Callable[..., Experience], kl_estimator: str,
                    seed: int, greedy: bool, samples_path: str | None, step: int, judges: Sequence[Judge] = (),
                    baseline: list[dict] | None = None, score_eos_token_id: int | None = None
                    ) -> tuple[dict[str, float], list[dict]] | None:
    """Answer the fixed evaluation prompts, score them with the proxy and the judges, and record the result under
    ``phase``.

    The prompts are the datamodule's ``sample_batch(num_prompts)`` (the first held-out prompts), split between
    the ranks (rank r answers prompts r, r + W, ...; a rank left without one answers the first again, since
    decoding runs in lock-step, and that row is dropped); the rows of every rank are gathered, so every rank
    returns the same result, the one a single process gives. Each response's sampling noise is keyed by
    ``seed`` and its prompt's dataset index (``collect(..., seed=seed)``), and the sampling runs in a forked RNG
    seeded with ``seed`` (for samplers that draw from torch's generator): every evaluation sees the same random
    numbers and the training's RNG stream is not advanced. Rows go to ``samples_path`` (:func:`write_rows`).

    Logged to every logger at the current step, once without a suffix (the series along training) and, for
    ``before`` and ``after``, once more suffixed ``_<phase>``:

    - ``eval/score`` (the proxy: reward-model units, missing-EOS penalty included, plus the reward functions),
      ``eval/rm_score`` (the reward model alone), ``eval/kl`` (nats per response, ``kl_estimator``:
      :func:`~rlhf_lightning.algorithms.kl.kl_penalty` summed over the response's tokens), ``eval/eos_frac``,
      ``eval/reward/<name>`` (each reward function; ``environment``: a multi-turn environment's rewards),
      ``eval/agent/<name>`` (multi-turn: turns, tool calls, errors and cuts per episode), ``eval/judge/<name>``
      (each judge,
      :func:`~rlhf_lightning.evaluation.judges.judge_scores`);
    - for the score and each judge, the bootstrap 95% interval of the mean over the prompts (``..._ci_low``,
      ``..._ci_high``; :func:`~rlhf_lightning.evaluation.diagnostics.bootstrap_ci`), and with ``baseline`` (the
      rows of the evaluation before training) the change, paired by prompt, with its interval (``..._change``,
      ``..._change_ci_low``, ``..._change_ci_high``).

    Args:
        module: the LightningModule (its ``trainer``, ``device``, ``tokenizer``, ``reward_model``).
        phase: ``before``, ``during`` or ``after`` (the ``phase`` of the rows).
        num_prompts: how many prompts (0: no evaluation).
        collect: ``collect(input_ids, attention_mask, prompt_index, do_sample=..., seed=...)`` → an
            :class:`~rlhf_lightning.rollout.experience.Experience` of one response per prompt, with ``scores``,
            ``rm_scores``, ``logprobs`` and ``ref_logprobs`` (N, R) and ``reward_components``.
        kl_estimator: ``k1``, ``k2`` or ``k3``.
        seed, greedy: the sampling's seed; greedy decoding instead of sampling.
        samples_path: the JSON-lines file of the rows (``None``: none).
        step: the training step written in the rows.
        judges: :func:`~rlhf_lightning.evaluation.judges.load_judges`'s.
        baseline: the rows of an earlier evaluation of the same prompts (the ``before`` one), for the paired change.
        score_eos_token_id: as :func:`~rlhf_lightning.evaluation.judges.judge_scores` (the proxy's rule).

    Returns:
        ``(result, rows)``: the metrics (``eval/...`` without suffix) as floats and every prompt's row (prompt,
        response, scores, KL), or ``None`` when there is nothing to evaluate (``num_prompts`` 0 or a datamodule
        without ``sample_batch``).
    """
    datamodule = getattr(module.trainer, "datamodule", None)
    if not num_prompts or datamodule is None or not hasattr(datamodule, "sample_batch"):
        return None
    batch = datamodule.sample_batch(num_prompts)
    total, rank, world = batch["input_ids"].shape[0], module.global_rank, module.trainer.world_size
    own = list(range(rank, total, world))
    rows_of_rank = torch.tensor(own or [0])
    device = module.device
    pick = {key: value[rows_of_rank] for key, value in batch.items() if isinstance(value, torch.Tensor)}
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        exp = collect(pick["input_ids"].to(device), pick["attention_mask"].to(device), pick.get("prompt_index"),
                      do_sample=not greedy, seed=seed)
    _, kl = compute_rewards(exp.scores, exp.logprobs, exp.ref_logprobs, exp.loss_mask, 0.0, kl_estimator)
    rows = sample_rows(module.tokenizer, replace(exp, kl=kl), phase, step, len(own))
    for name, values in judge_scores(judges, exp.rollout, module.tokenizer, datamodule, pick.get("prompt_index"),
                                     score_eos_token_id).items():
        for row, value in zip(rows, values.tolist(), strict=False):  # the dropped stand-in row has none
            row[f"judge/{name}"] = value
    if world > 1:
        gathered = [None] * world
        torch.distributed.all_gather_object(gathered, list(zip(own, rows, strict=True)))
        rows = [row for _, row in sorted((pair for part in gathered for pair in part), key=lambda pair: pair[0])]
    write_rows(module, rows, phase, samples_path)
    result = heldout_metrics(rows, baseline)
    if module.trainer.is_global_zero:
        for logger in module.trainer.loggers:  # self.log is not allowed in on_train_end
            logger.log_metrics(result, step=module.global_step)
            if phase in ("before", "after"):
                logger.log_metrics({f"{key}_{phase}": value for key, value in result.items()}, step=module.global_step)
    parts = ([f"reward model {result['eval/rm_score']:.4f}"] if module.reward_model is not None else []) + \
        [f"{key[len('eval/reward/'):]} {value:.4f}" for key, value in result.items()
         if key.startswith("eval/reward/")] + \
        [f"{judge_label(key[len('eval/judge/'):])} {value:.4f}" for key, value in result.items()
         if key.startswith("eval/judge/") and not key.endswith(_STAT_SUFFIXES)]
    log.info("evaluation %s training (step %d) on %d prompts: score %.4f (%s), KL %.4f nats, %.0f%% ended with EOS",
             phase, step, len(rows), result["eval/score"], ", ".join(parts), result["eval/kl"],
             100 * result["eval/eos_frac"])
    return result, rows


#: Suffixes of the statistics :func:`heldout_metrics` adds to a mean's key.
_STAT_SUFFIXES = ("_ci_low", "_ci_high", "_change", "_change_ci_low", "_change_ci_high")


def heldout_metrics(rows: list[dict], baseline: list[dict] | None = None) -> dict[str, float]:
    """The held-out evaluation's metrics from its rows (:func:`evaluate_policy`): the means of ``score``,
    ``rm_score``, ``kl``, ``ends_with_eos`` (``eval/eos_frac``), ``reward/<name>``, ``agent/<name>`` (multi-turn
    rollouts) and ``judge/<name>`` over the
    prompts; for the score and each judge the bootstrap 95% interval of the mean; with ``baseline`` (rows of the
    same prompts, in the same order) the mean change, paired by prompt, and its interval.

    Raises:
        ValueError: no rows, or a baseline of another length or other prompts.
    """
    if not rows:
        raise ValueError("heldout_metrics: no rows")
    if baseline is not None and [r["prompt"] for r in baseline] != [r["prompt"] for r in rows]:
        raise ValueError("heldout_metrics: the baseline's prompts are not these rows' prompts")
    mean = lambda values: sum(values) / len(values)  # noqa: E731
    result = {"eval/score": mean([r["score"] for r in rows]), "eval/rm_score": mean([r["rm_score"] for r in rows]),
              "eval/kl": mean([r["kl"] for r in rows]),
              "eval/eos_frac": mean([float(r["ends_with_eos"]) for r in rows])}
    extra = [key for key in rows[0] if key.startswith(("reward/", "judge/", "agent/"))]
    result.update({f"eval/{key}": mean([r[key] for r in rows]) for key in extra})
    for key in ["score", *(k for k in extra if k.startswith("judge/"))]:
        values = [float(r[key]) for r in rows]
        result[f"eval/{key}_ci_low"], result[f"eval/{key}_ci_high"] = bootstrap_ci(values)
        if baseline is not None:
            change = [v - float(b[key]) for v, b in zip(values, baseline, strict=True)]
            result[f"eval/{key}_change"] = mean(change)
            result[f"eval/{key}_change_ci_low"], result[f"eval/{key}_change_ci_high"] = bootstrap_ci(change)
    return result


class HeldOutEvaluation(L.Callback):
    """The held-out evaluation's lifecycle, the same for PPO and DPO: before the first step (not again when a run
    resumes), every ``eval.every_n_iterations`` iterations (PPO; optimizer steps for DPO) along training, and after
    the last step, the module's ``evaluate_samples(phase)`` answers and scores the fixed held-out prompts
    (:meth:`evaluate`). The ``before`` rows are kept (and saved in checkpoints, so a resumed run still reports its
    change) as the baseline of the paired changes.

    A module gives it with ``configure_callbacks`` and calls :meth:`evaluate` from its ``evaluate_samples``.

    Args:
        collect: the module's evaluation rollout (:func:`evaluate_policy`'s ``collect``).
        num_prompts, kl_estimator, seed, greedy, samples_path: as :func:`evaluate_policy`'s (the stage's
            ``num_sample_prompts``, ``kl_estimator``, ``eval_seed``, ``eval_greedy`` and samples file).
        every_n_iterations: ``eval.every_n_iterations`` (``None``: before and after only).
        judges: :func:`~rlhf_lightning.evaluation.judges.load_judges`'s.
        score_eos_token_id: as :func:`evaluate_policy`'s.
    """

    def __init__(self, collect: Callable[..., Experience], num_prompts: int, kl_estimator: str, seed: int,
                 greedy: bool, samples_path: str | None, every_n_iterations: int | None = None,
                 judges: Sequence[Judge] = (), score_eos_token_id: int | None = None):
        self.collect, self.num_prompts, self.kl_estimator = collect, num_prompts, kl_estimator
        self.seed, self.greedy, self.samples_path = seed, greedy, samples_path
        self.every_n_iterations, self.judges, self.score_eos_token_id = every_n_iterations, list(judges), \
            score_eos_token_id
        self.baseline: list[dict] | None = None

    @staticmethod
    def step_of(module) -> int:
        """The step the schedule counts: PPO's iterations (``module.iteration``), else the optimizer steps."""
        return int(getattr(module, "iteration", module.global_step))

    def evaluate(self, module, phase: str) -> dict[str, float] | None:
        """One evaluation (:func:`evaluate_policy`); the ``before`` rows become the baseline. Returns the metrics
        (``None``: nothing to evaluate)."""
        baseline = None if phase == "before" else self.baseline
        out = evaluate_policy(module, phase, self.num_prompts, self.collect, self.kl_estimator, self.seed,
                              self.greedy, self.samples_path, self.step_of(module), self.judges, baseline,
                              self.score_eos_token_id)
        if out is None:
            return None
        result, rows = out
        if phase == "before":
            self.baseline = rows
        return result

    def on_train_start(self, trainer, pl_module) -> None:
        if trainer.global_step == 0:  # not again when resuming from a checkpoint
            pl_module.evaluate_samples("before")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        every, step = self.every_n_iterations, self.step_of(pl_module)
        last = trainer.max_steps is not None and trainer.max_steps > 0 and trainer.global_step >= trainer.max_steps
        if every and step and step % every == 0 and not last:  # the last step's is the "after" evaluation
            pl_module.evaluate_samples("during")

    def on_train_end(self, trainer, pl_module) -> None:
        pl_module.evaluate_samples("after")

    def state_dict(self) -> dict:
        return {"baseline": self.baseline}

    def load_state_dict(self, state_dict: dict) -> None:
        self.baseline = state_dict.get("baseline")
