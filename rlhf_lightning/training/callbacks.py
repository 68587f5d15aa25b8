"""Lightning callbacks of the framework."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback, TQDMProgressBar

log = logging.getLogger(__name__)


class IterationProgressBar(TQDMProgressBar):
    """TQDM progress bar whose training total counts PPO iterations, not optimizer steps.

    Under manual optimization Lightning's ``global_step`` (and so ``max_steps``) counts every
    optimizer step; PPO takes 2 × ppo_epochs × num_minibatches of them per batch (1 × ... with
    ``ppo.joint_optimizer``). A module that exposes ``optimizer_steps_per_iteration`` gets a bar over
    batches; others behave as :class:`~lightning.pytorch.callbacks.TQDMProgressBar`.
    """

    @property
    def total_train_batches(self) -> int | float:
        per_batch = getattr(self.trainer.lightning_module, "optimizer_steps_per_iteration", 1)
        trainer = self.trainer
        if per_batch > 1 and trainer.max_epochs == -1 and trainer.max_steps is not None and trainer.max_steps > 0:
            remaining = math.ceil((trainer.max_steps - trainer.global_step) / per_batch)
            return min(trainer.num_training_batches, remaining)
        return super().total_train_batches


# --------------------------------------------------------------------------- checkpoint schedule


def timed_checkpoint(every_n_minutes: float | None, **kwargs):
    """A ``ModelCheckpoint`` saving every ``every_n_minutes`` minutes of training (``train_time_interval``),
    or ``None`` when ``every_n_minutes`` is null (``instantiate_group`` drops it).

    Lightning's ``ModelCheckpoint`` takes a step schedule or a time schedule, not both: the
    ``callbacks=default`` preset has one of each, both keeping ``last.ckpt``. ``kwargs`` go to
    ``ModelCheckpoint`` (``dirpath``, ``save_last``, ...).

    Raises:
        ValueError: ``every_n_minutes`` <= 0.
    """
    if every_n_minutes is None:
        return None
    if every_n_minutes <= 0:
        raise ValueError(f"checkpoint.every_n_minutes={every_n_minutes} must be > 0 (or null: off)")
    from datetime import timedelta

    from lightning.pytorch.callbacks import ModelCheckpoint

    return ModelCheckpoint(train_time_interval=timedelta(minutes=every_n_minutes), **kwargs)


# --------------------------------------------------------------------------- RNG state


def collect_rng_states() -> dict:
    """Every global RNG state: ``python`` (``random.getstate()``), ``numpy`` (legacy global generator,
    as ``{"key", "state" (624,) int64 tensor, "pos", "has_gauss", "cached_gaussian"}``), ``torch``
    (CPU ByteTensor; sampling in ``generate`` on CPU draws from it) and ``torch.cuda`` (one ByteTensor
    per visible GPU, when CUDA is initialised). Only tensors, numbers, strings and tuples, so a
    checkpoint holding it loads with ``torch.load(weights_only=True)``."""
    import random

    import numpy as np

    key, state, pos, has_gauss, cached = np.random.get_state()
    states = {
        "python": random.getstate(),
        "numpy": {"key": key, "state": torch.from_numpy(state.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["torch.cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict) -> None:
    """Restore what :func:`collect_rng_states` returned (CUDA states only when the GPU count matches)."""
    import random

    import numpy as np

    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    n = states["numpy"]
    np.random.set_state((n["key"], n["state"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(states["torch"])
    cuda = states.get("torch.cuda")
    if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


class RNGStateCallback(Callback):
    """Puts every RNG state in checkpoints and restores it on resume.

    The state is taken when a checkpoint is written (``state_dict``; ``ModelCheckpoint`` writes after
    a training batch) and set again just before the first training batch after loading, so whatever
    runs between loading and that batch (setup, the loader's ``iter()``, greedy "before" samples) does
    not shift the stream: training batch k+1 of a resumed run draws the same numbers (sampling,
    minibatch permutations, dropout) as in an uninterrupted run. Added to every run by
    :func:`rlhf_lightning.training.run.run`.
    """

    def __init__(self):
        self._pending: dict | None = None

    def state_dict(self) -> dict:
        return collect_rng_states()

    def load_state_dict(self, state_dict: dict) -> None:
        self._pending = state_dict

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._pending is not None:
            set_rng_states(self._pending)
            self._pending = None


# --------------------------------------------------------------------------- non-finite steps


class TrainingDiverged(RuntimeError):
    """Too many consecutive optimizer steps had a non-finite loss or gradient; training stopped."""


class NonFiniteGuard(Callback):
    """Keeps NaN/inf losses and gradients away from the weights; stops a run that keeps producing them.

    For every backward (``on_before_backward`` sees the loss) the first ``on_before_optimizer_step``
    after it checks the loss and the gradients of every parameter of every optimizer
    (``trainer.optimizers``). If anything is NaN or ±inf, every gradient is set to ``None`` before the
    optimizers run: torch optimizers skip parameters without a gradient, so the weights and the
    optimizer state (Adam moments, step count) are untouched — unlike zeroed gradients, with which Adam
    still moves the weights. This holds for automatic optimization (reward, value; the hook runs inside
    ``optimizer.step`` after the closure) and for PPO's manual loop, where both optimizers step after
    one backward: the check runs at the first ``opt.step()`` and the policy and the critic are skipped
    together. Lightning still counts the step in ``global_step`` and steps the LR schedulers. Under
    fp16 mixed precision only the loss is checked (the GradScaler already skips overflowing gradients).

    With more than one process (DDP, FSDP, DeepSpeed) the decision is taken together (:func:`any_rank`: one
    all-reduce of a 0/1 flag with MAX per check): when any rank has a non-finite loss or gradient, every rank
    skips, so the ranks keep the same weights, optimizer states and counts. (DDP averages gradients, so a
    non-finite gradient reaches every rank anyway; a non-finite loss with finite gradients, or a rank's own
    unsynchronised parameters, would not.)

    Logs ``train/skipped_steps`` (total skipped updates, one per backward) after every batch. After
    ``max_consecutive_bad_steps`` bad updates in a row, the remaining updates of that batch are skipped
    too, ``<checkpoint dir>/nonfinite-stop.ckpt`` is written at the end of the batch (its weights and
    optimizer states are those of the last good update: no bad update reached them) and
    :class:`TrainingDiverged` is raised; ``train.py`` prints its message and exits with status 1.

    Args:
        max_consecutive_bad_steps: bad updates in a row that stop the run (``None`` or 0: never stop).

    State (in checkpoints): ``skipped`` and ``consecutive`` counts.
    """

    STOP_CHECKPOINT = "nonfinite-stop.ckpt"

    def __init__(self, max_consecutive_bad_steps: int | None = 5):
        if max_consecutive_bad_steps is not None and max_consecutive_bad_steps < 0:
            raise ValueError(f"max_consecutive_bad_steps={max_consecutive_bad_steps} must be >= 0 (0/null: never stop)")
        self.max_consecutive_bad_steps = max_consecutive_bad_steps or None
        self.skipped = 0
        self.consecutive = 0
        self._loss_finite = True
        self._checked = False
        self._stop: str | None = None

    def state_dict(self) -> dict:
        return {"skipped": self.skipped, "consecutive": self.consecutive}

    def load_state_dict(self, state_dict: dict) -> None:
        self.skipped, self.consecutive = int(state_dict["skipped"]), int(state_dict["consecutive"])

    def on_before_backward(self, trainer, pl_module, loss: torch.Tensor) -> None:
        self._loss_finite = bool(torch.isfinite(loss.detach()).all())
        self._checked = False

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        params = [p for opt in trainer.optimizers for group in opt.param_groups for p in group["params"]]
        if self._stop is not None:  # stopping: nothing more reaches the weights
            _drop_grads(params)
            return
        if self._checked:  # a later optimizer of the same backward (PPO's critic): already decided
            return
        self._checked = True
        # Under fp16 AMP the GradScaler skips overflowing steps itself (and they are routine while it
        # calibrates its scale): only the loss is checked then.
        scaled = getattr(trainer.precision_plugin, "scaler", None) is not None
        grads = [] if scaled else [_local(p.grad) for p in params if p.grad is not None]
        finite = [torch.isfinite(g).all().to(grads[0].device) for g in grads]
        grads_finite = not grads or bool(torch.stack(finite).all())  # one device sync
        bad_here = not (self._loss_finite and grads_finite)
        if not any_rank(trainer, bad_here):
            self.consecutive = 0
            return
        _drop_grads(params)
        self.skipped += 1
        self.consecutive += 1
        what = "another rank's loss or gradient" if not bad_here else "loss" if not self._loss_finite else "gradient"
        log.warning("non-finite %s at global step %d: optimizer step skipped (%d in a row, %d in all)",
                    what, trainer.global_step, self.consecutive, self.skipped)
        limit = self.max_consecutive_bad_steps
        if limit is not None and self.consecutive >= limit:
            self._stop = (f"{self.consecutive} consecutive optimizer steps had a non-finite loss or gradient "
                          f"(max_consecutive_bad_steps={limit}, last at global step {trainer.global_step}); "
                          "no bad step reached the weights")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        pl_module.log("train/skipped_steps", float(self.skipped), on_step=True, on_epoch=False)
        if self._stop is None:
            return
        callback = trainer.checkpoint_callback
        directory = Path(callback.dirpath) if callback is not None and callback.dirpath else \
            Path(trainer.default_root_dir) / "checkpoints"
        path = directory / self.STOP_CHECKPOINT
        self.consecutive = 0  # a run resumed from it gets the full allowance again
        trainer.save_checkpoint(path)
        raise TrainingDiverged(f"{self._stop}. The last good state is saved in {path}; lower the learning rate "
                               f"or fix the data, then resume with ckpt_path={path}")


def any_rank(trainer, flag: bool) -> bool:
    """``flag`` or-ed over all processes of ``trainer``: an all-reduce (MAX) of a 0/1 tensor on the
    strategy's root device through ``trainer.strategy.reduce``; just ``flag`` when ``trainer.world_size``
    is 1 (no communication). Every process must call it at the same point (a collective)."""
    if trainer.world_size <= 1:
        return flag
    strategy = trainer.strategy
    value = torch.tensor(float(flag), device=strategy.root_device)
    return bool(strategy.reduce(value, reduce_op="max") > 0)


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of a sharded (``DTensor``) gradient under FSDP2, else the tensor itself: each rank checks
    its own shard, and :func:`any_rank` combines the answers."""
    to_local = getattr(tensor, "to_local", None)
    return to_local() if to_local is not None else tensor


def _drop_grads(params: list[torch.Tensor]) -> None:
    for p in params:
        p.grad = None
