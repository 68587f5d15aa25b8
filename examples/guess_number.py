"""A number-guessing game as a multi-turn environment, written against rlhf-lightning's documented interface
(``rlhf_lightning.rollout.agent.Environment``: Gym/OpenEnv-style ``reset`` and ``step``) outside the package, and
trained by config alone::

    python train.py stage=ppo algorithm=grpo reward_model_path=null \\
        ppo.agent.environment_factory=examples.guess_number.GuessNumber ppo.agent.max_turns=4 \\
        ppo.agent.observation_role=user

The secret is the row's ``answer`` column when it has one, else a number drawn from the prompt's text (the same for
every answer to that prompt). Each guess is told "higher" or "lower"; a right guess ends the episode with reward 1,
less for each guess it took.
"""

from __future__ import annotations

import re
import zlib


class GuessNumber:
    """Guess a number from 1 to ``high`` in at most the episode's turns.

    Args:
        high: the largest secret.
        step_penalty: subtracted from the reward of a right guess for each guess before it.
    """

    #: the error kinds ``step`` reports in ``info["errors"]`` (counted as ``agent/errors/<kind>``)
    error_kinds = ("no_number",)

    def __init__(self, high: int = 20, step_penalty: float = 0.1):
        self.high, self.step_penalty = high, step_penalty
        self.secret, self.guesses = 1, 0

    def reset(self, row: dict) -> str:
        """The game's rules as the first user message; the secret from the row."""
        answer = row.get("answer")
        text = str(row.get("prompt"))
        self.secret = int(answer) if answer is not None else zlib.crc32(text.encode()) % self.high + 1
        self.guesses = 0
        return (f"I am thinking of a number from 1 to {self.high}. Guess it: reply with one number, and I will say "
                "higher or lower.")

    def step(self, action: str):
        """Read the guess (the action's first number): ``(observation, reward, done, info)``."""
        self.guesses += 1
        found = re.search(r"-?\d+", action)
        if found is None:
            return "Reply with a number.", 0.0, False, {"errors": ["no_number"]}
        guess = int(found.group())
        if guess == self.secret:
            return "Right!", max(0.0, 1.0 - self.step_penalty * (self.guesses - 1)), True, {}
        return ("Higher." if guess < self.secret else "Lower."), 0.0, False, {}
