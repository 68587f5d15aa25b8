"""Training loaders that resume mid-epoch at the exact batch (Lightning's stateful-dataloader protocol).

Lightning 2.6 saves ``loader.state_dict()`` in every checkpoint (``loops.fit_loop.state_dict.combined_loader``)
and calls ``loader.load_state_dict(...)`` on resume, for any training DataLoader that has both methods; a
plain ``DataLoader`` restarts its epoch from the first batch. It also calls ``sampler.set_epoch(epoch)``
at the start of every epoch, as it does for ``DistributedSampler``.

:func:`resumable_loader` combines the two: the order of an epoch is a function of ``(seed, epoch)``
only (torch's ``DistributedSampler``: ``randperm`` with a generator seeded ``seed + epoch``), and
:class:`ResumableDataLoader` records how many batches of the current epoch it has handed out, so a
resumed run skips exactly those. Sized loaders are not prefetched by Lightning's training loop, so the
count at checkpoint time equals the batches trained on.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler


class ResumableDataLoader(DataLoader):
    """A ``DataLoader`` with ``state_dict``/``load_state_dict``: the epoch and the batches yielded in it.

    State (plain ints, loadable with ``torch.load(weights_only=True)``):
    ``{"epoch": sampler epoch or 0, "batches": batches of that epoch already yielded}``.

    After :meth:`load_state_dict`, the next iteration over the same epoch skips that many batches
    (they are drawn from the sampler and collated, then dropped); an iteration over another epoch
    starts at its first batch. Takes every ``DataLoader`` argument.
    """

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._batches = 0
        self._resume: tuple[int, int] | None = None

    def _epoch(self) -> int:
        return int(getattr(self.sampler, "epoch", 0))

    def __iter__(self) -> Iterator[Any]:
        return self._iterate()

    def _iterate(self) -> Iterator[Any]:
        # Runs at the first next(), after Lightning's set_epoch (it calls iter() before the epoch starts).
        resume, self._resume = self._resume, None
        skip = resume[1] if resume is not None and resume[0] == self._epoch() else 0
        self._batches = 0
        for batch in super().__iter__():
            self._batches += 1
            if self._batches > skip:
                yield batch

    def state_dict(self) -> dict[str, int]:
        """``{"epoch": int, "batches": int}``: where the current epoch stands."""
        return {"epoch": self._epoch(), "batches": self._batches}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Resume at batch ``state["batches"]`` of epoch ``state["epoch"]`` on the next iteration."""
        self._batches = int(state["batches"])
        self._resume = (int(state["epoch"]), int(state["batches"]))


def resumable_loader(dataset: Dataset, batch_size: int, shuffle: bool, seed: int, collate_fn,
                     num_workers: int = 0, drop_last: bool = False, trainer=None) -> DataLoader:
    """The DataLoader of a data module.

    Training (``shuffle=True``): a :class:`ResumableDataLoader` over a ``DistributedSampler`` that
    shuffles with ``seed + epoch`` (over ``trainer.world_size`` replicas at rank ``trainer.global_rank``
    when a trainer is given, else one), so Lightning keeps it and sets its epoch. The sampler drops the
    permutation's tail that does not divide among the replicas (``drop_last``) instead of repeating its
    first rows: rank r's i-th batch of b rows is then rows ``r, r + W, ...`` of the i-th slice of ``W b``
    rows of the epoch's permutation, so the ranks' i-th batches together are exactly the i-th batch of
    one process with batch size ``W b`` (the same prompts whatever the world size), and no row is seen twice
    in an epoch. Evaluation: a plain ``DataLoader`` in dataset order. Returns batches of ``collate_fn``
    (see the collators).
    """
    common = dict(batch_size=batch_size, collate_fn=collate_fn, num_workers=num_workers,
                  persistent_workers=num_workers > 0, drop_last=drop_last)
    if not shuffle:
        return DataLoader(dataset, shuffle=False, **common)
    replicas, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
    sampler = DistributedSampler(dataset, num_replicas=replicas, rank=rank, shuffle=True, seed=seed, drop_last=True)
    # Own generator for the iterator's base seed, so no epoch start draws from torch's global RNG.
    return ResumableDataLoader(dataset, sampler=sampler, generator=torch.Generator().manual_seed(seed), **common)
