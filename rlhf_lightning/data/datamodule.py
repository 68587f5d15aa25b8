"""What the preference and prompt data modules share: a data source, its subset and split, batching."""

from __future__ import annotations

import lightning
from torch.utils.data import DataLoader

from rlhf_lightning.data.resumable import resumable_loader


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
        (:func:`~rlhf_lightning.data.preference.seeded_subset`; ``split`` given: all of it).

        Returns:
            ``(rows read, kept items, skipped reason counts)``.
        """
        from rlhf_lightning.data.preference import seeded_subset

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
