"""Environments and tools of the multi-turn tests (``tests/test_agent.py``), written against the documented interface
(:class:`rlhf_lightning.rollout.agent.Environment`) in a file outside the package, and found by their dotted paths
(``agent_envs.TargetTokens``) as a user's would be."""

from __future__ import annotations

import time

#: Token ids the :class:`TargetTokens` reward counts (set by the test that trains with it).
TARGET_IDS: set[int] = set()
#: The tokenizer :class:`TargetTokens` reads the actions with (set by the test).
TOKENIZER = None


class TargetTokens:
    """Two turns; each step's reward is the share of the action's tokens (the turn's text encoded again, so an
    approximation of the sampled tokens, which is all a text environment sees) that are in :data:`TARGET_IDS`. The
    observation after the first turn asks for another one."""

    error_kinds = ("empty_action",)

    def __init__(self, turns: int = 2):
        self.turns, self.taken = turns, 0

    def reset(self, row: dict) -> None:
        return None

    def step(self, action: str):
        self.taken += 1
        ids = TOKENIZER(action, add_special_tokens=False)["input_ids"] if action else []
        reward = sum(i in TARGET_IDS for i in ids) / max(1, len(ids))
        info = {"errors": ["empty_action"] if not ids else []}
        if self.taken >= self.turns:
            return None, reward, True, info
        return "Again.", reward, False, info


class Scripted:
    """Answers each action with a fixed observation and ends after ``turns`` steps, reward 1 at the end."""

    def __init__(self, turns: int = 2, observation: str = "ok, go on"):
        self.turns, self.taken, self.observation = turns, 0, observation

    def reset(self, row: dict) -> None:
        return None

    def step(self, action: str):
        self.taken += 1
        return self.observation, float(self.taken >= self.turns), self.taken >= self.turns


class Broken:
    """A step that raises (an environment bug: the run stops with one line)."""

    def reset(self, row: dict) -> None:
        return None

    def step(self, action: str):
        raise KeyError("no such state")


def add(a: int, b: int) -> int:
    """Add two integers.

    Args:
        a: the first integer.
        b: the second integer.
    """
    return a + b


def divide(a: float, b: float) -> float:
    """Divide a by b.

    Args:
        a: the dividend.
        b: the divisor.
    """
    return a / b


def sleepy(seconds: float) -> str:
    """Sleep, then say so.

    Args:
        seconds: how long to sleep.
    """
    time.sleep(seconds)
    return "awake"


def with_eos_bias(model, eos_token_id: int, bias: float):
    """``model`` with ``bias`` added to its EOS logit (its output head replaced by one with a frozen bias, the
    weight still tied): the tiny random model then ends its turns, as a trained one does."""
    import torch
    from torch import nn

    head = model.get_output_embeddings()
    biased = nn.Linear(head.in_features, head.out_features, bias=True, dtype=head.weight.dtype)
    biased.weight = head.weight
    with torch.no_grad():
        biased.bias.zero_()
        biased.bias[eos_token_id] = bias
    biased.bias.requires_grad_(False)
    model.set_output_embeddings(biased)
    return model
