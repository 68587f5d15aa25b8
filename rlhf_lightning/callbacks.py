"""Lightning callbacks of the framework."""

from __future__ import annotations

import math

from lightning.pytorch.callbacks import TQDMProgressBar


class IterationProgressBar(TQDMProgressBar):
    """TQDM progress bar whose training total counts PPO iterations, not optimizer steps.

    Under manual optimization Lightning's ``global_step`` (and so ``max_steps``) counts every
    optimizer step; PPO takes 2 × ppo_epochs × num_minibatches of them per batch. A module that
    exposes ``optimizer_steps_per_iteration`` gets a bar over batches; others behave as
    :class:`~lightning.pytorch.callbacks.TQDMProgressBar`.
    """

    @property
    def total_train_batches(self) -> int | float:
        per_batch = getattr(self.trainer.lightning_module, "optimizer_steps_per_iteration", 1)
        trainer = self.trainer
        if per_batch > 1 and trainer.max_epochs == -1 and trainer.max_steps is not None and trainer.max_steps > 0:
            remaining = math.ceil((trainer.max_steps - trainer.global_step) / per_batch)
            return min(trainer.num_training_batches, remaining)
        return super().total_train_batches
