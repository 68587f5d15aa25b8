"""The before/after evaluation that PPO and DPO share: the same held-out prompts, answered with the same seed
before the first and after the last training step, scored by the reward model, with the KL to the reference.

The two points of a run (``eval/score_before``, ``eval/score_after`` against ``eval/kl_after``) place it on the
score-vs-KL frontier that :mod:`rlhf_lightning.evaluation.report` draws, whichever stage trained the policy.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch

from rlhf_lightning.algorithms.kl import compute_rewards
from rlhf_lightning.rollout.experience import Experience

log = logging.getLogger(__name__)

#: Columns of the rows :func:`write_samples` writes.
SAMPLE_COLUMNS = ("phase", "step", "prompt", "response", "score", "rm_score", "ends_with_eos", "kl")


def sample_rows(tokenizer, exp: Experience, phase: str, step: int, limit: int) -> list[dict]:
    """The first ``limit`` rows of ``exp`` (its ``kl`` (N, R) set) decoded into dicts of :data:`SAMPLE_COLUMNS`,
    with each reward function's unweighted reward as ``reward/<name>`` (when there are any)."""
    ro = exp.rollout
    n = min(limit, exp.batch_size)
    prompts = tokenizer.batch_decode(ro.input_ids[:n, : ro.response_start], skip_special_tokens=True)
    responses = tokenizer.batch_decode(ro.response_ids[:n], skip_special_tokens=True)
    kl_seq = (exp.kl * ro.response_mask).sum(1)
    return [{"phase": phase, "step": step, "prompt": p, "response": r,
             "score": float(exp.scores[i]), "rm_score": float(exp.rm_scores[i]),
             "ends_with_eos": bool(ro.ends_with_eos[i]), "kl": float(kl_seq[i]),
             **{f"reward/{name}": float(values[i]) for name, values in exp.reward_components.items()}}
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
                    seed: int, greedy: bool, samples_path: str | None, step: int) -> dict[str, float] | None:
    """Answer the fixed evaluation prompts, score them, and record the result under ``phase``.

    The prompts are the datamodule's ``sample_batch(num_prompts)`` (the first held-out prompts), split between
    the ranks (rank r answers prompts r, r + W, ...; a rank left without one answers the first again, since
    decoding runs in lock-step, and that row is dropped); the rows of every rank are gathered, so every rank
    returns the same result, the one a single process gives. Each response's sampling noise is keyed by
    ``seed`` and its prompt's dataset index (``collect(..., seed=seed)``), and the sampling runs in a forked RNG
    seeded with ``seed`` (for samplers that draw from torch's generator): the calls before and after training
    see the same random numbers and the training's RNG stream is not advanced. Rows go to ``samples_path``
    (:func:`write_rows`); the means ``eval/score`` (reward-model units, missing-EOS penalty included),
    ``eval/rm_score`` (without it), ``eval/kl`` (nats per response, ``kl_estimator``:
    :func:`~rlhf_lightning.algorithms.kl.kl_penalty` summed over the response's tokens) and ``eval/eos_frac`` go to
    every
    logger, suffixed ``_<phase>``, at the current step; with reward functions, each one's mean too
    (``eval/reward/<name>``).

    Args:
        module: the LightningModule (its ``trainer``, ``device``, ``tokenizer``, ``reward_model``).
        phase: ``before`` or ``after`` (the suffix of the metrics, the ``phase`` of the rows).
        num_prompts: how many prompts (0: no evaluation).
        collect: ``collect(input_ids, attention_mask, prompt_index, do_sample=..., seed=...)`` → an
            :class:`~rlhf_lightning.rollout.experience.Experience` of one response per prompt, with ``scores``,
            ``rm_scores``, ``logprobs`` and ``ref_logprobs`` (N, R) and ``reward_components``.
        kl_estimator: ``k1``, ``k2`` or ``k3``.
        seed, greedy: the sampling's seed; greedy decoding instead of sampling.
        samples_path: the JSON-lines file of the rows (``None``: none).
        step: the training step written in the rows.

    Returns:
        ``{"eval/score", "eval/rm_score", "eval/kl", "eval/eos_frac", ...}`` as floats, or ``None`` when there
        is nothing to evaluate (``num_prompts`` 0 or a datamodule without ``sample_batch``).
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
    _, kl = compute_rewards(exp.scores, exp.logprobs, exp.ref_logprobs, exp.response_mask, 0.0, kl_estimator)
    rows = sample_rows(module.tokenizer, replace(exp, kl=kl), phase, step, len(own))
    if world > 1:
        gathered = [None] * world
        torch.distributed.all_gather_object(gathered, list(zip(own, rows, strict=True)))
        rows = [row for _, row in sorted((pair for part in gathered for pair in part), key=lambda pair: pair[0])]
    write_rows(module, rows, phase, samples_path)
    mean = lambda key: sum(float(row[key]) for row in rows) / len(rows)  # noqa: E731
    result = {"eval/score": mean("score"), "eval/rm_score": mean("rm_score"), "eval/kl": mean("kl"),
              "eval/eos_frac": mean("ends_with_eos")}
    result.update({f"eval/{name}": mean(name) for name in rows[0] if name.startswith("reward/")})
    if module.trainer.is_global_zero:
        for logger in module.trainer.loggers:  # self.log is not allowed in on_train_end
            logger.log_metrics({f"{key}_{phase}": value for key, value in result.items()}, step=module.global_step)
    parts = ([f"reward model {result['eval/rm_score']:.4f}"] if module.reward_model is not None else []) + \
        [f"{key[len('eval/reward/'):]} {value:.4f}" for key, value in result.items() if key.startswith("eval/reward/")]
    log.info("evaluation %s training on %d prompts: score %.4f (%s), KL %.4f nats, %.0f%% ended with EOS", phase,
             len(rows), result["eval/score"], ", ".join(parts), result["eval/kl"], 100 * result["eval/eos_frac"])
    return result
