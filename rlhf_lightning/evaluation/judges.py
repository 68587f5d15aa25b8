"""Judges: scorers of the held-out evaluation's responses that training never sees (``eval.judges``).

PPO optimises a proxy, the reward model it is given; a rising proxy score says the policy found what the proxy
rewards, not that it got better. A judge is a second opinion the policy cannot have learned to please: a reward
model trained on other preference pairs, or a reward function, applied to the fixed held-out responses only
(:class:`~rlhf_lightning.evaluation.heldout.HeldOutEvaluation`). Plotted against the KL to the reference, the proxy
keeps rising while the judge first rises, then falls: the overoptimization curve of Gao et al. 2022, "Scaling Laws
for Reward Model Overoptimization" (their gold reward model is the judge).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from rlhf_lightning.config.schema import EvalConfig, as_config
from rlhf_lightning.rewards.functions import RewardFunction, load_reward_functions
from rlhf_lightning.rollout.experience import function_rewards, make_experience
from rlhf_lightning.rollout.sampler import Rollout


@dataclass(frozen=True)
class Judge:
    """One judge: a frozen reward model (``model``) or a reward function (``function``), and its name.

    Attributes:
        name: the key of its scores (``eval/judge/<name>``).
        model: ``AutoModelForSequenceClassification`` with one label, frozen (``None`` for a function).
        function: a :class:`~rlhf_lightning.rewards.functions.RewardFunction` (``None`` for a model).
        source: where it came from (the path, or the function's dotted path).
    """

    name: str
    model: nn.Module | None = None
    function: RewardFunction | None = None
    source: str = ""


def judge_name(spec: Mapping) -> str:
    """A judge's name: its ``name``, else for a reward model the run directory of ``<run dir>/model`` (the folder
    above ``model``, or the folder itself), else the function's last dotted part."""
    if spec.get("name"):
        return str(spec["name"])
    if spec.get("path") is not None:
        path = Path(str(spec["path"]))
        return path.parent.name if path.name == "model" and path.parent.name else path.name
    fn = spec["fn"]
    return str(fn).rsplit(".", 1)[-1] if isinstance(fn, str) else getattr(fn, "__name__", "judge")


def load_judges(config: EvalConfig | Mapping | None, trust_remote_code: bool = False) -> list[Judge]:
    """Load the judges of ``eval.judges``: reward models with
    :func:`~rlhf_lightning.models.load_scalar_model` (frozen, their head kept), reward functions with
    :func:`~rlhf_lightning.rewards.functions.load_reward_functions` (``kwargs`` bound, weight 1).

    Args:
        config: an :class:`~rlhf_lightning.config.schema.EvalConfig` or its mapping (``None``: no judges).
        trust_remote_code: for the reward models' configs.

    Returns:
        One :class:`Judge` per entry, in order.

    Raises:
        ValueError: two judges with one name (the message names it); an entry
            :class:`~rlhf_lightning.config.schema.EvalConfig` refuses.
        FileNotFoundError: a reward model's directory that does not exist.
        RewardSpecError: a reward function that cannot be imported.
    """
    from rlhf_lightning.models import load_scalar_model

    specs = as_config(EvalConfig, config, "eval").judges
    judges, seen = [], set()
    for i, spec in enumerate(specs):
        name = judge_name(spec)
        if name in seen:
            raise ValueError(f"eval.judges[{i}]: a second judge named {name!r} (set name: to tell them apart)")
        seen.add(name)
        if spec.get("path") is not None:
            path = str(spec["path"])
            if not Path(path).exists():
                raise FileNotFoundError(f"eval.judges[{i}].path={path}: no such reward model directory")
            model = load_scalar_model(path, frozen=True, trust_remote_code=trust_remote_code)
            judges.append(Judge(name, model=model, source=path))
        else:
            function = load_reward_functions([{"fn": spec["fn"], "kwargs": dict(spec.get("kwargs") or {}),
                                               "name": name}])[0]
            judges.append(Judge(name, function=function, source=function.source))
    return judges


def judge_scores(judges: Sequence[Judge], rollout: Rollout, tokenizer, datamodule=None,
                 prompt_index: torch.Tensor | None = None, score_eos_token_id: int | None = None
                 ) -> dict[str, torch.Tensor]:
    """Every judge's score of every response: a reward model's read as the proxy's is (at the response's last
    token, or at an EOS appended to a response cut without one: ``score_eos_token_id``,
    :func:`~rlhf_lightning.rollout.experience.make_experience`); a function's on the decoded responses with the
    dataset's columns (:func:`~rlhf_lightning.rollout.experience.function_rewards`). A reward model is moved to the
    rollout's device on its first use.

    Args:
        judges: from :func:`load_judges`.
        rollout: the evaluation's responses (N rows).
        tokenizer, datamodule, prompt_index: as :func:`~rlhf_lightning.rollout.experience.function_rewards`.
        score_eos_token_id: the tokenizer's EOS id when the proxy scores cut responses at an appended EOS
            (``generation.score_with_eos``), else ``None``.

    Returns:
        name → (N,) float32 scores on the rollout's device.

    Raises:
        RewardFunctionError: a function judge raised or returned a bad value (one line naming it and the row).
    """
    device = rollout.input_ids.device
    scores = {}
    for judge in judges:
        if judge.model is not None:
            judge.model.to(device)
            scores[judge.name] = make_experience(rollout, judge.model, score_eos_token_id=score_eos_token_id
                                                 ).rm_scores.float()
        else:
            scores[judge.name] = function_rewards([judge.function], rollout, tokenizer, datamodule,
                                                  prompt_index)[1][judge.name]
    return scores
