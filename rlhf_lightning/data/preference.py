"""Preference pairs (prompt, chosen, rejected) as a LightningDataModule, for reward-model training."""

from __future__ import annotations

import json
import logging
import zlib
from collections import Counter
from collections.abc import Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader

from rlhf_lightning.data.datamodule import ListDataset, SourceDataModule, split_indices, train_part
from rlhf_lightning.data.rows import DataError, PreferenceExample
from rlhf_lightning.data.sources import NoUsableRowError, load_examples
from rlhf_lightning.data.tokenization import PaddingCollator, encode_prompt, encode_response, truncate_pair

logger = logging.getLogger("rlhf_lightning.data")


def compare_splits(first: dict, second: dict) -> dict:
    """How two reward models' data splits relate (their :meth:`PreferenceDataModule.split_record`, e.g. a proxy's
    and its judge's ``split.json``).

    Returns:
        ``{"shared_train": pairs both trained on, "first_train_held_out_by_second": pairs the first trained on that
        the second held out, "second_train_held_out_by_first": the reverse, "same_val": whether both held out the
        same pairs, "same_source": same path and split}``. A judge that never saw the proxy's training pairs and is
        evaluated on the same held-out pairs has ``shared_train == 0``, both cross counts 0 and ``same_val``.

    Raises:
        KeyError: a record without ``train`` or ``val``.
    """
    train_a, train_b, val_a, val_b = (set(r[k]) for r, k in ((first, "train"), (second, "train"),
                                                            (first, "val"), (second, "val")))
    return {"shared_train": len(train_a & train_b), "first_train_held_out_by_second": len(train_a & val_b),
            "second_train_held_out_by_first": len(train_b & val_a), "same_val": val_a == val_b,
            "same_source": (first.get("path"), first.get("split")) == (second.get("path"), second.get("split"))}


class PreferenceCollator(PaddingCollator):
    """Batch preference pairs for a scalar (reward) model.

    Each item is a dict with ``prompt_ids``, ``chosen_ids``, ``rejected_ids`` (lists of int).
    For a batch of B items the result is::

        input_ids       (2B, L) long  rows 0..B-1: prompt+chosen; rows B..2B-1: prompt+rejected
                                      (row i and row B+i are the same pair); RIGHT-padded with pad_token_id
        attention_mask  (2B, L) long  1 on real tokens, 0 on padding
        response_lengths (2B,) long   tokens of each row's response (for the length diagnostics)
        pair_index      (B,) long     each pair's ``index`` (its dataset index, see
                                      :class:`PreferenceDataModule`); only when every item has one

    L is the longest sequence of the batch. With right padding each row's last attended token
    (the response's EOS unless truncated) is at ``attention_mask.sum(1) - 1``.

    Raises:
        ValueError: ``pad_token_id`` is None; an empty batch.
    """

    def __call__(self, items: Sequence[dict]) -> dict[str, torch.Tensor]:
        sequences = ([it["prompt_ids"] + it["chosen_ids"] for it in items]
                     + [it["prompt_ids"] + it["rejected_ids"] for it in items])
        input_ids, attention_mask = self.pad(sequences, side="right")
        lengths = [len(it["chosen_ids"]) for it in items] + [len(it["rejected_ids"]) for it in items]
        batch = {"input_ids": input_ids, "attention_mask": attention_mask,
                 "response_lengths": torch.tensor(lengths, dtype=torch.long)}
        if all("index" in it for it in items):
            batch["pair_index"] = torch.tensor([it["index"] for it in items], dtype=torch.long)
        return batch


class PreferenceDataModule(SourceDataModule):
    """Preference pairs from a file, directory or Hub dataset (see ``sources.read_rows``), tokenized,
    truncated and split into train/validation.

    Each kept pair becomes ``{"prompt_ids", "chosen_ids", "rejected_ids", "where", "index"}``, ``index`` its
    position among the kept pairs before the split (the dataset index: decided by the data, ``limit`` and ``seed``,
    the same on every rank, unique across training and validation pairs): the prompt via
    ``encode_prompt`` (chat template + generation prompt), each response via ``encode_response``
    (ends in EOS), then ``truncate_pair(..., max_length)`` (prompt cut from the left; responses
    cut from the right only when they alone do not fit). Batches come from :class:`PreferenceCollator`.

    Args:
        tokenizer: a Hugging Face tokenizer with pad and EOS tokens.
        path: the data source (local path or Hub name); ``split``/``data_dir`` as in ``read_rows``.
        max_length: maximum tokens of prompt+response per sequence.
        val_size: validation rows, an int count or a float fraction of the kept rows (0: no validation).
        limit: use only a seeded random subset of this many loaded rows (before the split).
        batch_size: pairs per training batch (the batch holds 2 * batch_size sequences).
        eval_batch_size: pairs per validation batch (default ``batch_size``).
        seed: seeds the subset, the split, the training part and the training shuffle.
        on_error: ``"raise"`` or ``"skip"`` bad rows (also rows identical after truncation).
        train_part: ``[k, n]``: train on part k of n of the training rows
            (:func:`~rlhf_lightning.data.datamodule.train_part`), the validation rows unchanged; ``None``: all of
            them. Parts 0 and 1 of 2: a proxy and a judge reward model trained on disjoint pairs and held out on
            the same ones.

    After :meth:`setup`: ``train_dataset``/``val_dataset`` (ListDataset of the item dicts) and
    ``stats``, a dict with ``rows`` (usable rows loaded), ``limited`` (rows after ``limit``),
    ``truncated``, ``dropped`` (reason -> count, load-time and truncation drops), ``kept``,
    ``train``, ``val``, ``train_part``; :meth:`split_record` names the pairs of each subset.

    Raises (in setup):
        DataError: a bad row with ``on_error="raise"``.
        ValueError: no usable row; ``val_size`` leaving no training rows; a bad ``train_part``.
        DataSourceError: unreadable, refused or empty source (see ``read_rows``).
    """

    def __init__(self, tokenizer, path: str, split: str = "train", data_dir: str | None = None,
                 max_length: int = 512, val_size: int | float = 200, limit: int | None = None,
                 batch_size: int = 8, eval_batch_size: int | None = None, num_workers: int = 0,
                 seed: int = 0, on_error: str = "raise", train_part: Sequence[int] | None = None):
        super().__init__(tokenizer, path, split, data_dir, val_size, limit, batch_size, num_workers, seed, on_error,
                         PreferenceCollator(tokenizer.pad_token_id))
        self.max_length = max_length
        self.eval_batch_size = eval_batch_size or batch_size
        self.train_part = None if train_part is None else [int(v) for v in train_part]

    def build(self) -> None:
        """Load, tokenize, truncate and split (``setup`` calls it once)."""
        rows, examples, skipped = self.read(load_examples)
        dropped = Counter(skipped)
        items, truncated = [], 0
        for ex in examples:
            try:
                item, cut = self._encode(ex)
            except DataError as e:
                if self.on_error == "raise":
                    raise
                dropped[e.reason] += 1
                continue
            truncated += cut
            items.append(item)
        if not items:
            raise NoUsableRowError(f"no usable preference pair in {self.path} (dropped: {dict(dropped)})")
        for index, item in enumerate(items):
            item["index"] = index
        train_idx, val_idx = split_indices(len(items), self.val_size, self.seed)
        train_idx = train_part(train_idx, self.train_part, self.seed)
        self.train_dataset = ListDataset([items[i] for i in train_idx])
        self.val_dataset = ListDataset([items[i] for i in val_idx])
        self.stats = {"rows": rows, "limited": len(examples), "truncated": truncated, "dropped": dict(dropped),
                      "kept": len(items), "train": len(train_idx), "val": len(val_idx), "train_part": self.train_part}
        logger.info("preference data %s: %d rows, %d used, %d truncated to %d tokens, %d train%s / %d val",
                    self.path, rows, len(items), truncated, self.max_length, len(train_idx),
                    f" (part {self.train_part[0]} of {self.train_part[1]})" if self.train_part else "", len(val_idx))
        if dropped:
            logger.warning("preference data %s: dropped %s", self.path,
                           ", ".join(f"{n} {reason}" for reason, n in sorted(dropped.items())))

    def split_record(self) -> dict:
        """Which source rows each subset holds, after :meth:`setup`: ``{"path", "split", "limit", "val_size",
        "seed", "train_part", "train", "val"}``, ``train``/``val`` the sorted ``where`` of their pairs (``file:line``
        or ``split:index``, see ``sources.read_rows``). Two records' training rows are disjoint when their
        ``train`` lists share no entry; they were held out on the same pairs when their ``val`` lists are equal.

        Raises:
            RuntimeError: ``setup`` has not run.
        """
        if self.train_dataset is None:
            raise RuntimeError("call setup() before split_record()")
        return {"path": self.path, "split": self.split, "limit": self.limit, "val_size": self.val_size,
                "seed": self.seed, "train_part": self.train_part,
                "train": sorted(it["where"] for it in self.train_dataset),
                "val": sorted(it["where"] for it in self.val_dataset)}

    def _encode(self, ex: PreferenceExample) -> tuple[dict, bool]:
        prompt = encode_prompt(self.tokenizer, ex.prompt)
        chosen = encode_response(self.tokenizer, ex.chosen)
        rejected = encode_response(self.tokenizer, ex.rejected)
        try:
            prompt, chosen, rejected, cut = truncate_pair(prompt, chosen, rejected, self.max_length)
        except DataError as e:
            raise DataError(f"{ex.where}: {e}", e.reason, ex.where, "chosen") from None
        return {"prompt_ids": prompt, "chosen_ids": chosen, "rejected_ids": rejected, "where": ex.where}, cut

    def train_dataloader(self) -> DataLoader:
        """Shuffled batches of ``batch_size`` pairs, order seeded by (seed, epoch) and resumable mid-epoch
        (:func:`~rlhf_lightning.data.resumable.resumable_loader`): dicts of (2B, L) long tensors (see collator)."""
        return self._loader(self.train_dataset, self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        """Validation batches of ``eval_batch_size`` pairs in fixed order (no batches when val_size is 0)."""
        return self._loader(self.val_dataset, self.eval_batch_size, shuffle=False)


def pair_key(item: dict) -> str:
    """The key of a preference pair in the reference log-probability cache: its source row (``where``) and
    a CRC-32 of its token ids, so a pair whose tokens changed (another tokenizer, ``max_length``) misses."""
    data = ",".join(str(i) for part in ("prompt_ids", "chosen_ids", "rejected_ids") for i in item[part] + [-1])
    return f"{item['where']}#{zlib.crc32(data.encode()):08x}"


class DPOCollator(PaddingCollator):
    """Batch preference pairs for a causal LM: each row's prompt LEFT-padded to the batch's longest prompt
    P, its response RIGHT-padded after it, the layout of :mod:`rlhf_lightning.models.forward`
    (``[left padding | prompt | response | right padding]``).

    Each item is a dict with ``prompt_ids``, ``chosen_ids``, ``rejected_ids`` (lists of int) and ``where``.
    For a batch of B items::

        input_ids       (2B, P + R) long  rows 0..B-1: prompt + chosen; rows B..2B-1: prompt + rejected
        attention_mask  (2B, P + R) long  1 on real tokens
        response_mask   (2B, R)     bool  1 on the response's tokens (the loss's tokens)
        response_start  int               P, the column of the first response token
        keys            list of B str     :func:`pair_key` of each pair

    Raises:
        ValueError: ``pad_token_id`` is None; an empty batch.
    """

    def __call__(self, items: Sequence[dict]) -> dict[str, Any]:
        prompts = [it["prompt_ids"] for it in items] * 2
        responses = [it["chosen_ids"] for it in items] + [it["rejected_ids"] for it in items]
        prompt_ids, prompt_mask = self.pad(prompts, side="left")
        response_ids, response_mask = self.pad(responses, side="right")
        return {"input_ids": torch.cat([prompt_ids, response_ids], 1),
                "attention_mask": torch.cat([prompt_mask, response_mask], 1),
                "response_mask": response_mask.bool(), "response_start": prompt_ids.shape[1],
                "keys": [pair_key(it) for it in items]}


class DPODataModule(PreferenceDataModule):
    """Preference pairs for DPO: :class:`PreferenceDataModule`'s rows, batched by :class:`DPOCollator`, and
    the held-out prompts of the before/after evaluation.

    The evaluation prompts come from ``eval_prompts`` (a :class:`~rlhf_lightning.data.PromptDataModule`
    built like PPO's, so that both stages are evaluated on the same prompts): :meth:`sample_batch` is its.
    Training pairs whose prompt (chat messages) is one of the first ``num_eval_prompts`` of them are left
    out of training (logged count), so the evaluation's prompts stay unseen.

    Args:
        eval_prompts: a callable taking the tokenizer and returning the prompt datamodule (a Hydra partial),
            or ``None`` (no evaluation prompts).
        num_eval_prompts: how many of its held-out prompts the evaluation uses.
        Others: as :class:`PreferenceDataModule`.
    """

    def __init__(self, tokenizer, path: str, eval_prompts=None, num_eval_prompts: int = 0, **kwargs):
        super().__init__(tokenizer, path, **kwargs)
        self.collator = DPOCollator(tokenizer.pad_token_id)
        self.eval_prompts = eval_prompts(tokenizer=tokenizer) if callable(eval_prompts) else eval_prompts
        self.num_eval_prompts = num_eval_prompts

    def _encode(self, ex: PreferenceExample) -> tuple[dict, bool]:
        item, cut = super()._encode(ex)
        item["prompt"] = ex.prompt
        return item, cut

    def build(self) -> None:
        """:meth:`PreferenceDataModule.build`, then the evaluation prompts' setup and the removal of their
        training pairs."""
        super().build()
        if self.eval_prompts is None or not self.num_eval_prompts:
            return
        self.eval_prompts.setup("fit")
        batch = self.eval_prompts.sample_batch(self.num_eval_prompts)
        held_out = {json.dumps(self.eval_prompts.prompts[int(i)], sort_keys=True) for i in batch["prompt_index"]}
        kept = [it for it in self.train_dataset.items if json.dumps(it["prompt"], sort_keys=True) not in held_out]
        removed = len(self.train_dataset) - len(kept)
        if removed:
            logger.info("preference data %s: %d training pairs left out (their prompt is an evaluation prompt)",
                        self.path, removed)
            self.train_dataset = ListDataset(kept)
        self.stats["eval_prompt_pairs_removed"] = removed

    def sample_batch(self, n: int) -> dict[str, torch.Tensor]:
        """The evaluation prompts' fixed batch (:meth:`~rlhf_lightning.data.PromptDataModule.sample_batch`).

        Raises:
            RuntimeError: no ``eval_prompts``.
        """
        if self.eval_prompts is None:
            raise RuntimeError("DPODataModule has no eval_prompts")
        return self.eval_prompts.sample_batch(n)

    def reference_dataloader(self) -> DataLoader:
        """Every training and validation pair once, in fixed order, in batches of ``eval_batch_size``: the
        reference model's one pass before training."""
        return DataLoader(ListDataset(list(self.train_dataset) + list(self.val_dataset)),
                          batch_size=self.eval_batch_size, shuffle=False, collate_fn=self.collator)
