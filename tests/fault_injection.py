"""Test-only fault injection for train.py subprocesses (added with ``+callbacks.kill=...`` overrides)."""

from __future__ import annotations

import os
import signal

from lightning.pytorch.callbacks import Callback


class KillAtStep(Callback):
    """SIGKILL this process at the start of the first training batch with ``global_step >= step``.

    With checkpoints every step (every iteration for PPO), ``last.ckpt`` then holds step ``step``:
    the process dies as a preempted job would, without any shutdown code running.
    """

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step >= self.step:
            os.kill(os.getpid(), signal.SIGKILL)
