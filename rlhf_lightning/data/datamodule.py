"""What the preference and prompt data modules share: a data source, its subset and split, batching."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning
import torch
from torch.utils.data import DataLoader, Dataset

from rlhf_lightning.data.resumable import resumable_loader


class ListDataset(Dataset):
    """A map-style dataset over a Python list (items are returned as stored)."""

    def __init__(self, items: Sequence[Any]):
        self.items = list(items)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> Any:
        return self.items[index]


def split_indices(n: int, val_size: int | float, seed: int) -> tuple[list[int], list[int]]:
    """Seeded random split of ``range(n)`` into (train, val) index lists, each sorted.

    Args:
        val_size: a count (int >= 0) or a fraction (float in [0, 1)) of ``n``, rounded.

    Raises:
        ValueError: negative or otherwise invalid ``val_size``, or a split that leaves no training row.
    """
    if isinstance(val_size, bool) or not isinstance(val_size, (int, float)):
        raise ValueError(f"val_size must be an int count or a float fraction, got {val_size!r}")
    if isinstance(val_size, float):
        if not 0.0 <= val_size < 1.0:
            raise ValueError(f"a fractional val_size must be in [0, 1), got {val_size}")
        n_val = int(round(n * val_size))
    else:
        if val_size < 0:
            raise ValueError(f"val_size must be >= 0, got {val_size}")
        n_val = val_size
    if n_val >= n:
        raise ValueError(f"val_size={val_size} leaves no training rows out of {n}")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return sorted(order[n_val:]), sorted(order[:n_val])


def seeded_subset(items: list, limit: int | None, seed: int) -> list:
    """``limit`` items picked at random (seeded) from ``items``, in their original order; all when
    ``limit`` is None or >= len(items).

    Raises:
        ValueError: ``limit`` <= 0.
    """
    if limit is None or limit >= len(items):
        return items
    if limit <= 0:
        raise ValueError(f"limit must be positive or None, got {limit}")
    # a different stream from the split's, so that limit and split are not correlated
    picked = torch.randperm(len(items), generator=torch.Generator().manual_seed(seed + 7919))[:limit]
    return [items[i] for i in sorted(picked.tolist())]


def train_part(indices: list[int], part: Sequence[int] | None, seed: int) -> list[int]:
    """Part ``k`` of ``n`` of ``indices`` (``part = (k, n)``, 0 <= k < n): the n parts are disjoint, their union is
    ``indices``, and their sizes differ by at most one (the first ``len(indices) % n`` parts have one more).
    The parts come from a seeded random permutation (a stream of its own, not the split's or the subset's), so
    two runs with the same data, ``limit``, ``val_size`` and ``seed`` but parts 0 and 1 of 2 train on disjoint
    pairs and hold out the same ones (a proxy reward model and its judge). ``None``: all of ``indices``.

    Args:
        indices: the training rows' indices (any order); returned sorted.

    Raises:
        ValueError: ``part`` not two integers with 0 <= k < n, or a part that would be empty (n > len(indices)).
    """
    if part is None:
        return sorted(indices)
    if (len(part) != 2 or any(isinstance(v, bool) or not isinstance(v, int) for v in part)
            or not 0 <= part[0] < part[1]):
        raise ValueError(f"train_part must be [k, n] with integers 0 <= k < n, got {list(part)}")
    k, n = part
    if n > len(indices):
        raise ValueError(f"train_part={list(part)}: {len(indices)} training rows cannot make {n} non-empty parts")
    order = torch.randperm(len(indices), generator=torch.Generator().manual_seed(seed + 104729)).tolist()
    return sorted(indices[j] for j in order[k::n])


class SourceDataModule(lightning.LightningDataModule):
    """Base of :class:`~rlhf_lightning.data.PreferenceDataModule` and :class:`~rlhf_lightning.data.PromptDataModule`.

    Holds the source (``path``, ``split``, ``data_dir``; see ``sources.read_rows``), the subset and the
    held-out size (``limit``, ``val_size``), batching (``batch_size``, ``num_workers``, ``collator``), the
    seed of all three, and the bad-row policy (``on_error``). Subclasses fill ``train_dataset``,
    ``val_dataset`` and ``stats`` in ``setup`` and build loaders with :meth:`_loader`.

    Raises:
        ValueError: ``on_error`` not ``raise``/``skip``; a tokenizer without a pad token.
    """

    def __init__(self, tokenizer, path: str, split: str, data_dir: str | None, val_size: int | float,
                 limit: int | None, batch_size: int, num_workers: int, seed: int, on_error: str, collator):
        super().__init__()
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        if tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer has no pad token")
        self.tokenizer = tokenizer
        self.path = str(path)
        self.split = split
        self.data_dir = data_dir
        self.val_size = val_size
        self.limit = limit
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.on_error = on_error
        self.collator = collator
        self.train_dataset = None
        self.val_dataset = None
        self.stats: dict = {}

    def setup(self, stage: str | None = None) -> None:
        """Read, encode and split the data once (:meth:`build`); later calls return at once."""
        if self.train_dataset is None:
            self.build()

    def build(self) -> None:
        """Fill ``train_dataset``, ``val_dataset`` and ``stats`` (the subclass's reading and encoding)."""
        raise NotImplementedError

    def read(self, load, split: str | None = None) -> tuple[int, list, object]:
        """Read the source's ``split`` (default: ``self.split``) with ``load`` (``load_examples`` or
        ``load_prompt_rows``) and keep the seeded ``limit`` subset
        (:func:`~rlhf_lightning.data.datamodule.seeded_subset`; ``split`` given: all of it).

        Returns:
            ``(rows read, kept items, skipped reason counts)``.
        """
        items, skipped = load(self.path, split=split or self.split, data_dir=self.data_dir, on_error=self.on_error)
        return len(items), (items if split else seeded_subset(items, self.limit, self.seed)), skipped

    def _loader(self, dataset, batch_size: int, shuffle: bool, drop_last: bool = False) -> DataLoader:
        """A resumable loader over ``dataset`` (:func:`~rlhf_lightning.data.resumable.resumable_loader`), seeded
        by ``seed`` (and the epoch).

        Raises:
            RuntimeError: ``setup`` has not run.
        """
        if dataset is None:
            raise RuntimeError("call setup() before asking for a dataloader")
        return resumable_loader(dataset, batch_size, shuffle, self.seed, self.collator, self.num_workers,
                                drop_last=drop_last, trainer=self.trainer)
