"""Prompts for generation (PPO rollouts) as a LightningDataModule."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence

import torch
from torch.utils.data import DataLoader

from rlhf_lightning.algorithms.ops import row_seed
from rlhf_lightning.data.datamodule import ListDataset, SourceDataModule, split_indices
from rlhf_lightning.data.sources import load_prompt_rows
from rlhf_lightning.data.tokenization import PaddingCollator, encode_prompt

logger = logging.getLogger("rlhf_lightning.data")


class PromptCollator(PaddingCollator):
    """Batch encoded prompts for generation.

    Each item is a dict with ``input_ids`` (list of int) and ``prompt_index`` (int). For B items::

        input_ids       (B, P) long  LEFT-padded with pad_token_id (every prompt ends at column P-1,
                                     so generated tokens follow directly)
        attention_mask  (B, P) long  1 on real tokens, 0 on padding
        prompt_index    (B,)   long  index of each prompt in ``PromptDataModule.prompts``

    P is the longest prompt of the batch.

    Raises:
        ValueError: ``pad_token_id`` is None; an empty batch.
    """

    def __call__(self, items: Sequence[dict]) -> dict[str, torch.Tensor]:
        input_ids, attention_mask = self.pad([it["input_ids"] for it in items], side="left")
        prompt_index = torch.tensor([it["prompt_index"] for it in items], dtype=torch.long)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "prompt_index": prompt_index}


class PromptDataModule(SourceDataModule):
    """Prompts from a file, directory or Hub dataset (see ``sources.read_rows`` / ``extract_prompt``),
    encoded with ``encode_prompt`` (chat template with generation prompt) and split into train/validation.

    A prompt longer than ``max_prompt_length`` tokens is cut from the LEFT (its start, e.g. the
    template's system message, is lost; the end with the assistant header stays) and counted as
    truncated. Prompts are indexed in load order (after ``limit``): ``prompts[i]`` are the chat
    messages and ``prompt_ids[i]`` the token ids of prompt ``i``, the ``prompt_index`` in batches.

    Args:
        tokenizer: a Hugging Face tokenizer with a pad token.
        path: the data source; ``split``/``data_dir`` as in ``read_rows``.
        max_prompt_length: maximum prompt tokens.
        val_size: validation prompts, an int count or a float fraction (0: none), held out of ``split``.
        val_split: read the validation prompts from this split of the same source instead (e.g.
            ``heldout``: ``<path>/heldout.jsonl``), all of them; ``val_size`` then holds nothing out.
        limit: use only a seeded random subset of this many prompts (before the split).
        batch_size: prompts per batch; the training loader drops the last incomplete batch.
        seed: seeds the subset, the split and the training shuffle.
        on_error: ``"raise"`` or ``"skip"`` bad rows.

    After :meth:`setup`: ``train_dataset``/``val_dataset`` and ``stats`` (``rows``, ``limited``,
    ``truncated``, ``dropped`` reason -> count, ``train``, ``val``).

    Raises (in setup):
        DataError: a bad row with ``on_error="raise"``.
        ValueError: no usable row; ``val_size`` leaving no training rows; fewer training prompts
            than ``batch_size`` (the training loader would yield nothing).
        DataSourceError: unreadable, refused or empty source (see ``read_rows``).
    """

    def __init__(self, tokenizer, path: str, split: str = "train", data_dir: str | None = None,
                 max_prompt_length: int = 256, val_size: int | float = 0, limit: int | None = None,
                 batch_size: int = 8, num_workers: int = 0, seed: int = 0, on_error: str = "raise",
                 val_split: str | None = None):
        if max_prompt_length < 1:
            raise ValueError(f"max_prompt_length must be >= 1, got {max_prompt_length}")
        super().__init__(tokenizer, path, split, data_dir, val_size, limit, batch_size, num_workers, seed, on_error,
                         PromptCollator(tokenizer.pad_token_id))
        self.max_prompt_length = max_prompt_length
        self.val_split = val_split
        self._prompts: list[list[dict]] = []
        self._prompt_ids: list[list[int]] = []
        self._columns: list[dict] = []
        self.stats: dict = {}

    @property
    def prompts(self) -> list[list[dict]]:
        """Every kept prompt as chat messages, indexed like ``prompt_index`` (after :meth:`setup`)."""
        self._require_setup()
        return self._prompts

    @property
    def prompt_ids(self) -> list[list[int]]:
        """Every kept prompt's token ids (after left truncation), indexed like ``prompt_index``."""
        self._require_setup()
        return self._prompt_ids

    def columns(self, prompt_index: Sequence[int]) -> dict[str, list]:
        """The dataset columns (:func:`~rlhf_lightning.data.rows.prompt_columns`, e.g. ``answer``) of the
        given prompts, as TRL passes them to reward functions: column name → one value per prompt. A
        column missing from some rows is ``None`` there.

        Args:
            prompt_index: indices into :attr:`prompts` (a batch's ``prompt_index``, as ints).
        """
        self._require_setup()
        rows = [self._columns[int(i)] for i in prompt_index]
        names = sorted({name for row in rows for name in row})
        return {name: [row.get(name) for row in rows] for name in names}

    def decode_prompt(self, index: int, skip_special_tokens: bool = False) -> str:
        """The text of prompt ``index`` as the model sees it (its token ids decoded)."""
        return self.tokenizer.decode(self.prompt_ids[index], skip_special_tokens=skip_special_tokens)

    def sample_batch(self, n: int) -> dict[str, torch.Tensor]:
        """A fixed batch of the first ``n`` validation prompts (training prompts when there are none).

        The same prompts every call, for before/after comparisons. Collated like a training
        batch (:class:`PromptCollator`); fewer than ``n`` rows when the split is smaller.
        """
        self._require_setup()
        pool = self.val_dataset if len(self.val_dataset) else self.train_dataset
        return self.collator([pool[i] for i in range(min(n, len(pool)))])

    def draw_prompts(self, key: Sequence[int], size: int, rank: int = 0,
                     world_size: int = 1) -> dict[str, torch.Tensor]:
        """Further training prompts for PPO's dynamic sampling: ``size`` prompts of the training split drawn
        without replacement by a generator seeded with (``seed``, ``*key``), and ``rank``'s share of them
        (positions ``rank``, ``rank + world_size``, ..., as the training sampler deals a batch), collated like a
        training batch (:class:`PromptCollator`). A function of its arguments and the data only: every rank,
        and a resumed run, draws the same prompts for the same ``key``.

        Args:
            key: what identifies the draw (PPO: iteration and round).
            size: prompts over all ranks; a multiple of ``world_size``, at most the training prompts.
            rank, world_size: this process's place.

        Raises:
            ValueError: ``size`` out of range or not a multiple of ``world_size``.
        """
        self._require_setup()
        if not 0 < size <= len(self.train_dataset) or size % world_size:
            raise ValueError(f"draw_prompts: size={size} must be in [1, {len(self.train_dataset)}] (the training "
                             f"prompts) and a multiple of world_size={world_size}")
        generator = torch.Generator().manual_seed(row_seed(self.seed, *key))
        order = torch.randperm(len(self.train_dataset), generator=generator)[:size][rank::world_size]
        return self.collator([self.train_dataset[i] for i in order.tolist()])

    def _require_setup(self) -> None:
        if self.train_dataset is None:
            raise RuntimeError("call setup() first")

    def build(self) -> None:
        """Load, encode, truncate and split (``setup`` calls it once)."""
        rows, loaded, skipped = self.read(load_prompt_rows)
        held_out = []
        if self.val_split is not None:
            _, held_out, held_skipped = self.read(load_prompt_rows, self.val_split)
            skipped = skipped + held_skipped
        loaded = loaded + held_out
        prompts = [messages for messages, _ in loaded]
        ids, truncated = [], 0
        for messages in prompts:
            encoded = encode_prompt(self.tokenizer, messages)
            if len(encoded) > self.max_prompt_length:
                encoded = encoded[-self.max_prompt_length:]
                truncated += 1
            ids.append(encoded)
        if self.val_split is None:
            train_idx, val_idx = split_indices(len(ids), self.val_size, self.seed)
        else:  # the training rows first, then the held-out split's
            first_val = len(ids) - len(held_out)
            train_idx, val_idx = list(range(first_val)), list(range(first_val, len(ids)))
        if len(train_idx) < self.batch_size:
            raise ValueError(f"{len(train_idx)} training prompts in {self.path} is fewer than batch_size="
                             f"{self.batch_size}; the training loader (drop_last) would be empty")
        self._prompts, self._prompt_ids = prompts, ids
        self._columns = [columns for _, columns in loaded]
        self.train_dataset = ListDataset([{"input_ids": ids[i], "prompt_index": i} for i in train_idx])
        self.val_dataset = ListDataset([{"input_ids": ids[i], "prompt_index": i} for i in val_idx])
        self.stats = {"rows": rows, "limited": len(prompts), "truncated": truncated,
                      "dropped": dict(Counter(skipped)), "train": len(train_idx), "val": len(val_idx)}
        logger.info("prompt data %s: %d prompts, %d used, %d cut to %d tokens, %d train / %d val",
                    self.path, rows, len(prompts), truncated, self.max_prompt_length, len(train_idx), len(val_idx))

    def train_dataloader(self) -> DataLoader:
        """Shuffled full batches of ``batch_size`` prompts (drop_last), order seeded by (seed, epoch) and
        resumable mid-epoch (:func:`~rlhf_lightning.data.resumable.resumable_loader`): see :class:`PromptCollator`."""
        return self._loader(self.train_dataset, self.batch_size, shuffle=True, drop_last=True)

    def val_dataloader(self) -> DataLoader:
        """Validation prompts in fixed order, last batch possibly smaller (none when val_size is 0)."""
        return self._loader(self.val_dataset, self.batch_size, shuffle=False)
